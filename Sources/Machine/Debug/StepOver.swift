import FlowGraph
import FlowTrace
import KVM
import Locking
import Synchronization

/// The guest's own TF around a stepped-over instruction (see `StepOver.ownTrapFlag`).
struct OwnTrapFlag: Equatable {
    /// TF was set when the instruction began: the guest gets a #DB after it.
    var before: Bool
    /// TF is set once it retired.
    var after: Bool

    /// The length of an instruction that waits for an interrupt: hlt (0xF4), mwait
    /// (0F 01 C9); nil for any other.
    static func waitsForInterrupt(_ bytes: [UInt8]) -> UInt64? {
        if bytes.first == 0xF4 { return 1 }
        return bytes.starts(with: [0x0F, 0x01, 0xC9]) ? 3 : nil
    }

    /// For popf/iret (with their 0x66 and REX prefixes), the offset from rsp of the RFLAGS
    /// image they load; nil for any other instruction. Long mode: popf pops 8 bytes (2 with
    /// 0x66); iret pops rip, cs, then rflags in slots of 4 bytes (8 with REX.W, 2 with 0x66).
    static func flagsSlot(_ bytes: [UInt8]) -> UInt64? {
        var i = 0, operand16 = false, rexW = false
        while i < bytes.count {
            let b = bytes[i]
            if b == 0x66 { operand16 = true; i += 1; continue }
            if b & 0xF0 == 0x40 { rexW = b & 0x08 != 0; i += 1; continue }
            break
        }
        guard i < bytes.count else { return nil }
        switch bytes[i] {
        case 0x9D: return 0
        case 0xCF: return 2 * (rexW ? 8 : operand16 ? 2 : 4)
        default: return nil
        }
    }
}

/// A host call that failed while stepping over a probe: the run ends with it.
struct StepFailure: Error, Equatable {
    let error: KVMError
    let doing: String
}

/// Stepping over probed instructions, the patching engines' and the hw engine's second
/// half: one single step of the instruction at a probe, then the trap (or DRs) back.
///
/// Out of line where it can: a copy of the instruction (see `DisplacedInstruction`) runs in
/// the vCPU's slot, the trap byte stays, the other vCPUs run on. In place otherwise (an
/// instruction that depends on where it runs, code off the boot page tables, bytes the
/// guest rewrote): the original byte goes back for the step and, for the patching engines,
/// the other vCPUs are held out of the guest meanwhile. On a platform with interrupts each
/// step keeps them out: `KVM_GUESTDBG_BLOCKIRQ` where the host offers it, else an STI
/// interrupt shadow over the instruction (see `StepInterruptBlocking`).
final class StepOver: Sendable {
    let memory: GuestMemory
    let layout: BootLayout
    let rendezvous: Rendezvous
    /// What keeps interrupts out of a step.
    let interrupts: StepInterruptMode
    let outOfLine = Atomic<UInt64>(0)
    let inPlace = Atomic<UInt64>(0)
    /// Tests only: called on a vCPU's thread right after it began an out-of-line step.
    let begun = Locked<(@Sendable (Int) -> Void)?>(nil)
    let hasHook = Atomic<Bool>(false)

    init(memory: GuestMemory, layout: BootLayout, rendezvous: Rendezvous, interrupts: StepInterruptMode) {
        self.memory = memory
        self.layout = layout
        self.rendezvous = rendezvous
        self.interrupts = interrupts
    }

    /// The debug state for one step of `vcpu` over the probed instruction at `address`:
    /// interrupts blocked, except for an instruction that waits for one (hlt, mwait), which
    /// would otherwise wait for ever; its step ends where the interrupt took it.
    func debug(_ b: Breakpoints, vcpu: Int, address: UInt64) -> GuestDebug {
        var d = b.stepOverDebug(for: vcpu)
        d.blockInterrupts = interrupts == .blockIRQ && b.waitsForInterrupt[address] == nil
        return d
    }

