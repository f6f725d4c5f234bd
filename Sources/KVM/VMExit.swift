/// Why `KVM_RUN` returned, decoded from `struct kvm_run`.
public enum VMExit: Sendable, Equatable {
    /// The guest wrote `count` elements of `size` bytes to `port` (`KVM_EXIT_IO`, direction
    /// out; `count` > 1 for `rep outs`). `value` is the first element; the others are read
    /// with `VCPU.ioOutValue(at:)`, in place in `kvm_run` (nothing is copied).
    case ioOut(port: UInt16, size: Int, count: Int, value: UInt32)
    /// The guest reads `count` elements of `size` bytes from `port`; answer each with
    /// `VCPU.completeIOIn(at:value:)` before the next run.
    case ioIn(port: UInt16, size: Int, count: Int)
    /// The guest accessed guest-physical memory that is not RAM (`KVM_EXIT_MMIO`): `length`
    /// bytes, `value` the data of a write (little-endian); answer a read with
    /// `VCPU.completeMMIORead(_:)`.
    case mmio(address: UInt64, isWrite: Bool, length: Int, value: UInt64)
    /// The guest executed `hlt` (`KVM_EXIT_HLT`); rip is past the instruction.
    case hlt
    /// A debug event (`KVM_EXIT_DEBUG`): breakpoint, single-step, or hardware breakpoint.
    case debug(exception: UInt32, pc: UInt64, dr6: UInt64, dr7: UInt64)
    /// Triple fault (`KVM_EXIT_SHUTDOWN`).
    case shutdown
    /// KVM could not enter the guest (`KVM_EXIT_FAIL_ENTRY`).
    case failEntry(reason: UInt64)
    /// KVM failed internally, typically an instruction its emulator lacks (`KVM_EXIT_INTERNAL_ERROR`).
    case internalError(suberror: UInt32)
    /// `KVM_RUN` returned EINTR/EAGAIN: a signal or `immediate_exit` asked us back.
    case interrupted
    /// Any other exit reason, by number.
    case other(reason: UInt32)

    /// A short name for messages: `KVM_EXIT_HLT`, `KVM_EXIT_DEBUG (exception 3)`, ...
    public var name: String {
        switch self {
        case let .ioOut(port, _, _, _): "KVM_EXIT_IO (out to port 0x\(String(port, radix: 16)))"
        case let .ioIn(port, _, _): "KVM_EXIT_IO (in from port 0x\(String(port, radix: 16)))"
        case let .mmio(address, w, _, _): "KVM_EXIT_MMIO (\(w ? "write" : "read") at 0x\(String(address, radix: 16)))"
        case .hlt: "KVM_EXIT_HLT"
        case let .debug(e, _, _, _): "KVM_EXIT_DEBUG (exception \(e))"
        case .shutdown: "KVM_EXIT_SHUTDOWN (triple fault)"
        case let .failEntry(r): "KVM_EXIT_FAIL_ENTRY (reason 0x\(String(r, radix: 16)))"
        case let .internalError(s): "KVM_EXIT_INTERNAL_ERROR (suberror \(s)\(s == 1 ? ": emulation failed" : ""))"
        case .interrupted: "interrupted"
        case let .other(r): "exit reason \(r)"
        }
    }
}
