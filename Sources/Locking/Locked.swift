#if canImport(Glibc)
import Glibc
#endif

/// A value guarded by a blocking mutex, for control paths (not per-hit work).
///
/// Built on `pthread_mutex_t` rather than `Synchronization.Mutex` because ThreadSanitizer
/// intercepts pthread mutexes but cannot see the futex calls inside the standard library's
/// Mutex on Linux, and then reports every access it guards as a race (seen with Swift
/// 6.3.1). The concurrency tests run under `--sanitize=thread`, so locks must be visible.
public final class Locked<Value>: @unchecked Sendable {
    // SAFETY: `value` is only touched inside `withLock`, between lock and unlock of `mutex`;
    // `mutex` is heap-allocated once so its address never changes, and freed in deinit.
    private let mutex: UnsafeMutablePointer<pthread_mutex_t>
    private var value: Value

    public init(_ value: Value) {
        self.value = value
        mutex = .allocate(capacity: 1)
        mutex.initialize(to: pthread_mutex_t())
        pthread_mutex_init(mutex, nil)
    }

    deinit {
        pthread_mutex_destroy(mutex)
        mutex.deallocate()
    }

    /// Runs `body` with exclusive access to the value.
    @inline(__always)
    public func withLock<R, E: Error>(_ body: (inout Value) throws(E) -> R) throws(E) -> R {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return try body(&value)
    }
}