    /// The guest's own trap flag around the probed instruction at `address`, when it
    /// matters: KVM's single step takes over RFLAGS.TF and clears it when the step ends, so
    /// a guest single-stepping itself through a probe would lose its TF and the #DB its TF
    /// raises for this instruction. nil: TF is clear before and the instruction does not
    /// load RFLAGS (the usual case: `flagLoads`, filled when arming, says so without a
    /// read). Else `before` (a #DB is owed to the guest after the step) and `after` (TF must
    /// be set again): TF as before, or what `popf`/`iret` load from the stack, read before
    /// the step. Code the guest rewrites at a probe after arming keeps the arming's verdict.
    func ownTrapFlag(_ vcpu: VCPU, regs: Registers, address: UInt64, table b: Breakpoints) -> (OwnTrapFlag?, StepFailure?) {
        let before = regs.rflags & X86Flags.trap != 0
        // The usual case, decided from what arming found: no guest-memory read.
        let slot = b.flagLoads[address]
        guard before || slot != nil else { return (nil, nil) }
        guard let slot else { return (OwnTrapFlag(before: true, after: true), nil) }
        do throws(KVMError) {
            let cr3 = try vcpu.specialRegisters().cr3
            let p = try memory.translate(virtual: regs.rsp &+ slot, cr3: cr3).physical
            let loaded = try memory.read(physical: p, count: 2)
            let after = UInt64(loaded[1]) << 8 & X86Flags.trap != 0
            return (before || after ? OwnTrapFlag(before: before, after: after) : nil, nil)
        } catch {
            return (nil, StepFailure(error: error, doing: "reading the guest's trap flag for the probe at 0x\(String(address, radix: 16))"))
        }
    }

    /// Starts the step over the instruction at `address` (rip is on it). `table` reads the
    /// current breakpoint table (again after waiting for the rendezvous). Returns the
    /// stepping state, also on failure, so the caller ends it properly.
    func begin(_ vcpu: VCPU, address: UInt64, table: () -> Breakpoints) -> (Stepping?, StepFailure?) {
        let b = table()
        // Only for messages: formatted when one is made, not at every step.
        func hex() -> String { "0x\(String(address, radix: 16))" }
        if let displaced = b.displaced[address], b.engine?.mechanism.trapByte != nil,
           let slot = BootLayout.outOfLineSlot(for: vcpu.id), let bytes = displaced.bytes(at: slot) {
            let cr3: UInt64
            do { cr3 = try vcpu.cr3() } catch {
                return (nil, StepFailure(error: error, doing: "reading cr3 to step over the probe at \(hex())"))
            }
            if cr3 == layout.cr3, unchanged(displaced) {
                let stepping = Stepping.outOfLine(address: address, slot: slot, displaced: displaced)
                var regs: Registers
                do { regs = try vcpu.registers() } catch { return (nil, StepFailure(error: error, doing: "reading the registers at an exit")) }
                do { try memory.write(physical: slot, bytes: bytes) } catch {
                    return (nil, StepFailure(error: error, doing: "writing the out-of-line copy of \(hex()) at guest-physical 0x\(String(slot, radix: 16))"))
                }
                regs.rip = slot
                do { try vcpu.setRegisters(regs) } catch { return (nil, StepFailure(error: error, doing: "setting the registers at a probe hit")) }
                do {
                    try vcpu.flushRegisters()
                    try vcpu.setGuestDebug(debug(b, vcpu: vcpu.id, address: address))
                    try shadowInterrupts(vcpu, address: address, table: b)
                } catch {
                    return (stepping, StepFailure(error: error, doing: "arming the out-of-line step over \(hex())"))
                }
                outOfLine.add(1, ordering: .relaxed)
                if hasHook.load(ordering: .acquiring), let hook = begun.withLock({ $0 }) { hook(vcpu.id) }
                return (stepping, nil)
            }
        }
        // With the trap byte gone, another vCPU could run through the location unseen:
        // hold them all out of the guest for the one step.
        let held = b.engine?.mechanism.trapByte != nil
        if held {
            inPlace.add(1, ordering: .relaxed)
            rendezvous.acquire(.vcpu(vcpu.id))
        }
        let stepping = Stepping.over(address: address, held: held)
        // The physical address was checked when the location was armed. Read after the
        // rendezvous: the others may have changed the engine while this vCPU waited for it.
        let now = table()
        if let p = now.patches.patches[address] {
            do throws(KVMError) { try memory.write(physical: p.physical, bytes: [p.original]) } catch {
                return (stepping, StepFailure(error: error, doing: "restoring the original byte at \(hex()) to step over it"))
            }
        }
        // The hit moved rip back onto the instruction: KVM must see it before it arms the step.
        do {
            try vcpu.flushRegisters()
            try vcpu.setGuestDebug(debug(now, vcpu: vcpu.id, address: address))
            try shadowInterrupts(vcpu, address: address, table: now)
        } catch {
            return (stepping, StepFailure(error: error, doing: "arming the single step over \(hex())"))
        }
        return (stepping, nil)
    }

