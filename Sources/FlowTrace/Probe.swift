import Locking


/// A guest-virtual memory operand `base + index*scale + displacement`, with registers
/// resolved at hit time.
public struct MemoryOperand: Hashable, Sendable, CustomStringConvertible {
    public enum Base: Hashable, Sendable {
        case register(X86Register)
        case constant(UInt64)
    }

    public var base: Base
    public var index: X86Register?
    public var scale: Int
    public var displacement: Int64

    /// Validates `scale` (1, 2, 4 or 8).
    public init(base: Base, index: X86Register? = nil, scale: Int = 1, displacement: Int64 = 0) throws(TraceError) {
        guard [1, 2, 4, 8].contains(scale) else { throw TraceError.invalidScale(scale) }
        self.init(checked: base, index: index, scale: scale, displacement: displacement)
    }

    private init(checked base: Base, index: X86Register?, scale: Int, displacement: Int64) {
        self.base = base; self.index = index; self.scale = scale; self.displacement = displacement
    }

    /// `[base]`, nothing to validate.
    public static func at(_ base: Base) -> MemoryOperand { MemoryOperand(checked: base, index: nil, scale: 1, displacement: 0) }

    /// `rdi+rsi*8+16`, `0x2000`, `rsp-8`.
    public var description: String {
        var s: String
        switch base {
        case let .register(r): s = r.name
        case let .constant(c): s = "0x" + String(c, radix: 16)
        }
        if let index { s += "+\(index.name)*\(scale)" }
        if displacement > 0 { s += "+\(displacement)" } else if displacement < 0 { s += "-\(displacement.magnitude)" }
        return s
    }
}

/// Information a callback entry gets at a hit.
public struct ProbeHit: Sendable {
    /// The vCPU that hit the probe.
    public var vcpu: Int
    /// The probe location's address (nil while collecting the common probe).
    public var address: UInt64?
    /// Before or after execution of the instruction at `address`.
    public var timing: ProbeTiming
}

/// A callback entry's function: runs on the hitting vCPU's thread with the hit context.
public typealias ProbeCallback = @Sendable (ProbeHit, any HitContext) -> Void

/// One thing a probe collects (or does) when it fires.
public enum ProbeEntry: Sendable, CustomStringConvertible {
    /// A register's value, typed as the register defines.
    case register(X86Register)
    /// `size` bytes at a fixed guest-virtual address.
    case constantMemory(address: UInt64, size: Int)
    /// `size` bytes at `base + index*scale + displacement`, registers read at the hit.
    case indirectMemory(MemoryOperand, size: Int)
    /// Runs a function on the vCPU thread; collects nothing.
    case callback(ProbeCallback)
    /// Asks the target to stop the machine at this hit; collects nothing.
    case halt

    /// The largest memory entry, in bytes.
    public static let maximumMemorySize = 4096

    /// A register entry; an unknown name throws with suggestions.
    public static func register(named name: String) throws(TraceError) -> ProbeEntry {
        .register(try X86Register.resolve(name))
    }

    /// `size` bytes at the constant address `address`.
    public static func memory(at address: UInt64, size: Int) throws(TraceError) -> ProbeEntry {
        try checkSize(size)
        return .constantMemory(address: address, size: size)
    }

    /// `size` bytes at `operand`.
    public static func memory(_ operand: MemoryOperand, size: Int) throws(TraceError) -> ProbeEntry {
        try checkSize(size)
        return .indirectMemory(operand, size: size)
    }

    /// `caller`: the 8 bytes at rsp, the return address at a function's first instruction.
    public static let caller = ProbeEntry.indirectMemory(.at(.register(.rsp)), size: 8)

    private static func checkSize(_ size: Int) throws(TraceError) {
        guard size >= 1, size <= maximumMemorySize else { throw TraceError.invalidMemorySize(size) }
    }

    /// The entry's identity for matching and display: `rdi`, `[0x2000]:16`,
    /// `[rdi+rsi*8+16]:8`, `callback`, `halt`.
    public var description: String {
        switch self {
        case let .register(r): r.name
        case let .constantMemory(a, n): "[0x\(String(a, radix: 16))]:\(n)"
        case let .indirectMemory(op, n): "[\(op)]:\(n)"
        case .callback: "callback"
        case .halt: "halt"
        }
    }

    /// Bytes this entry's value takes in a record (the indirect address is kept too).
    var valueSize: Int {
        switch self {
        case let .register(r): r.width.byteCount
        case let .constantMemory(_, n): n
        case let .indirectMemory(_, n): 8 + n
        case .callback, .halt: 0
        }
    }
}

/// A named, reusable list of entries collected together when the probe fires.
///
/// A probe can be shared by many trace modules. Once any module uses it, its entries are
/// frozen: adding more throws `TraceError.probeInUse`.
public final class Probe: Sendable, CustomStringConvertible {
    /// What the probe is for (free text).
    public let description: String
    private let state: Locked<(entries: [ProbeEntry], users: Int)>

    public init(_ description: String, entries: [ProbeEntry] = []) {
        self.description = description
        state = Locked((entries, 0))
    }

    /// The entries, in the order they are collected.
    public var entries: [ProbeEntry] { state.withLock { $0.entries } }

    /// Whether any trace module uses the probe.
    public var isInUse: Bool { state.withLock { $0.users > 0 } }

    /// Appends entries. Throws when a module already uses the probe.
    public func add(_ entries: [ProbeEntry]) throws(TraceError) {
        let ok = state.withLock { s in
            guard s.users == 0 else { return false }
            s.entries += entries
            return true
        }
        if !ok { throw TraceError.probeInUse(description) }
    }

    /// Appends entries. Throws when a module already uses the probe.
    public func add(_ entries: ProbeEntry...) throws(TraceError) { try add(entries) }

    /// Marks the probe used by one more module and returns its (now frozen) entries.
    func retain() -> [ProbeEntry] {
        state.withLock { s in
            s.users += 1
            return s.entries
        }
    }

    /// One module stopped using the probe.
    func release() {
        state.withLock { $0.users -= 1 }
    }
}
