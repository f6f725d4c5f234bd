/// A guest address (physical or virtual, by context), with checked arithmetic.
public struct GuestAddress: RawRepresentable, Hashable, Comparable, Sendable, CustomStringConvertible {
    public var rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }
    public init(_ value: UInt64) { rawValue = value }

    /// `self + offset`, or nil on overflow past 2^64.
    public func adding(_ offset: UInt64) -> GuestAddress? {
        let (r, o) = rawValue.addingReportingOverflow(offset)
        return o ? nil : GuestAddress(r)
    }

    public static func < (a: GuestAddress, b: GuestAddress) -> Bool { a.rawValue < b.rawValue }
    public var description: String { "0x" + String(rawValue, radix: 16) }
}
