import FlowGraph
import FlowTrace
import KVM

// Stepping over probed instructions (out of line in a slot, or in place with the other
// vCPUs held), probe hits, halting at a probe: what the runner does for the debug outcomes.
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

    /// Starts single-stepping the probed instruction at `address`: out of line where the
    /// instruction allows it and the vCPU still runs on the boot page tables (so its slot is
    /// mapped and the loader's), else in place with the other vCPUs held.
    func beginStepOver(_ vcpu: VCPU, address: UInt64) -> Stepping? {
        let b = current
        let (engine, displaced, oneStep) = (b.engine, b.displaced[address], stepDebug(b, vcpu.id))
        if let displaced, engine == .int3 || engine == .hlt, let slot = BootLayout.outOfLineSlot(for: vcpu.id),
           let bytes = displaced.bytes(at: slot) {
            let cr3: UInt64
            do { cr3 = try vcpu.specialRegisters().cr3 } catch {
                hostFailure(vcpu, error, while: "reading cr3 to step over the probe at 0x\(String(address, radix: 16))")
                return nil
            }
            if cr3 == layout.cr3, unchanged(displaced) {
                guard var regs = registers(vcpu) else { return nil }
                do { try memory.write(physical: slot, bytes: bytes) } catch {
                    hostFailure(vcpu, error, while: "writing the out-of-line copy of 0x\(String(address, radix: 16)) at guest-physical 0x\(String(slot, radix: 16))")
                    return nil
                }
                regs.rip = slot
                guard setRegisters(vcpu, regs) else { return nil }
                do {
                    try vcpu.flushRegisters()
                    try vcpu.setGuestDebug(oneStep)
                } catch {
                    hostFailure(vcpu, error, while: "arming the out-of-line step over 0x\(String(address, radix: 16))")
                    return .outOfLine(address: address, slot: slot, displaced: displaced)
                }
                outOfLineSteps.add(1, ordering: .relaxed)
                if hasStepHook.load(ordering: .acquiring), let hook = outOfLineStepBegun.withLock({ $0 }) { hook(vcpu.id) }
                return .outOfLine(address: address, slot: slot, displaced: displaced)
            }
        }
        // With the trap byte gone, another vCPU could run through the location unseen:
        // hold them all out of the guest for the one step.
        let held = engine == .int3 || engine == .hlt
        if held {
            inPlaceSteps.add(1, ordering: .relaxed)
            rendezvous.acquire(.vcpu(vcpu.id))
        }
        // The physical address was checked when the location was armed. Read after the
        // rendezvous: the others may have changed the engine while this vCPU waited for it.
        let now = current
        var failed: KVMError?
        if let p = now.patches.patches[address] {
            do throws(KVMError) { try memory.write(physical: p.physical, bytes: [p.original]) } catch { failed = error }
        }
        let debug = stepDebug(now, vcpu.id)
        if let failed {
            hostFailure(vcpu, failed, while: "restoring the original byte at 0x\(String(address, radix: 16)) to step over it")
            return .over(address: address, held: held)
        }
        // The hit moved rip back onto the instruction: KVM must see it before it arms the step.
        do {
            try vcpu.flushRegisters()
            try vcpu.setGuestDebug(debug)
        } catch {
            hostFailure(vcpu, error, while: "arming the single step over 0x\(String(address, radix: 16))")
        }
        return .over(address: address, held: held)
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

    /// A call stepped out of line pushed its slot's return address: make it the real one.
    /// false: it failed and the run ends.
    func fixReturnAddress(_ vcpu: VCPU, rsp: UInt64, from pushed: UInt64, to real: UInt64) -> Bool {
        do {
            let cr3 = try vcpu.specialRegisters().cr3
            let p = try memory.translate(virtual: rsp, cr3: cr3).physical
            if try memory.readUInt64(physical: p) == pushed { try memory.writeUInt64(physical: p, real) }
            return true
        } catch {
            hostFailure(vcpu, error, while: "fixing the return address 0x\(String(real, radix: 16)) of a call stepped out of line")
            return false
        }
    }

    /// Leaves an out-of-line step unfinished (the machine stops, or the copy faulted): rip
    /// goes back from the slot to the instruction, so reports and dumps name the real place.
    /// Returns the stepping state that remains: nil for an out-of-line step, an in-place
    /// step unchanged (its end puts the trap back and releases the other vCPUs).
    func abandonOutOfLine(_ vcpu: VCPU, _ stepping: Stepping?) -> Stepping? {
        guard case let .outOfLine(address, slot, _)? = stepping else { return stepping }
        if var regs = registers(vcpu), regs.rip >= slot, regs.rip < slot + BootLayout.outOfLineSlotSize {
            regs.rip = regs.rip - slot + address
            _ = setRegisters(vcpu, regs)
        }
        applyBaseDebug(vcpu)
        return nil
    }

    /// Puts the trap back (if the location is still armed) and the vCPU's usual debug state.
    /// The other vCPUs are released whatever fails. false: something failed, the run ends.
    @discardableResult
    func endStepOver(_ vcpu: VCPU, address: UInt64, held: Bool) -> Bool {
        defer { if held { rendezvous.release() } }
        let b = current
        var failed: KVMError?
        if let p = b.patches.patches[address] {
            do throws(KVMError) { try memory.write(physical: p.physical, bytes: [b.patches.trap]) } catch { failed = error }
        }
        let debug = b.baseDebug(for: vcpu.id)
        if let failed {
            hostFailure(vcpu, failed, while: "putting the trap byte back at 0x\(String(address, radix: 16)) after stepping over it")
            return false
        }
        do { try vcpu.setGuestDebug(debug) } catch {
            hostFailure(vcpu, error, while: "re-arming the vCPU's breakpoints after stepping over 0x\(String(address, radix: 16))")
            return false
        }
        return true
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

    /// The debug setting for one single step of `vcpu` over a probed instruction: blocking
    /// interrupts where the host can, so none is taken in the middle of the step.
    func stepDebug(_ b: Breakpoints, _ vcpu: Int) -> GuestDebug {
        var d = b.stepOverDebug(for: vcpu)
        d.blockInterrupts = blocksInterruptsWhileStepping && platform.hasInterruptController
        return d
    }
}
