import ELF
import Foundation
import KVM

/// Why a machine could not be built or run. Each case names the offending value.
public enum MachineError: Error, Equatable, Sendable, CustomStringConvertible {
    case kvm(KVMError)
    case image(ELFError)
    case vcpuCount(Int, maximum: Int)
    case memorySize(UInt64, reason: String)
    case invalidMemorySize(String)
    case segmentOutsideRAM(path: String, index: Int, start: UInt64, end: UInt64, usable: Range<UInt64>)
    case memoryTooSmall(path: String, given: UInt64, needed: UInt64)
    case alreadyRan
    case engineUnavailable(BreakpointEngine, reason: String, working: [String])
    case tooManyLocations(BreakpointEngine, count: Int, capacity: Int)
    case notRunning
    /// A runner thread could not be started.
    case thread(String)
    /// Two of flowtrace's own devices claim the same address (a bug).
    case deviceMap(String)
    /// A device asked for (`MachineConfiguration.devices`) overlaps another one's ports.
    case deviceConflict(String)
    /// The image is no kind flowtrace boots.
    case notBootable(path: String, found: String)
    /// `--boot P` on an image without what P needs.
    case wrongBootProtocol(BootProtocol, path: String, found: String, missing: String)
    /// The image cannot be booted with its protocol, for `reason`.
    case unbootable(path: String, protocol: BootProtocol, reason: String)
    /// A boot file (initrd, module) or its placement in guest RAM failed.
    case bootFile(String)
    /// A kernel's symbols could not be read (the payload, its kallsyms tables, a --symbol-file file).
    case symbols(String)

    /// Whether this is a bug of the caller or of flowtrace (a run started twice, a resume
    /// without a halt), not bad input nor a host without KVM.
    public var isInternal: Bool {
        switch self {
        case .alreadyRan, .notRunning, .thread, .deviceMap: true
        default: false
        }
    }

    public var description: String {
        switch self {
        case let .kvm(e): return e.description
        case let .image(e): return e.description
        case let .vcpuCount(n, maximum):
            return "--vcpus \(n): must be between 1 and \(maximum) (this host's KVM maximum)"
        case let .memorySize(size, reason):
            return "--memory \(formatSize(size)): \(reason)"
        case let .invalidMemorySize(text):
            return "--memory '\(text)': not a size; use bytes or a K/M/G suffix, e.g. 64M"
        case let .segmentOutsideRAM(path, index, start, end, usable):
            return "\(path): segment \(index) at \(hexString(start))-\(hexString(end)) is outside guest RAM usable for images (\(hexString(usable.lowerBound))-\(hexString(usable.upperBound)))"
        case let .memoryTooSmall(path, given, needed):
            return "--memory \(formatSize(given)) is too small for \(path): it needs at least \(formatSize(needed)); use --memory \(formatSize(needed)) or more"
        case .alreadyRan:
            return "this machine has already run; create a new Machine to run the guest again"
        case let .engineUnavailable(e, reason, working):
            let alt = working.isEmpty ? "no engine works on this host" : "engines that work here: \(working.joined(separator: ", "))"
            // A platform's restriction says where ("on the pc platform: ...").
            if reason.hasPrefix("on the ") { return "--engine \(e): does not work \(reason); \(alt)" }
            return "--engine \(e): does not work on this host (\(reason)); \(alt)"
        case let .tooManyLocations(e, count, capacity):
            return "--engine \(e) arms at most \(capacity) locations, \(count) asked for; use --engine auto, hlt, int3 or step"
        case .notRunning:
            return "the machine is not stopped at a halt: nothing to resume"
        case let .deviceMap(why):
            return "the device map is inconsistent: \(why)"
        case let .deviceConflict(why):
            return "--device: \(why)"
        case let .thread(why):
            return "cannot start a vCPU thread: \(why)"
        case let .notBootable(path, found):
            return "\(path): not a kernel or payload flowtrace can boot (found: \(found)); it boots ELF64 payloads, Linux bzImage/vmlinux, PVH, Multiboot 1 and 2 kernels"
        case let .wrongBootProtocol(p, path, found, missing):
            return "--boot \(p): \(path) cannot be booted that way: it needs \(missing) (found: \(found)); use --boot auto"
        case let .unbootable(path, p, reason):
            return "\(path): cannot boot with the \(p) protocol: \(reason)"
        case let .symbols(why):
            return why
        case let .bootFile(why):
            return why
        }
    }
}

func hexString(_ v: UInt64) -> String { "0x" + String(v, radix: 16) }

/// `64M`, `2G`, `1536K`, or bytes when not a whole number of KiB.
public func formatSize(_ bytes: UInt64) -> String {
    if bytes >= 1 << 30, bytes % (1 << 30) == 0 { return "\(bytes >> 30)G" }
    if bytes >= 1 << 20, bytes % (1 << 20) == 0 { return "\(bytes >> 20)M" }
    if bytes >= 1 << 10, bytes % (1 << 10) == 0 { return "\(bytes >> 10)K" }
    return "\(bytes)"
}

/// Parses `64M`, `64MiB`, `1G`, `4096`, `512K` (binary units) into bytes.
public func parseMemorySize(_ text: String) throws(MachineError) -> UInt64 {
    var s = Substring(text.trimmingCharacters(in: .whitespaces).uppercased())
    if s.hasSuffix("IB") { s = s.dropLast(2) } else if s.hasSuffix("B") { s = s.dropLast() }
    var shift: UInt64 = 0
    switch s.last {
    case "K": shift = 10; s = s.dropLast()
    case "M": shift = 20; s = s.dropLast()
    case "G": shift = 30; s = s.dropLast()
    default: break
    }
    guard let n = UInt64(s), n > 0, n <= (UInt64.max >> shift) else { throw MachineError.invalidMemorySize(text) }
    return n << shift
}

