import FlowTrace
import KVM

/// The machine's armed probe locations: who owns which address, with which engine.
/// Changed only while every vCPU is parked (the rendezvous), read by vCPU threads at exits.
struct Breakpoints: Sendable {
    struct Owner {
        let module: TraceModule
        let index: Int
        let timing: ProbeTiming
        let vcpus: VCPUSelection
    }

    /// The engine in use while any location is armed.
    var engine: BreakpointEngine?
    var engineReason = ""
    var owners: [UInt64: [Owner]] = [:]
    /// Patched bytes (int3 and hlt engines).
    var patches = PatchTable(trap: X86Opcode.hlt)
    /// The instructions under the patches that can be stepped out of line.
    var displaced: [UInt64: DisplacedInstruction] = [:]
    /// The armed locations whose instruction (when armed) loads RFLAGS, popf or iret, with
    /// the offset from rsp of the image it loads; the hit path skips guest-memory reads for
    /// every other location (see `StepOver.ownTrapFlag`).
    var flagLoads: [UInt64: UInt64] = [:]
    /// The armed locations whose instruction waits for an interrupt (hlt, mwait), with its
    /// length: on the pc platform they are not stepped over but done by flowtrace (see
    /// `Machine.waitInPlace`), and their step-overs elsewhere let interrupts in.
    var waitsForInterrupt: [UInt64: UInt64] = [:]

    /// While set: the linear address of the probe gate (`Machine.deferSoftwareProbes`), a
    /// hardware breakpoint on every vCPU; the patching engine's locations in `pending` are
    /// owned but not patched until a vCPU reaches it.
    var gate: UInt64?
    /// Locations owned but not patched yet (waiting for the gate).
    var pending: Set<UInt64> = []

    var isEmpty: Bool { owners.isEmpty }

    /// Whether any owner traces `vcpu`.
    func traces(_ vcpu: Int) -> Bool {
        owners.values.contains { $0.contains { $0.vcpus.contains(vcpu) } }
    }

    /// What `KVM_SET_GUEST_DEBUG` should say for `vcpu` when it is not stepping over a probe.
    func baseDebug(for vcpu: Int) -> GuestDebug {
        var d = engine?.mechanism.baseDebug(self, vcpu: vcpu) ?? GuestDebug()
        if let gate {
            // Only the patching engines wait for the gate: DR0 is free.
            d.hardwareBreakpoints = true
            d.addresses[0] = gate
            d.dr7 |= 1
        }
        return d
    }

    /// The debug setting while `vcpu` single-steps over the instruction at a probe
    /// (`StepOver.debug` adds BLOCKIRQ where it applies).
    func stepOverDebug(for vcpu: Int) -> GuestDebug {
        var d = GuestDebug()
        d.singleStep = true
        // int3 keeps USE_SW_BP so the guest's own int3s still come to us.
        d.softwareBreakpoints = engine == .int3
        return d
    }
}
