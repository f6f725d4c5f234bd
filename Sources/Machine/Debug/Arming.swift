import FlowTrace
import KVM

// The TraceTarget side: arming and disarming probe locations with the machine's engine,
// every vCPU parked meanwhile; the breakpoint table is replaced whole each time.
extension Machine {
    public var vcpuCount: Int { vcpus.count }

    /// Arms `locations` for `module` with the machine's engine, all vCPUs parked meanwhile.
    /// A location whose address is not mapped is an error naming it.
    public func arm(_ module: TraceModule, locations: [ArmedLocation], vcpus selection: VCPUSelection) throws(TraceError) {
        try withControl(from: nil) { () throws(TraceError) in try armParked(module, locations, selection) }
    }

    /// Disarms `module`'s locations, all vCPUs parked meanwhile. Every location and vCPU is
    /// disarmed even when one fails; the error names each failure.
    public func disarm(_ module: TraceModule) throws(TraceError) {
        let failures = withControl(from: nil) { disarmParked(module) }
        if !failures.isEmpty {
            throw TraceError.targetFailure(failures.map { "\($0.error.description) while \($0.doing)" }.joined(separator: "; "))
        }
    }

    /// Called on a vCPU thread: the module is disarmed by that thread before it runs again.
    public func moduleReachedHitLimit(_ module: TraceModule) {
        pendingDisarms.withLock { $0.append(module) }
        hasPendingDisarms.store(true, ordering: .releasing)
    }

    func processPendingDisarms(from vcpu: VCPU) {
        let modules = pendingDisarms.withLock { p -> [TraceModule] in
            defer { p.removeAll() }
            return p
        }
        hasPendingDisarms.store(false, ordering: .releasing)
        guard !modules.isEmpty else { return }
        let failures = withControl(from: vcpu.id) { modules.flatMap { disarmParked($0) } }
        if let f = failures.first { hostFailure(vcpu, f.error, while: f.doing + " (disarming a module at its hit limit)") }
    }

    /// Runs `body` with every vCPU out of the guest (unless the caller already holds them:
    /// a machine stopped at a halt).
    func withControl<R, E: Error>(from vcpu: Int?, _ body: () throws(E) -> R) throws(E) -> R {
        let alreadyHeld = vcpu == nil && rendezvous.isHeldByController
        if !alreadyHeld { rendezvous.acquire(vcpu.map { .vcpu($0) } ?? .controller) }
        defer { if !alreadyHeld { rendezvous.release() } }
        return try body()
    }

