/// Errors of the flow-trace layer. Each names the offending value.
public enum TraceError: Error, Equatable, Sendable, CustomStringConvertible {
    /// No register has this name; `suggestions` are the closest names.
    case unknownRegister(String, suggestions: [String])
    /// A memory entry's size is 0 or above `ProbeEntry.maximumMemorySize`.
    case invalidMemorySize(Int)
    /// An indirect memory entry's scale is not 1, 2, 4 or 8.
    case invalidScale(Int)
    /// The probe is used by a trace module: its entries are frozen.
    case probeInUse(String)
    /// The module already has a probe at this address.
    case duplicateLocation(UInt64)
    /// The operation needs another module state.
    case invalidState(operation: String, state: TraceModule.State)
    /// `enable` on a module without probe locations.
    case noProbes
    /// The module's target (machine) no longer exists.
    case targetGone
    /// The vCPU id is not one of the target's.
    case vcpuOutOfRange(Int, count: Int)
    /// A register could not be read at a hit.
    case registerUnreadable(String, reason: String)
    /// Guest memory could not be read at a hit.
    case memoryUnreadable(address: UInt64, size: Int, reason: String)
    /// The target refused to arm or disarm the module's locations.
    case target(String)
    /// A host call of the target failed while arming or disarming (the text names it).
    case targetFailure(String)
    /// Another control operation on the module (add, enable, disable) was in progress.
    case concurrentOperation(String)
    /// A condition that cannot be compiled; the first value names the offending part.
    case invalidCondition(String, reason: String)

    public var description: String {
        switch self {
        case let .unknownRegister(name, suggestions):
            let hint = suggestions.isEmpty ? "" : " (did you mean \(suggestions.map { "'\($0)'" }.joined(separator: ", "))?)"
            return "unknown register '\(name)'\(hint)"
        case let .invalidMemorySize(n):
            return "memory size \(n) is out of range: use 1 to \(ProbeEntry.maximumMemorySize) bytes"
        case let .invalidScale(s):
            return "scale \(s) is invalid: use 1, 2, 4 or 8"
        case let .probeInUse(d):
            return "probe '\(d)' is used by a trace module: its entries can no longer change"
        case let .duplicateLocation(a):
            return "the module already has a probe at 0x\(String(a, radix: 16))"
        case let .invalidState(op, state):
            return "cannot \(op) a trace module that is \(state)"
        case .noProbes:
            return "cannot enable a trace module without probe locations"
        case .targetGone:
            return "the trace module's target no longer exists"
        case let .vcpuOutOfRange(id, count):
            return "vCPU \(id) is out of range: the target has vCPUs 0 to \(count - 1)"
        case let .registerUnreadable(name, reason):
            return "register \(name) unreadable: \(reason)"
        case let .memoryUnreadable(address, size, reason):
            return "\(size) bytes at 0x\(String(address, radix: 16)) unreadable: \(reason)"
        case let .target(text), let .targetFailure(text):
            return text
        case let .invalidCondition(_, reason):
            return "condition: \(reason)"
        case let .concurrentOperation(op):
            return "cannot \(op) a trace module while another thread adds probes to, enables or disables it: one control operation at a time"
        }
    }
}
