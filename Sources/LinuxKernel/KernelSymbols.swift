import ELF

/// A kernel's symbols and where they came from.
public struct KernelSymbols: Sendable {
    public enum Source: Sendable, Equatable, CustomStringConvertible {
        /// The image's own `.symtab` (a vmlinux from a build tree).
        case symtab
        /// A file the user gave: System.map, `/proc/kallsyms` or `nm` output.
        case file(String)
        /// The kernel's kallsyms tables, read from the image (`compression`: its payload's format).
        case kallsyms(compression: CompressionFormat?)

        public var description: String {
            switch self {
            case .symtab: "the image's .symtab"
            case let .file(path): path
            case let .kallsyms(c): c.map { "the kernel's own kallsyms tables (in its \($0) payload)" } ?? "the kernel's own kallsyms tables"
            }
        }
    }

    public var symbols: [KernelSymbol]
    public var source: Source

    public init(symbols: [KernelSymbol], source: Source) {
        self.symbols = symbols.sorted { ($0.address, $0.name) < ($1.address, $1.name) }
        self.source = source
    }

    /// The symbols as the rest of flowtrace uses them: text symbols are functions, data,
    /// bss and read-only symbols objects, the rest labels; each extends to the next
    /// symbol's address (kallsyms has no sizes; the kernel sizes its own lookups that way).
    public var elfSymbols: [Symbol] {
        var out: [Symbol] = []
        out.reserveCapacity(symbols.count)
        var next = symbols.count
        var nextAddress: UInt64 = 0
        // From the end: the size is the distance to the next higher address.
        var sizes = [UInt64](repeating: 0, count: symbols.count)
        for i in symbols.indices.reversed() {
            if next < symbols.count, symbols[i].address < nextAddress { sizes[i] = nextAddress - symbols[i].address }
            if i == 0 || symbols[i - 1].address < symbols[i].address { next = i; nextAddress = symbols[i].address }
        }
        for (s, size) in zip(symbols, sizes) {
            let kind: Symbol.Kind = switch s.type {
            case "T", "t", "W", "w": .function
            case "D", "d", "B", "b", "R", "r", "V", "v": .object
            default: .label
            }
            out.append(Symbol(name: s.name, address: s.address, size: kind == .label ? 0 : size, kind: kind,
                              isGlobal: s.type.isUppercase))
        }
        return out
    }
}

public struct SymbolFileError: Error, Sendable, Equatable, CustomStringConvertible {
    public var path: String
    public var reason: String
    public init(path: String, reason: String) { self.path = path; self.reason = reason }
    public var description: String { "--symbol-file \(path): \(reason)" }
}

/// System.map, `/proc/kallsyms` and `nm` output: `ADDRESS TYPE NAME [\t[module]]` per line
/// (hexadecimal address; lines without one, as `nm` writes undefined symbols, are skipped).
public enum SymbolFile {
    public static func parse(_ text: String, path: String) throws(SymbolFileError) -> [KernelSymbol] {
        var out: [KernelSymbol] = []
        var lineNumber = 0
        var nonZero = false
        for line in text.split(separator: "\n", omittingEmptySubsequences: false) {
            lineNumber += 1
            let fields = line.split(whereSeparator: { $0 == " " || $0 == "\t" })
            if fields.isEmpty { continue }
            // nm's undefined symbols: "                 U name".
            if fields.count == 2, fields[0].count == 1 { continue }
            guard fields.count >= 3, let address = UInt64(fields[0], radix: 16), fields[1].count == 1 else {
                let shown = line.count > 60 ? String(line.prefix(60)) + "..." : String(line)
                throw SymbolFileError(path: path, reason: "line \(lineNumber) is not 'ADDRESS TYPE NAME' (System.map, /proc/kallsyms or nm format): '\(shown)'")
            }
            if address != 0 { nonZero = true }
            out.append(KernelSymbol(address: address, type: fields[1].first!, name: String(fields[2])))
        }
        guard !out.isEmpty else { throw SymbolFileError(path: path, reason: "no symbols in it") }
        // /proc/kallsyms read without the right to see addresses shows zeros.
        guard nonZero else {
            throw SymbolFileError(path: path, reason: "every address is 0 (a /proc/kallsyms read without privilege shows zeros: read it as root, or set kernel.kptr_restrict=0)")
        }
        return out
    }
}

/// The text after "Linux version " in a kernel image (its `linux_banner`), up to the line end.
public func linuxVersionString(in b: [UInt8]) -> String? {
    let needle = Array("Linux version ".utf8)
    var from = 0
    while from + needle.count < b.count {
        guard let hit = find(needle, in: b, from: from) else { return nil }
        let at = hit + needle.count
        var end = at
        while end < b.count, end - at < 400, b[end] >= 0x20, b[end] < 0x7F { end += 1 }
        // The banner has a version number then more; the format string "%s" does not.
        if end - at > 4, b[at] >= 0x30, b[at] <= 0x39 { return String(decoding: b[at..<end], as: UTF8.self) }
        from = at
    }
    return nil
}

/// The offset of the first `needle` in `b` at or after `from`.
func find(_ needle: [UInt8], in b: [UInt8], from: Int) -> Int? {
    guard let first = needle.first, from >= 0 else { return nil }
    var at = from
    let last = b.count - needle.count
    while at <= last {
        if b[at] == first {
            var k = 1
            while k < needle.count, b[at + k] == needle[k] { k += 1 }
            if k == needle.count { return at }
        }
        at += 1
    }
    return nil
}
