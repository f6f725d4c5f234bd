#if canImport(Glibc)
import Glibc
#endif

/// A value guarded by a mutex with a condition variable, for rendezvous between threads
/// (pthread-based, so ThreadSanitizer sees it; see `Locked`).
///
/// Waiting is only offered as `wait(until:)`, whose predicate gets the value afresh after
/// every wake-up. (Waiting inside an `inout` access would let the optimizer keep the value
/// in registers across the wait and never see another thread's change: seen in release.)
public final class ConditionLock<Value>: @unchecked Sendable {
    // SAFETY: `storage` is only touched between lock and unlock of `mutex`; `wait` releases
    // and re-acquires it inside pthread_cond_wait. `cond` and `storage` never move and are
    // freed in deinit.
    private let mutex = PthreadMutex()
    private let cond: UnsafeMutablePointer<pthread_cond_t>
    private let storage: UnsafeMutablePointer<Value>

    public init(_ value: Value) {
        storage = .allocate(capacity: 1)
        storage.initialize(to: value)
        cond = .allocate(capacity: 1)
        cond.initialize(to: pthread_cond_t())
        // Timed waits count on CLOCK_MONOTONIC, so a change of the wall clock moves no
        // deadline.
        var attributes = pthread_condattr_t()
        pthread_condattr_init(&attributes)
        pthread_condattr_setclock(&attributes, CLOCK_MONOTONIC)
        pthread_cond_init(cond, &attributes)
        pthread_condattr_destroy(&attributes)
    }

    deinit {
        pthread_cond_destroy(cond)
        cond.deallocate()
        storage.deinitialize(count: 1)
        storage.deallocate()
    }

    /// Runs `body` with exclusive access to the value, then wakes every waiter.
    @discardableResult
    public func withLock<R>(_ body: (inout Value) throws -> R) rethrows -> R {
        mutex.lock()
        defer {
            pthread_cond_broadcast(cond)
            mutex.unlock()
        }
        return try body(&storage.pointee)
    }

    /// Blocks until `predicate` returns true (it runs with the lock held, first at once and
    /// again after each wake-up, and may change the value), or until `timeout` has passed
    /// (measured on CLOCK_MONOTONIC). Returns whether the predicate was met. Wakes every
    /// waiter after.
    @discardableResult
    public func wait(until predicate: (inout Value) -> Bool, timeout: Duration? = nil) -> Bool {
        let deadline = timeout.map(monotonicDeadline(after:))
        mutex.lock()
        defer {
            pthread_cond_broadcast(cond)
            mutex.unlock()
        }
        while !predicate(&storage.pointee) {
            if var d = deadline {
                if pthread_cond_timedwait(cond, mutex.raw, &d) == ETIMEDOUT { return predicate(&storage.pointee) }
            } else {
                pthread_cond_wait(cond, mutex.raw)
            }
        }
        return true
    }

    /// Wakes every thread waiting in `wait(until:)` (callable from inside a predicate).
    public func broadcast() { pthread_cond_broadcast(cond) }
}

/// CLOCK_MONOTONIC now + `d` (a negative `d` is now), as pthread_cond_timedwait takes it.
private func monotonicDeadline(after d: Duration) -> timespec {
    var now = timespec()
    clock_gettime(CLOCK_MONOTONIC, &now)
    let (s, atto) = d.components
    guard s >= 0, atto >= 0 else { return now }
    let nanos = Int(atto / 1_000_000_000)
    var sec = now.tv_sec + Int(min(s, Int64(Int32.max)))
    var nsec = now.tv_nsec + nanos
    if nsec >= 1_000_000_000 { sec += 1; nsec -= 1_000_000_000 }
    return timespec(tv_sec: sec, tv_nsec: nsec)
}