    func armParked(_ module: TraceModule, _ locations: [ArmedLocation], _ selection: VCPUSelection) throws(TraceError) {
        // Addresses are translated as vCPU 0 translates them now: through its current page
        // tables, or as physical addresses while its paging is off (a 32-bit kernel entry).
        let paging: PagingMode
        do { paging = try vcpus[0].specialRegisters().paging } catch {
            throw TraceError.targetFailure("\(error.description) while reading vCPU 0's paging registers to arm probes")
        }
        var physical: [(location: ArmedLocation, physical: UInt64)] = []
        /// Locations not mapped now: fine for the hardware engines (linear addresses), not for patching.
        var unmapped: [(location: ArmedLocation, error: KVMError)] = []
        // The first bytes of each location's instruction (the original under a patch).
        var leadingBytes: [(location: ArmedLocation, bytes: [UInt8])] = []
        let b0 = current
        for l in locations {
            do throws(KVMError) {
                let p = try memory.translate(virtual: l.address, paging: paging).physical
                // KVM's own MMU as a cross-check (where the host answers KVM_TRANSLATE).
                if let k = try? vcpus[0].translate(linear: l.address), k != p {
                    throw KVMError.invalidArgument("flowtrace's page walk gives 0x\(String(p, radix: 16)) but KVM_TRANSLATE gives 0x\(String(k, radix: 16)) (a bug of flowtrace, please report it)")
                }
                var bytes = try memory.read(physical: p, count: 1)
                if let o = b0.patches.original(at: l.address) { bytes[0] = o }
                for k in 1..<4 {
                    guard let more = try? memory.read(virtual: l.address &+ UInt64(k), count: 1, paging: paging) else { break }
                    bytes.append(more[0])
                }
                leadingBytes.append((l, bytes))
                physical.append((l, p))
            } catch {
                unmapped.append((l, error))
            }
        }
        func unmappedError(_ u: (location: ArmedLocation, error: KVMError), engine: BreakpointEngine?) -> TraceError {
            let hint = engine.map { " for the \($0) engine, which patches guest memory; the hw engine takes linear addresses the guest maps later" } ?? ""
            return TraceError.target("probe at 0x\(String(u.location.address, radix: 16)) (\(symbolizer.describe(u.location.address))): \(u.error.description) (\(paging))\(hint)")
        }
        let debugs = try updateTable { (b: inout Breakpoints) throws(TraceError) -> [GuestDebug] in
            let addresses = Set(b.owners.keys).union(locations.map(\.address))
            if b.engine == nil {
                do throws(MachineError) {
                    let (e, why) = try configuration.engine.resolve(locations: addresses.count, support: engineSupport)
                    b.engine = e
                    b.engineReason = why
                    b.patches = PatchTable(trap: e.trapByte ?? X86Opcode.hlt)
                } catch {
                    throw TraceError.target(error.description)
                }
            } else if let e = b.engine, let cap = e.capacity, addresses.count > cap {
                throw TraceError.target(MachineError.tooManyLocations(e, count: addresses.count, capacity: cap).description)
            }
            // Behind a closed gate the patching engines only take their locations.
            if b.engine?.trapByte != nil, let gate = probeGate.withLock({ $0 }), b.gate != nil || !gatePassed.load(ordering: .relaxed) {
                b.gate = gate.address
                for l in locations {
                    b.owners[l.address, default: []].append(.init(module: module, index: l.index, timing: l.timing, vcpus: selection))
                    if !b.patches.isPatched(l.address) { b.pending.insert(l.address) }
                }
                return (0..<vcpus.count).map { b.baseDebug(for: $0) }
            }
            // Patching needs the physical page now; hw and step take linear addresses.
            if let u = unmapped.first, b.engine?.trapByte != nil {
                throw unmappedError(u, engine: b.engine)
            }
            for l in locations {
                b.owners[l.address, default: []].append(.init(module: module, index: l.index, timing: l.timing, vcpus: selection))
            }
            for (l, bytes) in leadingBytes {
                b.flagLoads[l.address] = OwnTrapFlag.flagsSlot(bytes)
                b.waitsForInterrupt[l.address] = OwnTrapFlag.waitsForInterrupt(bytes)
            }
            // USE_SW_BP goes on every vCPU before the first byte is written.
            let debugs = (0..<vcpus.count).map { b.baseDebug(for: $0) }
            return debugs
        }
        // From here on a failure disarms what was armed, so the module is armed wholly or not at all.
        func undo(_ failure: String) -> TraceError {
            let more = disarmParked(module).map { "; then \($0.error.description) while \($0.doing)" }.joined()
            return TraceError.targetFailure(failure + more)
        }
        for (v, d) in zip(vcpus, debugs) {
            do { try v.setGuestDebug(d) } catch { throw undo("\(error.description) while arming vCPU \(v.id)'s breakpoints") }
        }
        let engine = current.engine
        if engine?.trapByte != nil, current.gate == nil {
            let failure = updateTable { (b: inout Breakpoints) -> String? in
                for (l, p) in physical {
                    do throws(KVMError) {
                        let current = try memory.read(physical: p, count: 1)[0]
                        if let trap = b.patches.insert(l.address, physical: p, current: current) {
                            // Decoded before the trap byte goes in, for out-of-line stepping.
                            if paging == .level4(cr3: layout.cr3), let d = stepOver.displacedInstruction(at: l.address, cr3: layout.cr3) {
                                b.displaced[l.address] = d
                            }
                            try memory.write(physical: p, bytes: [trap])
                        }
                    } catch {
                        return "\(error.description) while patching the probe at 0x\(String(l.address, radix: 16))"
                    }
                }
                return nil
            }
            if let failure { throw undo(failure) }
        }
        if engine == .step {
            ripChecks.withLock { c in for i in c.indices where selection.contains(i) { c[i] = true } }
        }
    }

    /// Changes the breakpoint table: `body` edits a copy, which then replaces it (also when
    /// `body` returns a failure; not when it throws). Every vCPU must be parked; guest bytes
    /// `body` patches change under `published`'s lock, so `readCode` sees them with the table.
    func updateTable<R, E: Error>(_ body: (inout Breakpoints) throws(E) -> R) throws(E) -> R {
        try published.withLock { (p: inout BreakpointTable) throws(E) -> R in
            var b = p.value
            let r = try body(&b)
            publish(b, into: &p)
            return r
        }
    }

    /// Removes `module` everywhere; returns what failed (every location and vCPU is tried).
    func disarmParked(_ module: TraceModule) -> [(error: KVMError, doing: String)] {
        var failures: [(error: KVMError, doing: String)] = []
        let debugs = updateTable { (b: inout Breakpoints) -> [GuestDebug] in
            for (address, list) in b.owners {
                let kept = list.filter { $0.module !== module }
                if kept.isEmpty {
                    b.owners[address] = nil
                    b.pending.remove(address)
                    b.flagLoads[address] = nil
                    b.waitsForInterrupt[address] = nil
                    if let p = b.patches.patches[address] {
                        do throws(KVMError) {
                            let current = try memory.read(physical: p.physical, count: 1)[0]
                            if let original = b.patches.remove(address, current: current) {
                                try memory.write(physical: p.physical, bytes: [original])
                            } else {
                                // Not our trap byte any more: the guest rewrote it; it stays.
                                noteLost(address, "lost: the guest rewrote the code there (the byte is now 0x\(String(current, radix: 16))); nothing was restored")
                            }
                        } catch {
                            // The byte stays as it is; the table forgets it, so no hit is taken for it.
                            _ = b.patches.remove(address, current: b.patches.trap)
                            failures.append((error, "restoring the original byte of the probe at 0x\(String(address, radix: 16))"))
                        }
                        b.displaced[address] = nil
                    }
                } else {
                    b.owners[address] = kept
                }
            }
            if b.pending.isEmpty { b.gate = nil }
            if b.owners.isEmpty { b.engine = nil }
            return (0..<vcpus.count).map { b.baseDebug(for: $0) }
        }
        for (v, d) in zip(vcpus, debugs) {
            do { try v.setGuestDebug(d) } catch { failures.append((error, "disarming vCPU \(v.id)'s breakpoints")) }
        }
        return failures
    }
}
