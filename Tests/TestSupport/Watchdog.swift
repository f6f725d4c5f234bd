import Foundation

/// Runs `body` on its own thread and waits for it at most `seconds`. A body still running
/// then (a deadlock) ends the whole test process with a message naming `what`, instead of
/// hanging the suite. Errors thrown by `body` are rethrown.
public func withWatchdog(_ seconds: Double, _ what: String, _ body: @escaping @Sendable () throws -> Void) throws {
    let done = DispatchSemaphore(value: 0)
    let failure = LockedBox<(any Error)?>(nil)
    Thread {
        do { try body() } catch { failure.set(error) }
        done.signal()
    }.start()
    if done.wait(timeout: .now() + seconds) == .timedOut {
        FileHandle.standardError.write(Data("watchdog: \(what) still running after \(seconds) s: deadlock\n".utf8))
        abort()
    }
    if let e = failure.get() { throw e }
}

/// A value shared between threads under a lock.
public final class LockedBox<T>: @unchecked Sendable {
    // SAFETY: `value` is only touched under `lock`.
    private let lock = NSLock()
    private var value: T
    public init(_ v: T) { value = v }
    public func get() -> T { lock.lock(); defer { lock.unlock() }; return value }
    public func set(_ v: T) { lock.lock(); value = v; lock.unlock() }
}
