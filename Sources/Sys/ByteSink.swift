#if canImport(Glibc)
import Glibc
#endif

/// An error of a system call, with its errno.
public struct SystemError: Error, Sendable, Equatable, CustomStringConvertible {
    public var message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
    static func errno(_ what: String, _ e: Int32 = Glibc.errno) -> SystemError {
        SystemError("\(what): \(String(cString: strerror(e)))")
    }
}

/// Buffered writes to standard output or to a file that replaces its destination only when
/// everything was written.
///
/// A file sink writes to a new temporary file beside the destination and renames it over
/// the destination in `commit()`; a run that fails before committing leaves an existing
/// file as it was (a sink dropped uncommitted removes its temporary file; one whose writes
/// failed keeps it, see `keepPartial()` and `commit()`). Destinations that are not regular files (`/dev/full`, a FIFO, a
/// terminal) are opened and written directly. A write error (a closed pipe, a full disk) is
/// kept in `error` and later writes are dropped, so the caller reports it once.
public final class ByteSink {
    private enum Target {
        case descriptor(Int32)
        /// Writing `temporary`, to be renamed to `path`.
        case replacing(path: String, temporary: String, fd: Int32)
        /// A device or FIFO, opened for writing.
        case direct(path: String, fd: Int32)
        case closed
    }

    private var target: Target
    private var buffer: [UInt8] = []
    public private(set) var error: String?
    /// Bytes that reached the file descriptor (a failed write's partial bytes included).
    public private(set) var bytesWritten = 0
    /// Bytes handed to the sink so far (written, buffered, or dropped after an error): a
    /// writer notes it after each record to know later which records reached the file.
    public private(set) var bytesAccepted = 0

    /// The temporary file being written, while it has not replaced its destination.
    public var temporaryPath: String? {
        if case let .replacing(_, temporary, _) = target { return temporary }
        return nil
    }

    /// Writes to `fd` (standard output); never closes it.
    public init(fd: Int32) {
        target = .descriptor(fd)
        buffer.reserveCapacity(1 << 16)
    }

    /// Checks, without touching `path`, that a later `ByteSink(replacing:)` can write it:
    /// its directory exists and is writable, it is not a directory, and an existing file is
    /// one this user may write (as `cp` would refuse it: the rename would otherwise go over
    /// a file the user may not change).
    public static func checkWritable(_ path: String) throws(SystemError) {
        var st = stat()
        if stat(path, &st) == 0 {
            if st.st_mode & S_IFMT == S_IFDIR { throw SystemError("cannot write '\(path)': it is a directory") }
            guard access(path, W_OK) == 0 else {
                let e = Glibc.errno
                let mode = String(st.st_mode & 0o7777, radix: 8)
                throw SystemError("cannot write '\(path)': \(String(cString: strerror(e))) (mode 0\(mode)); make it writable (chmod u+w) or choose another file")
            }
            if st.st_mode & S_IFMT != S_IFREG { return }
        }
        let dir = directory(of: resolved(path))
        guard access(dir, W_OK) == 0 else { throw .errno("cannot write '\(path)' (directory '\(dir)')") }
    }

    /// A sink whose bytes replace `path` on `commit()`.
    public init(replacing path: String) throws(SystemError) {
        var st = stat()
        if stat(path, &st) == 0, st.st_mode & S_IFMT != S_IFREG {
            let fd = open(path, O_WRONLY | O_CLOEXEC)
            guard fd >= 0 else { throw .errno("cannot write '\(path)'") }
            target = .direct(path: path, fd: fd)
            return
        }
        let real = Self.resolved(path)
        let dir = Self.directory(of: real)
        let base = real.split(separator: "/").last.map(String.init) ?? real
        var fd: Int32 = -1
        var temporary = ""
        for attempt in 0..<100 {
            temporary = "\(dir)/.\(base).flowtrace-\(getpid())-\(attempt)"
            fd = open(temporary, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o644)
            if fd >= 0 || Glibc.errno != EEXIST { break }
        }
        guard fd >= 0 else { throw .errno("cannot write '\(path)' (creating a temporary file in '\(dir)')") }
        // The new file keeps the permissions of the one it replaces.
        if stat(real, &st) == 0 { fchmod(fd, st.st_mode & 0o7777) }
        target = .replacing(path: real, temporary: temporary, fd: fd)
        buffer.reserveCapacity(1 << 16)
    }

