import FlowTrace
import KVM

// The runner: one thread per vCPU entering the guest, handing each exit to the exit
// handler and performing the outcome.
extension Machine {
    func runLoop(_ vcpu: VCPU) {
        let id = vcpu.id
        let liveSlot = live[id]
        let syncsRIP = vcpu.usesSyncRegisters
        rendezvous.gate(id, starting: true)
        defer { rendezvous.finished(id) }
        var stepping: Stepping?
        var previousRip: UInt64?   // step engine: the instruction just executed
        var reinjected = false
        var tally = ExitTally()
        defer { exitTally.withLock { $0.add(tally) } }
        /// The guest's own TF around the instruction being stepped over (nil: not involved).
        var ownTrapFlag: OwnTrapFlag?
        defer {
            if case let .over(address, held)? = stepping { endStepOver(vcpu, address: address, held: held) }
            if case .outOfLine? = stepping { _ = abandonOutOfLine(vcpu, stepping) }
        }
        while !stopRequested.load(ordering: .acquiring) {
            if stepping == nil, hasPendingDisarms.load(ordering: .acquiring) { processPendingDisarms(from: vcpu) }
            if rendezvous.gate(id), case let .outOfLine(address, _, _)? = stepping {
                // Whoever held the rendezvous may have set every vCPU's debug state (arming,
                // disarming): this one is in the middle of stepping a copy, which must still
                // end after one instruction, or it would run on past the copy.
                do { try vcpu.setGuestDebug(stepOver.debug(current, vcpu: id, address: address)) } catch {
                    hostFailure(vcpu, error, while: "re-arming the single step of an out-of-line step-over")
                    return
                }
            }
            if stopRequested.load(ordering: .acquiring) { break }
            if stepping == nil, ripChecks.withLock({ c in defer { c[id] = false }; return c[id] }) {
                // The step engine was just armed: the instruction at rip runs next.
                previousRip = nil
                if let regs = registers(vcpu), case .halt = probeHits(vcpu, at: nil, .before, regs: regs) {
                    haltHere(vcpu, address: regs.rip, .before, rip: regs.rip)
                }
            }
            let exit: VMExit
            do { exit = try vcpu.run() } catch {
                stepping = abandonOutOfLine(vcpu, stepping)
                hostFailure(vcpu, error, while: "running the guest")
                return
            }
            tally.count(exit)
            liveSlot.exits.add(1, ordering: .relaxed)
            if syncsRIP, let rip = vcpu.syncedRIP { liveSlot.rip.store(rip, ordering: .relaxed) }
            if exit == .interrupted, census.isAsked { answerCensus(vcpu) }
            if reinjected {
                // The injection is done; the debug state it rode on comes back without it.
                reinjected = false
                do { try vcpu.setGuestDebug(debugState(id, stepping: stepping)) } catch {
                    hostFailure(vcpu, error, while: "setting the vCPU's breakpoints after re-injecting the guest's #BP")
                    return
                }
            }
            switch exits.handle(exit, vcpu: vcpu, table: current, stepping: stepping) {
            case .resume:
                continue
            case let .end(ending):
                stepping = abandonOutOfLine(vcpu, stepping)
                finish(ending)
                return
            case .vcpuHalted:
                // The guest's own hlt ends this vCPU (after finishing a step-over of it).
                if case let .over(a, held)? = stepping {
                    stepping = nil
                    endStepOver(vcpu, address: a, held: held)
                }
                vcpuHalted()
                return
            case let .fault(cause):
                stepping = abandonOutOfLine(vcpu, stepping)
                finish(vcpu, cause)
                return
            case let .hostFailure(error, doing):
                stepping = abandonOutOfLine(vcpu, stepping)
                hostFailure(vcpu, error, while: doing)
                return
            case let .trapHit(address, regs):
                // Our trap: back to the probed instruction, hit, then step over it.
                var r = regs
                r.rip = address
                guard setRegisters(vcpu, r), let next = hitBefore(vcpu, at: address, regs: r) else { return }
                (stepping, ownTrapFlag) = next
            case let .hardwareHit(address, regs):
                guard let next = hitBefore(vcpu, at: address, regs: regs) else { return }
                (stepping, ownTrapFlag) = next
            case .stepAgain:
                continue
            case let .outOfLineDone(address, slot, displaced, regs):
                stepping = nil
                var r = regs
                r.rip = displaced.relocated(rip: regs.rip, slot: slot)
                if let (pushed, real) = displaced.returnAddresses(slot: slot) {
                    guard fixReturnAddress(vcpu, rsp: r.rsp, from: pushed, to: real) else { return }
                }
                guard setRegisters(vcpu, r) else { return }
                let action = probeHits(vcpu, at: address, .after, regs: r)
                applyBaseDebug(vcpu)
                if let own = ownTrapFlag {
                    ownTrapFlag = nil
                    guard restoreOwnTrapFlag(vcpu, own) else { return }
                }
                if case .halt = action { haltHere(vcpu, address: address, .after, rip: r.rip) }
            case let .stepOverDone(address, held, regs):
                // The single step over a probed instruction is done: after-exec hits.
                stepping = nil
                let action = probeHits(vcpu, at: address, .after, regs: regs)
                // Only the payload platform ends a vCPU at its own hlt (on pc it is done in place).
                let halted = platform == .payload ? executedHalt(vcpu, at: address, rip: regs.rip) : false
                guard endStepOver(vcpu, address: address, held: held), let halted else { return }
                if let own = ownTrapFlag {
                    ownTrapFlag = nil
                    guard restoreOwnTrapFlag(vcpu, own) else { return }
                }
                if case .halt = action { haltHere(vcpu, address: address, .after, rip: regs.rip) }
                if halted { vcpuHalted(); return }
            case let .stepEngine(regs):
                // rip is the next instruction; previousRip the one just executed (if it
                // retired: a restarted instruction leaves rip in place).
                if regs.rip == previousRip { continue }
                if let p = previousRip, case .halt = probeHits(vcpu, at: p, .after, regs: regs) { haltHere(vcpu, address: p, .after, rip: regs.rip) }
                if let p = previousRip, platform == .payload {
                    guard let halted = executedHalt(vcpu, at: p, rip: regs.rip) else { return }
                    if halted { vcpuHalted(); return }
                }
                if case .halt = probeHits(vcpu, at: regs.rip, .before, regs: regs) { haltHere(vcpu, address: regs.rip, .before, rip: regs.rip) }
                previousRip = regs.rip
            case .gateReached:
                // Every vCPU parked; the pending probes patched; the gate's DR0 removed.
                openGate(from: vcpu)
            case let .reinjectBreakpoint(address):
                // Not ours: deliver it to the guest as if we were not there. Outside a step
                // over a probe, the frame is built here where that applies (see
                // OwnBreakpointDelivery: KVM's injection decodes the instruction again).
                tally.reinjectedBreakpoints += 1
                if stepping == nil {
                    do {
                        if try OwnBreakpointDelivery(memory: memory).deliver(vcpu, at: address) {
                            tally.breakpointsDelivered += 1
                            continue
                        }
                    } catch {
                        finish(vcpu, .exitFailed(exit, error, while: "delivering the guest's own #BP"))
                        return
                    }
                }
                // Inside a step over a probe (the guest's int3 is the probed instruction) the
                // step goes on: it ends at the guest's #BP handler.
                var d = debugState(id, stepping: stepping)
                d.injectBreakpoint = true
                do { try vcpu.setGuestDebug(d) } catch {
                    finish(vcpu, .exitFailed(exit, error, while: "re-injecting the guest's own #BP"))
                    return
                }
                reinjected = true
            case let .reinjectDebug(dr6):
                // The guest's own #DB, with the DR6 the exit reported.
                do { try injectDebugException(vcpu) { _ in dr6 } } catch {
                    finish(vcpu, .exitFailed(exit, error, while: "re-injecting the guest's own #DB"))
                    return
                }
                tally.reinjectedDebugs += 1
            }
        }
    }

