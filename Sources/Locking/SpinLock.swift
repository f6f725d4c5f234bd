import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// A small unfair test-and-test-and-set spin lock for very short critical sections (the
/// record store's append), where a futex-based mutex costs more than the work it guards.
/// After a bounded number of spins it yields the CPU, so a preempted holder cannot stall
/// waiters for a whole time slice of busy spinning.
public struct SpinLock: ~Copyable, Sendable {
    private let locked = Atomic<Bool>(false)

    public init() {}

    @inline(__always)
    public func lock() {
        while true {
            if !locked.exchange(true, ordering: .acquiring) { return }
            var spins = 0
            while locked.load(ordering: .relaxed) {
                spins += 1
                if spins > 64 { sched_yield(); spins = 0 }
            }
        }
    }

    @inline(__always)
    public func unlock() { locked.store(false, ordering: .releasing) }

    @inline(__always)
    public func withLock<R>(_ body: () throws -> R) rethrows -> R {
        lock()
        defer { unlock() }
        return try body()
    }
}
