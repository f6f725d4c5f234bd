#if canImport(Glibc)
import Glibc
#endif

/// A value guarded by a mutex with a condition variable, for rendezvous between threads
/// (pthread-based, so ThreadSanitizer sees it; see `Locked`).
public final class ConditionLock<Value>: @unchecked Sendable {
    // SAFETY: `value` is only touched between lock and unlock of `mutex` (inside `withLock`,
    // whose body may `wait`, which re-acquires before returning). Both pthread objects are
    // heap-allocated once, so their addresses never change, and destroyed in deinit.
    private let mutex: UnsafeMutablePointer<pthread_mutex_t>
    private let cond: UnsafeMutablePointer<pthread_cond_t>
    private var value: Value

    public init(_ value: Value) {
        self.value = value
        mutex = .allocate(capacity: 1)
        mutex.initialize(to: pthread_mutex_t())
        pthread_mutex_init(mutex, nil)
        cond = .allocate(capacity: 1)
        cond.initialize(to: pthread_cond_t())
        pthread_cond_init(cond, nil)
    }

    deinit {
        pthread_cond_destroy(cond)
        cond.deallocate()
        pthread_mutex_destroy(mutex)
        mutex.deallocate()
    }

    /// Access to the value while holding the lock. Inside `body`, `Waiter.wait()` releases
    /// the lock until `broadcast()` and takes it back; re-check your condition after it.
    public func withLock<R>(_ body: (inout Value, Waiter) throws -> R) rethrows -> R {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return try body(&value, Waiter(mutex: mutex, cond: cond))
    }

    /// Wakes every thread waiting in `withLock`.
    public func broadcast() { pthread_cond_broadcast(cond) }

    /// Lets a `withLock` body wait for a broadcast.
    public struct Waiter {
        fileprivate let mutex: UnsafeMutablePointer<pthread_mutex_t>
        fileprivate let cond: UnsafeMutablePointer<pthread_cond_t>

        /// Releases the lock until a broadcast, then re-acquires it.
        public func wait() { pthread_cond_wait(cond, mutex) }

        /// Like `wait()`, but gives up at `deadline` (CLOCK_REALTIME); returns false then.
        public func wait(until deadline: timespec) -> Bool {
            var d = deadline
            return pthread_cond_timedwait(cond, mutex, &d) != ETIMEDOUT
        }

        /// Wakes every waiter (callable with the lock held).
        public func broadcast() { pthread_cond_broadcast(cond) }
    }
}
