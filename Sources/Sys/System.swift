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
