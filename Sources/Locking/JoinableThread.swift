#if canImport(Glibc)
import Glibc
#endif

/// An OS thread that can be joined (Foundation's `Thread` detaches its threads): a
/// machine's vCPU runner threads end with the machine.
public final class JoinableThread: @unchecked Sendable {
    // SAFETY: `thread` is written once by pthread_create before `init` returns and read only
    // by `join`, which the owner calls once (`joined` guards against a second call under
    // `state`'s lock).
    private var thread = pthread_t()
    private let state = Locked(false)

    /// Starts `body` on a new thread.
    public init(_ body: @escaping @Sendable () -> Void) throws(ThreadError) {
        let box = Unmanaged.passRetained(Body(body))
        let r = pthread_create(&thread, nil, { raw in
            // SAFETY: `raw` is the retained Body passed below; taken back exactly once here.
            let b = Unmanaged<Body>.fromOpaque(raw!).takeRetainedValue()
            b.body()
            return nil
        }, box.toOpaque())
        if r != 0 {
            box.release()
            throw ThreadError(errno: r)
        }
    }

    /// Waits for the thread to end. Idempotent.
    public func join() {
        let first = state.withLock { (joined: inout Bool) -> Bool in
            defer { joined = true }
            return !joined
        }
        if first { pthread_join(thread, nil) }
    }

    private final class Body {
        let body: @Sendable () -> Void
        init(_ body: @escaping @Sendable () -> Void) { self.body = body }
    }
}

/// pthread_create failed.
public struct ThreadError: Error, Sendable, CustomStringConvertible {
    public var errno: Int32
    public var description: String { "pthread_create failed: \(String(cString: strerror(errno))) (errno \(errno))" }
}
