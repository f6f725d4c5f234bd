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
    // SAFETY: `value` is only touched inside `withLock`, between lock and unlock of `mutex`.
    private let mutex = PthreadMutex()
    private var value: Value

    public init(_ value: Value) {
        self.value = value
    }

    /// Runs `body` with exclusive access to the value.
    @inline(__always)
    public func withLock<R, E: Error>(_ body: (inout Value) throws(E) -> R) throws(E) -> R {
        mutex.lock()
        defer { mutex.unlock() }
        return try body(&value)
    }
}
