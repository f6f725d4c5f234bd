import Glibc
import Locking

/// Reads a file descriptor (standard input) on a thread of its own and hands each chunk to
/// `deliver`, until end of file, `stop()`, or a read error. `stop()` wakes the thread
/// through a pipe it polls beside the descriptor and joins it, so nothing outlives a run.
public final class InputPump: Sendable {
    private let thread: JoinableThread
    private let wakeWrite: Int32
    private let wakeRead: Int32

    /// Starts reading `fd`. `deliver` runs on the pump's thread and may block (until the
    /// guest takes the bytes); it must return once `stop()` was called.
    public init(fd: Int32, deliver: @escaping @Sendable ([UInt8]) -> Void) throws(SystemError) {
        var ends: [Int32] = [0, 0]
        guard pipe(&ends) == 0 else { throw .errno("cannot create the input pump's pipe") }
        let wakeRead = ends[0], wakeWrite = ends[1]
        _ = fcntl(wakeRead, F_SETFD, FD_CLOEXEC)
        _ = fcntl(wakeWrite, F_SETFD, FD_CLOEXEC)
        self.wakeRead = wakeRead
        self.wakeWrite = wakeWrite
        do {
            thread = try JoinableThread {
                var fds = [pollfd(fd: fd, events: Int16(POLLIN), revents: 0), pollfd(fd: wakeRead, events: Int16(POLLIN), revents: 0)]
                var buffer = [UInt8](repeating: 0, count: 4096)
                while true {
                    let r = poll(&fds, 2, -1)
                    if r < 0 { if errno == EINTR { continue }; return }
                    if fds[1].revents != 0 { return }
                    guard fds[0].revents != 0 else { continue }
                    let n = read(fd, &buffer, buffer.count)
                    if n < 0 { if errno == EINTR || errno == EAGAIN { continue }; return }
                    if n == 0 { return }   // end of file: nothing more for the guest
                    deliver(Array(buffer[..<n]))
                }
            }
        } catch {
            close(wakeRead)
            close(wakeWrite)
            throw SystemError("cannot start the input pump: \(error.description)")
        }
    }

    /// Stops reading and waits for the thread to end (the caller must first make a
    /// blocked `deliver` return).
    public func stop() {
        var one: UInt8 = 1
        _ = write(wakeWrite, &one, 1)
        thread.join()
        close(wakeRead)
        close(wakeWrite)
    }
}

/// A terminal put in raw input mode (no line editing, no echo; signals still work, so
/// Ctrl-C still stops the run), restored by `restore()`.
public final class RawTerminal: Sendable {
    private let fd: Int32
    private let saved: Locked<termios?>

    /// nil when `fd` is not a terminal or its mode cannot be read.
    public init?(fd: Int32) {
        guard isatty(fd) == 1 else { return nil }
        var t = termios()
        guard tcgetattr(fd, &t) == 0 else { return nil }
        self.fd = fd
        saved = Locked(t)
        var raw = t
        raw.c_lflag &= ~tcflag_t(ICANON | ECHO | IEXTEN)
        raw.c_iflag &= ~tcflag_t(ICRNL | IXON)
        _ = tcsetattr(fd, TCSANOW, &raw)
    }

    public func restore() {
        guard var t = saved.withLock({ s -> termios? in defer { s = nil }; return s }) else { return }
        _ = tcsetattr(fd, TCSANOW, &t)
    }
}
