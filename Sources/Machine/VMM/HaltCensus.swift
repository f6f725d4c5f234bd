import Locking
import Synchronization

/// Finds a guest that can never run again on the pc platform: every vCPU halted with
/// interrupts off (a kernel that "powers off" without ACPI ends in `cli; hlt`), or waiting
/// for a start-up IPI nobody will send. KVM keeps such vCPUs inside `KVM_RUN`, so the
/// waiting thread asks each vCPU thread, through a kick, to report its MP state and IF.
public final class HaltCensus: Sendable {
    public enum State: Sendable, Equatable {
        /// `KVM_MP_STATE_HALTED` with IF clear: only an NMI, INIT or SMI could wake it.
        case haltedInterruptsOff
        /// An application processor never started (`UNINITIALIZED`/`INIT_RECEIVED`).
        case waitingForStart
        case running
    }

    private let asked = Atomic<Bool>(false)
    private let answers: ConditionLock<[State?]>

    init(vcpus: Int) { answers = ConditionLock(Array(repeating: nil, count: vcpus)) }

    /// Whether a census is being taken (read at every exit: one atomic load).
    var isAsked: Bool { asked.load(ordering: .acquiring) }

    /// vCPU `id`'s answer (the first one counts).
    func answer(_ id: Int, _ state: State) {
        answers.withLock { a in if a[id] == nil { a[id] = state } }
    }

    /// Takes a census: `kick` gets every vCPU out of KVM_RUN; waits up to `patience` for
    /// all answers. True when every vCPU answered and none runs, one at least halted.
    func guestCanNeverRun(kick: () -> Void, patience: Duration) -> Bool {
        answers.withLock { a in for i in a.indices { a[i] = nil } }
        asked.store(true, ordering: .releasing)
        kick()
        let all = answers.wait(until: { $0.allSatisfy { $0 != nil } }, timeout: patience)
        asked.store(false, ordering: .releasing)
        let a = answers.withLock { $0 }
        return all && a.allSatisfy { $0 != .running } && a.contains { $0 == .haltedInterruptsOff }
    }

    /// What `mpState` and `rflags` say about a vCPU.
    public static func state(mpState: UInt32, rflags: UInt64) -> State {
        switch mpState {
        case 3 where rflags & 0x200 == 0: .haltedInterruptsOff     // KVM_MP_STATE_HALTED, IF clear
        case 1, 2: .waitingForStart                               // UNINITIALIZED, INIT_RECEIVED
        default: .running
        }
    }
}
