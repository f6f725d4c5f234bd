/// Why a file cannot be used as a guest image. Every case names the file.
public enum ELFError: Error, Equatable, Sendable, CustomStringConvertible {
    case notAFile(path: String)
    case unreadable(path: String, reason: String)
    case notELF(path: String)
    case not64Bit(path: String)
    case wrongMachine(path: String, machine: UInt16, is64Bit: Bool)
    case notExecutable(path: String, type: UInt16)
    case truncated(path: String, detail: String)
    case noLoadSegments(path: String)
    case entryOutsideSegments(path: String, entry: UInt64)
    case malformed(path: String, detail: String)

    public var description: String {
        switch self {
        case let .notAFile(p): return "\(p): no such file (or not a regular file)"
        case let .unreadable(p, r): return "\(p): cannot read: \(r)"
        case let .notELF(p): return "\(p): not an ELF file (bad magic number)"
        case let .not64Bit(p): return "\(p): 32-bit ELF without a Multiboot header; flowtrace runs ELF64 x86-64 payloads, or 32-bit Multiboot kernels"
        case let .wrongMachine(p, m, is64):
            return is64 ? "\(p): ELF64 for machine \(m) (\(machineName(m))), not x86-64 (62)"
                : "\(p): ELF32 for machine \(m) (\(machineName(m))), not i386 (3)"
        case let .notExecutable(p, t):
            let kind = t == 3 ? "a shared object or position-independent executable (ET_DYN); link it with -static -no-pie" :
                t == 1 ? "a relocatable object (ET_REL); link it into an executable" : "ELF type \(t)"
            return "\(p): \(kind); flowtrace loads static executables (ET_EXEC)"
        case let .truncated(p, d): return "\(p): truncated: \(d)"
        case let .noLoadSegments(p): return "\(p): no PT_LOAD segment, nothing to load"
        case let .entryOutsideSegments(p, e): return "\(p): entry point 0x\(String(e, radix: 16)) is outside every executable PT_LOAD segment"
        case let .malformed(p, d): return "\(p): malformed ELF: \(d)"
        }
    }
}

private func machineName(_ m: UInt16) -> String {
    switch m {
    case 3: "i386"
    case 62: "x86-64"
    case 40: "ARM"
    case 183: "AArch64"
    case 243: "RISC-V"
    case 8: "MIPS"
    case 20: "PowerPC"
    case 21: "PowerPC64"
    default: "unknown"
    }
}