    /// The fallback without BLOCKIRQ: with interrupts on, an STI interrupt shadow over the
    /// stepped instruction, so the CPU takes no interrupt before it retired (not for an
    /// instruction that waits for one). Interrupts off: nothing can come anyway.
    private func shadowInterrupts(_ vcpu: VCPU, address: UInt64, table b: Breakpoints) throws(KVMError) {
        guard interrupts == .interruptShadow, b.waitsForInterrupt[address] == nil else { return }
        guard try vcpu.registers().rflags & X86Flags.interrupts != 0 else { return }
        var e = try vcpu.events()
        guard e.interruptShadow == 0 else { return }
        e.interruptShadow = 1   // KVM_X86_SHADOW_INT_STI
        try vcpu.setEvents(e)
    }

    /// Ends an in-place step: puts the trap back (if the location is still armed) and the
    /// vCPU's usual debug state. The other vCPUs are released whatever fails.
    func end(_ vcpu: VCPU, address: UInt64, held: Bool, table b: Breakpoints) -> StepFailure? {
        defer { if held { rendezvous.release() } }
        // Only for messages: formatted when one is made, not at every step.
        func hex() -> String { "0x\(String(address, radix: 16))" }
        if let p = b.patches.patches[address] {
            do throws(KVMError) { try memory.write(physical: p.physical, bytes: [b.patches.trap]) } catch {
                return StepFailure(error: error, doing: "putting the trap byte back at \(hex()) after stepping over it")
            }
        }
        do { try vcpu.setGuestDebug(b.baseDebug(for: vcpu.id)) } catch {
            return StepFailure(error: error, doing: "re-arming the vCPU's breakpoints after stepping over \(hex())")
        }
        return nil
    }

    /// Leaves an out-of-line step unfinished (the machine stops, or the copy faulted): rip
    /// goes back from the slot to the instruction, so reports and dumps name the real place.
    /// An in-place step is left as it is (its end puts the trap back and releases the
    /// others). Returns the stepping state that remains.
    func abandon(_ vcpu: VCPU, _ stepping: Stepping?, table b: Breakpoints) -> (Stepping?, StepFailure?) {
        guard case let .outOfLine(address, slot, _)? = stepping else { return (stepping, nil) }
        do throws(KVMError) {
            var regs = try vcpu.registers()
            if regs.rip >= slot, regs.rip < slot + BootLayout.outOfLineSlotSize {
                regs.rip = regs.rip - slot + address
                try vcpu.setRegisters(regs)
            }
            try vcpu.setGuestDebug(b.baseDebug(for: vcpu.id))
        } catch {
            return (nil, StepFailure(error: error, doing: "leaving the out-of-line step over 0x\(String(address, radix: 16))"))
        }
        return (nil, nil)
    }

    /// A call stepped out of line pushed its slot's return address: make it the real one.
    func fixReturnAddress(_ vcpu: VCPU, rsp: UInt64, from pushed: UInt64, to real: UInt64) -> StepFailure? {
        do {
            let cr3 = try vcpu.specialRegisters().cr3
            let p = try memory.translate(virtual: rsp, cr3: cr3).physical
            if try memory.readUInt64(physical: p) == pushed { try memory.writeUInt64(physical: p, real) }
            return nil
        } catch {
            return StepFailure(error: error, doing: "fixing the return address 0x\(String(real, radix: 16)) of a call stepped out of line")
        }
    }

    /// The instruction at `address` (guest-virtual through `cr3`), planned for out-of-line
    /// stepping; nil when it must be stepped in place or does not decode.
    func displacedInstruction(at address: UInt64, cr3: UInt64) -> DisplacedInstruction? {
        var bytes: [UInt8] = []
        for count in stride(from: X86Decoder.maxLength, through: 1, by: -1) {
            // Fewer bytes where the instruction ends near the end of RAM.
            if let b = try? memory.read(virtual: address, count: count, cr3: cr3) { bytes = b; break }
        }
        guard case let .success(i) = X86Decoder().decode(bytes, at: address),
              case let .success(d) = DisplacedInstruction.plan(i) else { return nil }
        return d
    }

