import FlowTrace
import KVM

/// Where a kernel's software probes wait until it has finished rewriting its own code.
///
/// Linux patches its text while it boots (alternatives, paravirt calls, retpolines and
/// returns, ftrace's `call __fentry__` turned into NOPs, after checking the bytes): a trap
/// byte written before that is overwritten or trips the kernel's checks. With a gate, the
/// patching engines (int3, hlt) take their locations but write nothing; a hardware
/// breakpoint at the gate (a function the kernel reaches once that is done, e.g.
/// `rest_init`) arms them when the first vCPU gets there, through that vCPU's page tables,
/// after checking each location's byte against the image's.
public struct ProbeGate: Sendable {
    public var name: String
    public var address: UInt64
    /// The byte the kernel image has at a location (nil: not in the image).
    public var expectedByte: @Sendable (UInt64) -> UInt8?
    public init(name: String, address: UInt64, expectedByte: @escaping @Sendable (UInt64) -> UInt8?) {
        self.name = name; self.address = address; self.expectedByte = expectedByte
    }
}

/// A probe location that no longer traps, and why.
public struct LostProbe: Sendable, Equatable, CustomStringConvertible {
    public var address: UInt64
    public var location: String
    public var reason: String
    public var description: String { "\(location) (0x\(String(address, radix: 16))): \(reason)" }
}

extension Machine {
    /// Software probes armed from now on wait for `gate` (see `ProbeGate`). Call before the
    /// run; hardware and step probes are not affected.
    public func deferSoftwareProbes(until gate: ProbeGate) {
        probeGate.withLock { $0 = gate }
    }

    /// Whether the gate is still closed with probes waiting behind it.
    public var probesWaitingForGate: Int { current.pending.count }

    /// The probes lost so far.
    public var lostProbes: [LostProbe] { lost.withLock { $0 } }

    func noteLost(_ address: UInt64, _ reason: String) {
        let l = LostProbe(address: address, location: symbolizer.describe(address), reason: reason)
        lost.withLock { $0.append(l) }
    }

    /// On the vCPU thread that reached the gate: parks the others, patches every pending
    /// location through this vCPU's paging, removes the gate.
    func openGate(from vcpu: VCPU) {
        let gate = probeGate.withLock { $0 }
        withControl(from: vcpu.id) {
            let paging: PagingMode
            do throws(KVMError) { paging = try vcpu.specialRegisters().paging } catch {
                hostFailure(vcpu, error, while: "reading the paging registers at the probe gate")
                return
            }
            let debugs = updateTable { (b: inout Breakpoints) -> [GuestDebug] in
                for address in b.pending.sorted() {
                    do throws(KVMError) {
                        let p = try memory.translate(virtual: address, paging: paging).physical
                        let current = try memory.read(physical: p, count: 1)[0]
                        if let want = gate?.expectedByte(address), want != current {
                            noteLost(address, "not armed: the guest has 0x\(String(current, radix: 16)) there where the kernel image has 0x\(String(want, radix: 16)) (the kernel rewrote that instruction while booting, or it does not run at its link address: KASLR)")
                            b.owners[address] = nil
                            continue
                        }
                        var bytes = [current]
                        for k in 1..<4 {
                            guard let more = try? memory.read(virtual: address &+ UInt64(k), count: 1, paging: paging) else { break }
                            bytes.append(more[0])
                        }
                        b.flagLoads[address] = OwnTrapFlag.flagsSlot(bytes)
                        b.waitsForInterrupt[address] = OwnTrapFlag.waitsForInterrupt(bytes)
                        if let trap = b.patches.insert(address, physical: p, current: current) {
                            try memory.write(physical: p, bytes: [trap])
                        }
                    } catch {
                        noteLost(address, "not armed at \(gate?.name ?? "the gate"): \(error.description) (\(paging))")
                        b.owners[address] = nil
                    }
                }
                b.pending = []
                b.gate = nil
                gatePassed.store(true, ordering: .relaxed)
                if b.owners.isEmpty { b.engine = nil }
                return (0..<vcpus.count).map { b.baseDebug(for: $0) }
            }
            for (v, d) in zip(vcpus, debugs) {
                do throws(KVMError) { try v.setGuestDebug(d) } catch {
                    hostFailure(vcpu, error, while: "setting vCPU \(v.id)'s breakpoints at the probe gate")
                    return
                }
            }
        }
    }
}
