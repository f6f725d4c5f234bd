import Foundation

/// Runs `body` on the calling thread (so its expectations belong to the test) while a
/// watchdog thread waits at most `seconds` for it. A body still running then (a deadlock)
/// ends the whole test process with a message naming `what`, instead of hanging the suite.
public func withWatchdog<R>(_ seconds: Double, _ what: String, _ body: () throws -> R) rethrows -> R {
    let done = DispatchSemaphore(value: 0)
    Thread {
        if done.wait(timeout: .now() + seconds) == .timedOut {
            FileHandle.standardError.write(Data("watchdog: \(what) still running after \(seconds) s: deadlock\n".utf8))
            abort()
        }
    }.start()
    defer { done.signal() }
    return try body()
}

/// A value shared between threads under a lock.
public final class LockedBox<T>: @unchecked Sendable {
    // SAFETY: `value` is only touched under `lock`.
    private let lock = NSLock()
    private var value: T
    public init(_ v: T) { value = v }
    public func get() -> T { lock.lock(); defer { lock.unlock() }; return value }
    public func set(_ v: T) { lock.lock(); value = v; lock.unlock() }
    public func modify(_ f: (inout T) -> Void) { lock.lock(); f(&value); lock.unlock() }
}