    /// Delivers a #DB to the guest as the CPU would: DR6 as `dr6` makes it from the current
    /// one, the exception injected through `KVM_SET_VCPU_EVENTS` (the guest-debug flag
    /// `KVM_GUESTDBG_INJECT_DB` is not delivered on every host: PVM drops it).
    func injectDebugException(_ vcpu: VCPU, dr6: (UInt64) -> UInt64) throws(KVMError) {
        var dr = try vcpu.debugRegisters()
        dr.dr6 = dr6(dr.dr6)
        try vcpu.setDebugRegisters(dr)
        var e = try vcpu.events()
        e.exceptionInjected = true
        e.exceptionNumber = 1
        e.exceptionHasErrorCode = false
        try vcpu.setEvents(e)
    }

    /// A probe's hit before its instruction (rip on it), then the instruction: stepped over
    /// (the stepping state and the guest's own TF to give back), or done by flowtrace for an
    /// instruction that waits for an interrupt on the pc platform (nothing to step). nil: a
    /// host call failed and the run ends.
    func hitBefore(_ vcpu: VCPU, at address: UInt64, regs: Registers) -> (Stepping?, OwnTrapFlag?)? {
        if case .halt = probeHits(vcpu, at: address, .before, regs: regs) { haltHere(vcpu, address: address, .before, rip: address) }
        if platform.hasInterruptController, let length = current.waitsForInterrupt[address] {
            return waitInPlace(vcpu, at: address, length: length) ? (nil, nil) : nil
        }
        var own: OwnTrapFlag?
        guard readOwnTrapFlag(vcpu, regs: regs, address: address, into: &own) else { return nil }
        return (beginStepOver(vcpu, address: address), own)
    }

