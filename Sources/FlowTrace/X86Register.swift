import NameSuggestions

/// An x86-64 register a probe can collect, by name: its storage and how to view it.
///
/// The catalog is static, so an unknown name is rejected when the probe entry is made,
/// never at hit time.
public struct X86Register: Hashable, Sendable, CustomStringConvertible {
    /// The architectural storage the value comes from.
    public enum Storage: Hashable, Sendable {
        /// General-purpose register in encoding order (0 = rax, 1 = rcx, ..., 15 = r15).
        case general(Int)
        case rip
        case rflags
        /// Segment selector: 0 = es, 1 = cs, 2 = ss, 3 = ds, 4 = fs, 5 = gs.
        case segmentSelector(Int)
        /// Segment base, same numbering as `segmentSelector`.
        case segmentBase(Int)
        /// cr0, cr2, cr3, cr4, cr8.
        case control(Int)
        case efer
        /// dr0-dr3, dr6, dr7.
        case debug(Int)
        case gdtr
        case idtr
        /// xmm0 ... xmm15.
        case xmm(Int)
    }

    /// The type of value the register yields.
    public enum Width: Hashable, Sendable {
        case u8, u16, u32, u64, u128, descriptorTable

        /// Bytes a value of this width occupies in a record.
        public var byteCount: Int {
            switch self {
            case .u8: 1
            case .u16: 2
            case .u32: 4
            case .u64: 8
            case .u128: 16
            case .descriptorTable: 10
            }
        }
    }

    // Plain values only (no String), so copying a register on the hit path costs no
    // reference counting; the name comes from a table.
    public let storage: Storage
    public let width: Width
    /// Right shift applied to the storage before truncating to `width` (8 for ah/bh/ch/dh).
    public let shift: Int

    /// The canonical lower-case name (`rdi`, `eax`, `ah`, `xmm3`, `gdtr`).
    public var name: String { Self.names[self] ?? "?" }

    public var description: String { name }

    /// The stack pointer (the base of `ProbeEntry.caller`).
    public static let rsp = X86Register(storage: .general(4), width: .u64, shift: 0)

    /// The register called `name` (case-insensitive), or nil.
    public static func named(_ name: String) -> X86Register? { catalog[name.lowercased()] }

    /// The register called `name`; unknown names throw with the closest known names.
    public static func resolve(_ name: String) throws(TraceError) -> X86Register {
        if let r = named(name) { return r }
        throw TraceError.unknownRegister(name, suggestions: suggestions(for: name.lowercased()))
    }

    /// Every register name the catalog knows.
    public static var allNames: [String] { catalog.keys.sorted() }

    private static let catalog: [String: X86Register] = {
        var c: [String: X86Register] = [:]
        func add(_ n: String, _ s: Storage, _ w: Width, shift: Int = 0) { c[n] = X86Register(storage: s, width: w, shift: shift) }
        let legacy = ["ax", "cx", "dx", "bx", "sp", "bp", "si", "di"]
        for (i, b) in legacy.enumerated() {
            add("r" + b, .general(i), .u64)
            add("e" + b, .general(i), .u32)
            add(b, .general(i), .u16)
        }
        for (i, b) in ["al", "cl", "dl", "bl", "spl", "bpl", "sil", "dil"].enumerated() { add(b, .general(i), .u8) }
        for (i, b) in ["ah", "ch", "dh", "bh"].enumerated() { add(b, .general(i), .u8, shift: 8) }
        for i in 8...15 {
            add("r\(i)", .general(i), .u64)
            add("r\(i)d", .general(i), .u32)
            add("r\(i)w", .general(i), .u16)
            add("r\(i)b", .general(i), .u8)
        }
        add("rip", .rip, .u64); add("eip", .rip, .u32)
        add("rflags", .rflags, .u64); add("eflags", .rflags, .u32)
        for (i, s) in ["es", "cs", "ss", "ds", "fs", "gs"].enumerated() {
            add(s, .segmentSelector(i), .u16)
            add(s + "_base", .segmentBase(i), .u64)
        }
        for n in [0, 2, 3, 4, 8] { add("cr\(n)", .control(n), .u64) }
        add("efer", .efer, .u64)
        for n in [0, 1, 2, 3, 6, 7] { add("dr\(n)", .debug(n), .u64) }
        add("gdtr", .gdtr, .descriptorTable); add("idtr", .idtr, .descriptorTable)
        for i in 0...15 { add("xmm\(i)", .xmm(i), .u128) }
        return c
    }()

    /// The canonical name of each register: the alphabetically first of its names, so an
    /// alias added to the catalog can never trap at start-up (`RegisterCatalogTests` checks
    /// that no two names mean the same register).
    private static let names: [X86Register: String] = Dictionary(catalog.map { ($0.value, $0.key) }, uniquingKeysWith: { min($0, $1) })

    /// Names that mean the same register as an earlier name (none: a test checks it).
    public static var aliases: [(String, String)] {
        var seen: [X86Register: String] = [:], out: [(String, String)] = []
        for n in allNames {
            guard let r = catalog[n] else { continue }
            if let first = seen[r] { out.append((first, n)) } else { seen[r] = n }
        }
        return out
    }

    public static func suggestions(for name: String) -> [String] {
        closestNames(to: name, among: catalog.keys, maxDistance: max(1, name.count / 2))
    }
}
