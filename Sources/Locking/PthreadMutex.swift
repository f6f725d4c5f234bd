#if canImport(Glibc)
import Glibc
#endif

/// A heap-allocated `pthread_mutex_t` (its address must never change), shared by `Locked`
/// and `ConditionLock`.
final class PthreadMutex: @unchecked Sendable {
    // SAFETY: allocated and initialized once, destroyed and freed in deinit; pthread
    // functions do their own synchronization.
    let raw: UnsafeMutablePointer<pthread_mutex_t>

    init() {
        raw = .allocate(capacity: 1)
        raw.initialize(to: pthread_mutex_t())
        pthread_mutex_init(raw, nil)
    }

    deinit {
        pthread_mutex_destroy(raw)
        raw.deallocate()
    }

    @inline(__always) func lock() { pthread_mutex_lock(raw) }
    @inline(__always) func unlock() { pthread_mutex_unlock(raw) }
}