    /// The debug state vCPU `id` runs with now: one step's while stepping over a probe, else
    /// the engine's usual one.
    func debugState(_ id: Int, stepping: Stepping?) -> GuestDebug {
        switch stepping {
        case let .over(address, _)?, let .outOfLine(address, _, _)?: stepOver.debug(current, vcpu: id, address: address)
        case nil: current.baseDebug(for: id)
        }
    }

    /// A probe on an instruction that waits for an interrupt (hlt, mwait), on the pc
    /// platform: instead of a step over it (a single step over hlt with the in-kernel
    /// irqchip loses the interrupt that ends it on some hosts, and the vCPU then waits for
    /// ever), flowtrace does what it does: rip past it, after-hits (the vCPU as it starts
    /// to wait), and the vCPU halted in KVM until its next interrupt (`KVM_SET_MP_STATE`).
    /// The trap byte or breakpoint stays. false: it failed and the run ends.
    func waitInPlace(_ vcpu: VCPU, at address: UInt64, length: UInt64) -> Bool {
        do throws(KVMError) {
            var regs = try vcpu.registers()
            regs.rip = address &+ length
            try vcpu.setRegisters(regs)
            if case .halt = probeHits(vcpu, at: address, .after, regs: regs) { haltHere(vcpu, address: address, .after, rip: regs.rip) }
            try vcpu.flushRegisters()
            // The probe may sit in an interrupt shadow (sti; hlt): the instruction is done,
            // so is the shadow, or no interrupt could end the wait.
            var events = try vcpu.events()
            if events.interruptShadow != 0 {
                events.interruptShadow = 0
                try vcpu.setEvents(events)
            }
            try vcpu.setMPState(3)   // KVM_MP_STATE_HALTED
            return true
        } catch {
            hostFailure(vcpu, error, while: "halting the vCPU at the probed hlt at 0x\(String(address, radix: 16))")
            return false
        }
    }

    /// false: it failed and the run ends.
    func readOwnTrapFlag(_ vcpu: VCPU, regs: Registers, address: UInt64, into own: inout OwnTrapFlag?) -> Bool {
        let (flag, failure) = stepOver.ownTrapFlag(vcpu, regs: regs, address: address, table: current)
        if let failure { hostFailure(vcpu, failure.error, while: failure.doing); return false }
        own = flag
        return true
    }

    /// After a step over a probe (base debug state back): gives the guest its own TF again
    /// and the single-step #DB it raised for the instruction. false: it failed, the run ends.
    func restoreOwnTrapFlag(_ vcpu: VCPU, _ own: OwnTrapFlag) -> Bool {
        do {
            if own.after {
                var regs = try vcpu.registers()
                regs.rflags |= X86Flags.trap
                try vcpu.setRegisters(regs)
            }
            // A single-step trap: DR6.BS set, no breakpoint bits.
            if own.before { try injectDebugException(vcpu) { $0 & ~0xF | 0x4000 } }
            return true
        } catch {
            hostFailure(vcpu, error, while: "giving the guest back its own trap flag after stepping over a probe")
            return false
        }
    }

    func registers(_ vcpu: VCPU) -> Registers? {
        do { return try vcpu.registers() } catch {
            hostFailure(vcpu, error, while: "reading the registers at an exit")
            return nil
        }
    }

    /// false: it failed and the run ends.
    func setRegisters(_ vcpu: VCPU, _ regs: Registers) -> Bool {
        do { try vcpu.setRegisters(regs); return true } catch {
            hostFailure(vcpu, error, while: "setting the registers at a probe hit")
            return false
        }
    }

    /// Tells the census whether this vCPU can run again (its MP state and IF).
    func answerCensus(_ vcpu: VCPU) {
        do {
            let mp = try vcpu.mpState()
            let flags = try vcpu.registers().rflags
            census.answer(vcpu.id, HaltCensus.state(mpState: mp, rflags: flags))
        } catch {
            // Unknown: counted as running, so nothing is concluded from it.
            census.answer(vcpu.id, .running)
        }
    }
}