    /// Whether the guest's bytes after the trap byte are still those of the planned copy
    /// (code the guest rewrote since arming is stepped in place, as it is now). Bytes the
    /// boot page tables no longer map count as rewritten: the in-place step reads them
    /// through the guest's own tables.
    func unchanged(_ d: DisplacedInstruction) -> Bool {
        guard d.bytes.count > 1 else { return true }
        do {
            let now = try memory.read(virtual: d.address &+ 1, count: d.bytes.count - 1, cr3: layout.cr3)
            return now[...] == d.bytes[1...]
        } catch {
            return false
        }
    }
}

// What the runner does around the debug outcomes: probe hits, halting at a probe, the
// step-over calls with their failures ending the run.
extension Machine {
    /// Whether the instruction at `address` that just retired (rip now `rip`) was the
    /// guest's own `hlt`. Under single-step KVM reports a hlt as a debug exit and the vCPU
    /// does not stop, so the loop must end the vCPU itself. nil: the check failed (the run
    /// ends with the failure).
    func executedHalt(_ vcpu: VCPU, at address: UInt64, rip: UInt64) -> Bool? {
        guard rip == address &+ 1 else { return false }
        if let original = current.patches.original(at: address) { return original == X86Opcode.hlt }
        do {
            let cr3 = try vcpu.specialRegisters().cr3
            return try memory.read(virtual: address, count: 1, cr3: cr3) == [X86Opcode.hlt]
        } catch {
            hostFailure(vcpu, error, while: "reading the instruction at 0x\(String(address, radix: 16)) after a single step")
            return nil
        }
    }

    /// Delivers a hit at `address` (nil: `regs.rip`) to every owner with `timing`, with
    /// `regs` as the registers of this exit.
    func probeHits(_ vcpu: VCPU, at address: UInt64?, _ timing: ProbeTiming, regs: Registers) -> HitAction {
        // The owners array is shared, not filtered into a new one: no allocation per hit.
        guard let owners = current.owners[address ?? regs.rip] else { return .continue }
        let snapshot = snapshots[vcpu.id]
        snapshot.reset(regs)
        var action = HitAction.continue
        let context = MachineHitContext(snapshot: snapshot)
        for o in owners where o.timing == timing && o.module.hit(location: o.index, context: context) == .halt {
            action = .halt
        }
        return action
    }

    func beginStepOver(_ vcpu: VCPU, address: UInt64) -> Stepping? {
        let (stepping, failure) = stepOver.begin(vcpu, address: address) { current }
        if let failure { hostFailure(vcpu, failure.error, while: failure.doing) }
        return stepping
    }

    /// false: something failed, the run ends.
    @discardableResult
    func endStepOver(_ vcpu: VCPU, address: UInt64, held: Bool) -> Bool {
        guard let failure = stepOver.end(vcpu, address: address, held: held, table: current) else { return true }
        hostFailure(vcpu, failure.error, while: failure.doing)
        return false
    }

    func abandonOutOfLine(_ vcpu: VCPU, _ stepping: Stepping?) -> Stepping? {
        let (rest, failure) = stepOver.abandon(vcpu, stepping, table: current)
        if let failure { hostFailure(vcpu, failure.error, while: failure.doing) }
        return rest
    }

    func fixReturnAddress(_ vcpu: VCPU, rsp: UInt64, from pushed: UInt64, to real: UInt64) -> Bool {
        guard let failure = stepOver.fixReturnAddress(vcpu, rsp: rsp, from: pushed, to: real) else { return true }
        hostFailure(vcpu, failure.error, while: failure.doing)
        return false
    }

    func applyBaseDebug(_ vcpu: VCPU) {
        let d = current.baseDebug(for: vcpu.id)
        do { try vcpu.setGuestDebug(d) } catch { hostFailure(vcpu, error, while: "setting the vCPU's breakpoints") }
    }

    /// Stops the machine at a halt entry's hit and hands it to the caller of run/resume.
    func haltHere(_ vcpu: VCPU, address: UInt64, _ timing: ProbeTiming, rip known: UInt64?) {
        rendezvous.acquire(.vcpu(vcpu.id))
        let rip = known ?? registers(vcpu)?.rip ?? address
        let stop = HaltStop(vcpu: vcpu.id, address: address, timing: timing, rip: rip, location: symbolizer.describe(rip))
        rendezvous.handOver(from: vcpu.id)
        events.withLock { $0.halt = stop }
        // Wait here (parked) until resume() or stop() releases the rendezvous.
        rendezvous.gate(vcpu.id, starting: true)
    }
}