    deinit {
        switch target {
        case let .replacing(_, temporary, fd):
            // Never committed: the destination stays as it was.
            close(fd)
            unlink(temporary)
        case let .direct(_, fd):
            close(fd)
        case .descriptor, .closed:
            break
        }
    }

    /// Writes to `path` directly, truncating it: for output that streams while a run goes
    /// on (the serial port's file), opened only once the run starts.
    public init(overwriting path: String) throws(SystemError) {
        let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw .errno("cannot write '\(path)'") }
        target = .direct(path: path, fd: fd)
        buffer.reserveCapacity(1 << 12)
    }

    public func write(bytes: some Sequence<UInt8>) {
        let before = buffer.count
        buffer.append(contentsOf: bytes)
        bytesAccepted += buffer.count - before
        if buffer.count >= 1 << 16 { flush() }
    }

    public func write(byte: UInt8) {
        buffer.append(byte)
        bytesAccepted += 1
        if buffer.count >= 1 << 16 { flush() }
    }

    public func write(_ s: String) {
        buffer.append(contentsOf: s.utf8)
        bytesAccepted += s.utf8.count
        if buffer.count >= 1 << 16 { flush() }
    }

    /// Writes out what is buffered.
    public func flush() {
        defer { buffer.removeAll(keepingCapacity: true) }
        guard error == nil else { return }
        let fd: Int32
        switch target {
        case let .descriptor(d): fd = d
        case let .replacing(_, _, d): fd = d
        case let .direct(_, d): fd = d
        case .closed: return
        }
        var done = 0
        while done < buffer.count {
            let n = buffer[done...].withContiguousStorageIfAvailable { Glibc.write(fd, $0.baseAddress, $0.count) } ?? -1
            if n < 0 {
                if Glibc.errno == EINTR { continue }
                error = String(cString: strerror(Glibc.errno))
                return
            }
            done += n
            bytesWritten += n
        }
    }

    /// Cuts a temporary file back to its first `length` bytes (what whole records took
    /// before a write failed), so it ends at a record boundary. Devices and standard output
    /// cannot be cut: nothing happens there. Returns whether the file was cut.
    @discardableResult
    public func truncate(to length: Int) -> Bool {
        buffer.removeAll(keepingCapacity: true)
        guard case let .replacing(_, _, fd) = target, length <= bytesWritten else { return false }
        guard ftruncate(fd, off_t(length)) == 0 else { return false }
        bytesWritten = length
        return true
    }

    /// Gives up replacing the destination after a failure: the temporary file is closed and
    /// kept (its path returned) so what reached it is not lost; the destination stays as it
    /// was. Devices are closed. nil when there was no temporary file.
    public func keepPartial() -> String? {
        switch target {
        case let .replacing(_, temporary, fd):
            target = .closed
            close(fd)
            return temporary
        case let .direct(_, fd):
            target = .closed
            close(fd)
            return nil
        case .descriptor, .closed:
            return nil
        }
    }

    /// Writes everything out; a file then replaces its destination. Throws the first write
    /// error, in which case an existing destination file is left as it was.
    public func commit() throws(SystemError) {
        flush()
        switch target {
        case .descriptor:
            if let error { throw SystemError(error) }
        case let .direct(path, fd):
            target = .closed
            if close(fd) != 0, error == nil { error = String(cString: strerror(Glibc.errno)) }
            if let error { throw SystemError("writing '\(path)': \(error)") }
        case let .replacing(path, temporary, fd):
            target = .closed
            if error == nil, fsync(fd) != 0 { error = String(cString: strerror(Glibc.errno)) }
            if close(fd) != 0, error == nil { error = String(cString: strerror(Glibc.errno)) }
            if error == nil, rename(temporary, path) != 0 { error = "renaming \(temporary): \(String(cString: strerror(Glibc.errno)))" }
            if let error {
                // What was written stays, named, beside the untouched destination.
                throw SystemError("writing '\(path)': \(error) (the file was left as it was; what was written is in \(temporary))")
            }
        case .closed:
            if let error { throw SystemError(error) }
        }
    }

    private static func resolved(_ path: String) -> String {
        guard let r = realpath(path, nil) else { return path }
        defer { free(r) }
        return String(cString: r)
    }

    private static func directory(of path: String) -> String {
        guard let slash = path.lastIndex(of: "/") else { return "." }
        return slash == path.startIndex ? "/" : String(path[..<slash])
    }
}
