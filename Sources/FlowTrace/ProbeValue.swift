/// A register's value, typed as the register defines.
public enum RegisterValue: Hashable, Sendable, CustomStringConvertible {
    case u8(UInt8)
    case u16(UInt16)
    case u32(UInt32)
    case u64(UInt64)
    case u128(UInt128)
    /// GDTR/IDTR.
    case descriptorTable(base: UInt64, limit: UInt16)

    /// The value zero-extended to 64 bits (the base for descriptor tables, the low half of u128).
    @inlinable public var asUInt64: UInt64 {
        switch self {
        case let .u8(v): UInt64(v)
        case let .u16(v): UInt64(v)
        case let .u32(v): UInt64(v)
        case let .u64(v): v
        case let .u128(v): UInt64(truncatingIfNeeded: v)
        case let .descriptorTable(base, _): base
        }
    }

    /// The value in `width`, taken from 128 bits of storage shifted right by `shift`.
    @inlinable public init(width: X86Register.Width, raw: UInt128, shift: Int = 0) {
        let v = raw >> UInt128(shift)
        switch width {
        case .u8: self = .u8(UInt8(truncatingIfNeeded: v))
        case .u16: self = .u16(UInt16(truncatingIfNeeded: v))
        case .u32: self = .u32(UInt32(truncatingIfNeeded: v))
        case .u64: self = .u64(UInt64(truncatingIfNeeded: v))
        case .u128: self = .u128(v)
        case .descriptorTable: self = .descriptorTable(base: UInt64(truncatingIfNeeded: v), limit: UInt16(truncatingIfNeeded: v >> 64))
        }
    }

    /// Lower-case hex with `0x`; u128 as 32 digits; descriptor tables as `base/limit`.
    public var description: String {
        switch self {
        case let .u8(v): "0x" + String(v, radix: 16)
        case let .u16(v): "0x" + String(v, radix: 16)
        case let .u32(v): "0x" + String(v, radix: 16)
        case let .u64(v): "0x" + String(v, radix: 16)
        case let .u128(v):
            "0x" + String(String(v, radix: 16).reversed()).padding(to: 32).reversed()
        case let .descriptorTable(base, limit): "base=0x\(String(base, radix: 16)) limit=0x\(String(limit, radix: 16))"
        }
    }
}

extension String {
    fileprivate func padding(to n: Int) -> String { count >= n ? self : self + String(repeating: "0", count: n - count) }
}

/// What one probe entry collected at one hit.
public enum ProbeValue: Hashable, Sendable {
    /// A register entry's value.
    case register(RegisterValue)
    /// A memory entry's bytes and the guest-virtual address they were read from.
    case memory(address: UInt64, bytes: [UInt8])
    /// The value could not be collected; the reason says why. (The reference leaves such
    /// values uninitialised: defect 10.)
    case unreadable(reason: String)
    /// Callback and halt entries collect nothing.
    case none
}
