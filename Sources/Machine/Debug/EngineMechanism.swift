import KVM

/// What an engine recognised in an exit (with no step-over in progress).
enum EngineHit: Equatable {
    /// A patched trap at `address` (rip is past it for hlt, on it for int3).
    case trap(address: UInt64)
    /// A hardware breakpoint at `address`.
    case hardware(address: UInt64)
    /// A single step of the step engine.
    case step
}

/// One breakpoint engine's mechanism: the debug state its armed locations need on each
/// vCPU, and which exits are its hits. One type per mechanism: patching a trap byte (int3,
/// hlt), hardware breakpoints (DR0-DR3), single-stepping.
protocol EngineMechanism: Sendable {
    /// The byte written at each location, nil when nothing is patched.
    var trapByte: UInt8? { get }
    /// The debug state for `vcpu` while it is not stepping over a probe.
    func baseDebug(_ b: Breakpoints, vcpu: Int) -> GuestDebug
    /// Whether `exit` (a hlt or debug exit, registers' rip `rip`) is one of this engine's hits.
    func hit(_ exit: VMExit, rip: UInt64, table: Breakpoints) -> EngineHit?
}

extension BreakpointEngine {
    /// The engine's mechanism.
    var mechanism: any EngineMechanism {
        switch self {
        case .int3: PatchingEngine.int3
        case .hlt: PatchingEngine.hlt
        case .hw: HardwareBreakpoints()
        case .step: SingleStepEngine()
        }
    }
}

/// The patching engines: a trap byte at each location. int3 (0xCC) exits as #BP with
/// `KVM_GUESTDBG_USE_SW_BP`; hlt (0xF4) exits as `KVM_EXIT_HLT` one past the byte (CPL0
/// code, no in-kernel irqchip). The probed instruction is stepped over out of line or with
/// the byte restored (see `StepOver`).
struct PatchingEngine: EngineMechanism {
    let trap: UInt8
    static let int3 = PatchingEngine(trap: X86Opcode.int3)
    static let hlt = PatchingEngine(trap: X86Opcode.hlt)

    var trapByte: UInt8? { trap }

    func baseDebug(_ b: Breakpoints, vcpu: Int) -> GuestDebug {
        var d = GuestDebug()
        // A hlt trap needs no debug state; int3s must exit (every vCPU: the bytes are shared),
        // but only while one of ours is written or about to be (arming sets this before it
        // writes the first byte): while every location waits for the gate, and after the
        // last is removed, the guest's own int3s (a kernel's self-test, text_poke_bp while
        // it patches itself) go straight to its handler instead of out to us and back in.
        d.softwareBreakpoints = trap == X86Opcode.int3 && (!b.patches.patches.isEmpty || b.owners.count > b.pending.count)
        return d
    }

    func hit(_ exit: VMExit, rip: UInt64, table: Breakpoints) -> EngineHit? {
        switch exit {
        case .hlt where trap == X86Opcode.hlt && table.patches.owns(trapAt: rip &- 1):
            return .trap(address: rip &- 1)
        case let .debug(3, pc, _, _) where trap == X86Opcode.int3 && table.patches.owns(trapAt: pc):
            return .trap(address: pc)
        default:
            return nil
        }
    }
}

/// DR0-DR3 execute breakpoints (`KVM_GUESTDBG_USE_HW_BP`) on the vCPUs a module traces:
/// at most 4 locations; nothing in guest memory changes.
struct HardwareBreakpoints: EngineMechanism {
    var trapByte: UInt8? { nil }

    func baseDebug(_ b: Breakpoints, vcpu: Int) -> GuestDebug {
        var d = GuestDebug()
        guard b.traces(vcpu) else { return d }
        d.hardwareBreakpoints = true
        for (slot, a) in b.owners.keys.sorted().prefix(4).enumerated() {
            d.addresses[slot] = a
            d.dr7 |= 1 << (2 * UInt64(slot))  // L0..L3; R/W = 00 (execute), LEN = 00
        }
        return d
    }

    func hit(_ exit: VMExit, rip: UInt64, table: Breakpoints) -> EngineHit? {
        if case let .debug(1, pc, dr6, _) = exit, dr6 & 0xF != 0 { return .hardware(address: pc) }
        return nil
    }
}

/// `KVM_GUESTDBG_SINGLESTEP` on every traced vCPU: every instruction exits, rip is compared
/// with the armed locations. Interrupts are taken between steps (no BLOCKIRQ here: the
/// guest's own interrupt handlers are stepped, and probed, like any other code).
struct SingleStepEngine: EngineMechanism {
    var trapByte: UInt8? { nil }

    func baseDebug(_ b: Breakpoints, vcpu: Int) -> GuestDebug {
        var d = GuestDebug()
        d.singleStep = b.traces(vcpu)
        return d
    }

    func hit(_ exit: VMExit, rip: UInt64, table: Breakpoints) -> EngineHit? {
        if case .debug(1, _, _, _) = exit { return .step }
        return nil
    }
}
