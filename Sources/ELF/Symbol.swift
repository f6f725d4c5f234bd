/// A named address from an image's `.symtab`.
public struct Symbol: Sendable, Hashable, CustomStringConvertible {
    public enum Kind: String, Sendable, Hashable {
        /// `STT_FUNC`.
        case function
        /// `STT_OBJECT`.
        case object
        /// An `STT_NOTYPE` label inside a section (an assembly label such as `fault_here`).
        case label
    }

    public var name: String
    public var address: UInt64
    /// `st_size`; 0 for labels and hand-written assembly without `.size`.
    public var size: UInt64
    public var kind: Kind
    public var isGlobal: Bool

    public init(name: String, address: UInt64, size: UInt64, kind: Kind, isGlobal: Bool = true) {
        self.name = name; self.address = address; self.size = size; self.kind = kind; self.isGlobal = isGlobal
    }

    public var description: String { "\(name) @ 0x\(String(address, radix: 16)) (\(kind.rawValue), \(size) bytes)" }
}
