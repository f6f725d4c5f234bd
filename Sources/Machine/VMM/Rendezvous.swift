import Locking
import Synchronization

/// Brings every vCPU out of `KVM_RUN` and keeps it out while one party works alone: a
/// control thread changing breakpoints, a vCPU stepping over a patched byte, or a caller
/// inspecting a machine stopped at a halt.
///
/// Each vCPU thread calls `gate` before every `KVM_RUN`; it blocks there while someone
/// else holds the rendezvous. `acquire` kicks the other vCPUs and returns once each is
/// parked (waiting in `gate` or `acquire`), not started, or finished.
final class Rendezvous: Sendable {
    enum Holder: Equatable, Sendable {
        case vcpu(Int)
        case controller
    }

    private struct State {
        var holder: Holder?
        /// Per vCPU: outside KVM_RUN and not going back in (waiting, not started or done).
        var parked: [Bool]
    }

    private let state: ConditionLock<State>
    /// Fast path for `gate`: false while nobody holds the rendezvous.
    private let held = Atomic<Bool>(false)
    private let kick: @Sendable (Int) -> Void
    private let count: Int

    /// `kick(i)` must make vCPU i leave or skip `KVM_RUN` soon.
    init(vcpus: Int, kick: @escaping @Sendable (Int) -> Void) {
        count = vcpus
        state = ConditionLock(State(holder: nil, parked: Array(repeating: true, count: vcpus)))
        self.kick = kick
    }

    /// Called by vCPU `id` before each `KVM_RUN` (and once when its thread starts).
    /// Returns whether it may have waited for another holder, who may have changed the
    /// vCPU's debug state meanwhile.
    @inline(__always) @discardableResult
    func gate(_ id: Int, starting: Bool = false) -> Bool {
        guard starting || held.load(ordering: .acquiring) else { return false }
        let state = self.state
        state.wait(until: { s in
            if let h = s.holder, h != .vcpu(id) {
                // Tell the holder, who waits for every vCPU to park.
                if !s.parked[id] { s.parked[id] = true; state.broadcast() }
                return false
            }
            s.parked[id] = false
            return true
        })
        return true
    }

    /// vCPU `id` is leaving its run loop for good.
    func finished(_ id: Int) {
        state.withLock { $0.parked[id] = true }
    }

    /// Takes the rendezvous for `who`; returns when every other vCPU is parked.
    func acquire(_ who: Holder) {
        let state = self.state
        state.wait(until: { s in
            if s.holder != nil {
                // Waiting here counts as parked for the current holder.
                if case let .vcpu(i) = who, !s.parked[i] { s.parked[i] = true; state.broadcast() }
                return false
            }
            s.holder = who
            if case let .vcpu(i) = who { s.parked[i] = false }
            return true
        })
        held.store(true, ordering: .releasing)
        for i in 0..<count where who != .vcpu(i) { kick(i) }
        let count = self.count
        state.wait(until: { s in (0..<count).allSatisfy { s.parked[$0] || who == .vcpu($0) } })
    }

    /// Hands a held rendezvous from vCPU `id` to the controller (a halt): `id` counts as
    /// parked from now on and waits in its next `gate`.
    func handOver(from id: Int) {
        state.withLock { s in
            s.holder = .controller
            s.parked[id] = true
        }
    }

    /// Releases the rendezvous; parked vCPUs resume.
    func release() {
        state.withLock { s in
            s.holder = nil
            held.store(false, ordering: .releasing)
        }
    }

    /// Whether anyone holds (or is taking) the rendezvous.
    var isHeld: Bool { held.load(ordering: .acquiring) }

    /// Whether the controller holds the rendezvous (the machine is stopped at a halt).
    var isHeldByController: Bool { state.withLock { $0.holder == .controller } }
}
