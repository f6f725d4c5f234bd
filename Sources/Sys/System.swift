#if canImport(Glibc)
import Glibc
#endif

/// CLOCK_MONOTONIC in nanoseconds: the clock records are stamped with and reports count from.
public func monotonicNanoseconds() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return UInt64(ts.tv_sec) &* 1_000_000_000 &+ UInt64(ts.tv_nsec)
}

/// Whether `fd` is a terminal.
public func isTerminal(_ fd: Int32) -> Bool { isatty(fd) == 1 }

/// The host kernel's release and machine (`uname -r`, `uname -m`).
public func hostKernel() -> (release: String, machine: String) {
    var u = utsname()
    uname(&u)
    func field<T>(_ tuple: T) -> String {
        // SAFETY: a fixed-size C char array of utsname, NUL-terminated by uname(2).
        withUnsafeBytes(of: tuple) { raw in String(decoding: raw.prefix { $0 != 0 }, as: UTF8.self) }
    }
    return (field(u.release), field(u.machine))
}

/// Writes all of `bytes` to `fd`, after short writes and EINTR too. A failure (a full disk,
/// a closed pipe with SIGPIPE ignored, a hung-up terminal) throws its errno's text; nothing
/// traps.
public func writeAll(_ fd: Int32, _ bytes: [UInt8]) throws(SystemError) {
    var done = 0
    while done < bytes.count {
        // SAFETY: the array's own storage, read for the length of the write(2) call.
        let n = bytes.withUnsafeBytes { raw in Glibc.write(fd, raw.baseAddress.unsafelyUnwrapped + done, raw.count - done) }
        if n < 0 {
            if errno == EINTR { continue }
            throw SystemError.errno("write")
        }
        done += n
    }
}

/// Whether `a` and `b` are the same terminal (both are terminals on one device): text
/// written to one then shows between the other's.
public func sameTerminal(_ a: Int32, _ b: Int32) -> Bool {
    guard isTerminal(a), isTerminal(b) else { return false }
    var sa = stat(), sb = stat()
    guard fstat(a, &sa) == 0, fstat(b, &sb) == 0 else { return false }
    return sa.st_rdev == sb.st_rdev
}
