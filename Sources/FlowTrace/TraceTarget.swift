/// Before or after the instruction at a probe location executes.
public enum ProbeTiming: String, Hashable, Sendable {
    case before
    case after
}

/// Which vCPUs a trace module records.
public enum VCPUSelection: Hashable, Sendable, CustomStringConvertible {
    case any
    case only(Int)

    public func contains(_ vcpu: Int) -> Bool {
        switch self {
        case .any: true
        case let .only(k): k == vcpu
        }
    }

    public var description: String {
        switch self {
        case .any: "any vCPU"
        case let .only(k): "vCPU \(k)"
        }
    }
}

/// What the target should do after delivering a hit.
public enum HitAction: Sendable, Equatable {
    /// Resume the vCPU.
    case `continue`
    /// Stop the machine at this hit (a halt entry asked for it).
    case halt
}

/// A probe location as the target arms it.
public struct ArmedLocation: Hashable, Sendable {
    /// The module's index for this location: pass it back to `TraceModule.hit`.
    public var index: Int
    /// Guest-virtual address of the instruction.
    public var address: UInt64
    public var timing: ProbeTiming
}

/// The state of one vCPU at a hit, as the target exposes it to the module. The target
/// fetches registers once per exit; the module reads from that copy.
public protocol HitContext {
    /// The vCPU that hit.
    var vcpu: Int { get }
    /// A register's value; throws `TraceError.registerUnreadable` with a reason.
    func read(_ register: X86Register) throws(TraceError) -> RegisterValue
    /// Copies guest-virtual memory at `address` into `buffer` (all of it: `buffer.byteCount`
    /// bytes); throws `TraceError.memoryUnreadable` with a reason.
    func readMemory(at address: UInt64, into buffer: inout MutableRawSpan) throws(TraceError)
    /// A register of at most 64 bits as a plain integer (what conditions compute with).
    /// The default goes through `read`; a context can answer it without building a
    /// `RegisterValue`.
    func readInteger(_ register: X86Register) throws(TraceError) -> UInt64
}

extension HitContext {
    public func readInteger(_ register: X86Register) throws(TraceError) -> UInt64 { try read(register).asUInt64 }
}

extension X86Register {
    /// The register's value from 128 bits of storage as an integer of its width (at most
    /// 64 bits: the low 64 of wider ones).
    @inlinable
    public func integer(fromStorage raw: UInt128) -> UInt64 {
        let v = UInt64(truncatingIfNeeded: raw >> UInt128(shift))
        switch width {
        case .u8: return v & 0xFF
        case .u16: return v & 0xFFFF
        case .u32: return v & 0xFFFF_FFFF
        case .u64, .u128, .descriptorTable: return v
        }
    }
}

/// What a trace module needs from a machine.
///
/// The target arms locations (breakpoints) for a module and, on each hit, calls
/// `TraceModule.hit(location:context:)` on the hitting vCPU's thread and obeys the answer.
/// `arm` and `disarm` are called from control threads; the target applies them while every
/// vCPU is out of the guest, so no probe is ever hit half-armed.
public protocol TraceTarget: AnyObject, Sendable {
    /// Number of vCPUs (ids are 0 ..< vcpuCount).
    var vcpuCount: Int { get }
    /// Starts delivering hits at `locations` to `module` for the vCPUs in `vcpus`.
    func arm(_ module: TraceModule, locations: [ArmedLocation], vcpus: VCPUSelection) throws(TraceError)
    /// Stops delivering hits to `module`.
    func disarm(_ module: TraceModule) throws(TraceError)
    /// The module reached its hit limit on a vCPU thread and disabled itself; the target
    /// should disarm it at its next safe point. Must not block.
    func moduleReachedHitLimit(_ module: TraceModule)
}
