import Glibc

/// An error from the KVM layer. Each case names what failed and with which value.
public enum KVMError: Error, Equatable, Sendable, CustomStringConvertible {
    /// `/dev/kvm` could not be opened.
    case deviceUnavailable(path: String, errno: Int32)
    /// The host's KVM speaks another API version than the stable one (12).
    case unsupportedAPIVersion(Int32)
    /// An ioctl failed with `errno`.
    case ioctl(String, errno: Int32)
    /// A system call (mmap, open, ...) failed with `errno`.
    case system(String, errno: Int32)
    /// A guest-physical access outside the guest's RAM.
    case physicalOutOfRange(address: UInt64, count: Int, ram: [Range<UInt64>])
    /// A guest-virtual address with no mapping in the page tables rooted at `cr3`.
    case unmapped(virtual: UInt64, cr3: UInt64, level: Int)
    /// A memory or vCPU parameter the host cannot take.
    case invalidArgument(String)

    /// Whether this is a condition of the guest's own memory (`unmapped`: its page tables
    /// map no page there; `physicalOutOfRange`: they map one outside its RAM) rather than
    /// a failure of the host: callers report it as the guest's fault.
    public var isGuestCondition: Bool {
        switch self {
        case .unmapped, .physicalOutOfRange: true
        default: false
        }
    }

    public var description: String {
        switch self {
        case let .deviceUnavailable(path, err):
            switch err {
            case ENOENT:
                return "\(path) does not exist: this host has no KVM (load kvm_intel, kvm_amd or kvm_pvm, or run on a machine with virtualization enabled)"
            case EACCES, EPERM:
                return "\(path): permission denied: add yourself to the 'kvm' group (sudo usermod -aG kvm $USER, then log in again) or run as root"
            default:
                return "\(path): \(String(cString: strerror(err)))"
            }
        case let .unsupportedAPIVersion(v):
            return "KVM API version \(v) is not supported (expected 12)"
        case let .ioctl(name, err):
            return "\(name) failed: \(String(cString: strerror(err))) (errno \(err))"
        case let .system(name, err):
            return "\(name) failed: \(String(cString: strerror(err))) (errno \(err))"
        case let .physicalOutOfRange(address, count, ram):
            let ranges = ram.map { "\(hex($0.lowerBound))..\(hex($0.upperBound))" }.joined(separator: ", ")
            return "guest-physical access of \(count) bytes at \(hex(address)) is outside guest RAM (\(ranges))"
        case let .unmapped(virtual, cr3, level):
            return "guest-virtual address \(hex(virtual)) is not mapped (page walk from cr3 \(hex(cr3)) stopped at level \(level))"
        case let .invalidArgument(text):
            return text
        }
    }
}

@inline(__always)
func hex(_ v: UInt64) -> String { "0x" + String(v, radix: 16) }

/// The one funnel every ioctl goes through: the shim returns `-errno` on failure.
@inline(__always)
func checked(_ result: Int32, _ name: StaticString) throws(KVMError) -> Int32 {
    if result < 0 { throw KVMError.ioctl("\(name)", errno: -result) }
    return result
}
