import Foundation
import ELF
import FlowTrace
import NameSuggestions

/// A probe spec or item list that could not be parsed; `message` names the offending
/// token. The CLI prefixes the option and the whole spec.
public struct SpecError: Error, Equatable, Sendable, CustomStringConvertible {
    public var message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

/// One item a probe collects, with the text the user wrote for it (whitespace removed):
/// the key of its value in every output format.
public struct ItemSpec: Sendable {
    public let key: String
    public let entry: ProbeEntry
}

/// A parsed `--probe` spec: `LOCATION[@before|@after][:ITEM[,ITEM...]][ if EXPR]`.
///
/// - LOCATION: `symbol`, `symbol+0xOFF`, `symbol+DEC`, or an address (`0x...` or decimal).
/// - ITEM: a register name, or memory `[EXPR]` / `[EXPR]:SIZE` (SIZE 1-4096 bytes, default 8),
///   shown as the number it holds for SIZE 1, 2, 4 or 8 (little-endian), as bytes otherwise
///   or with `:bytes` after it (`[rsp]:8:bytes`)
///   where EXPR is a sum of terms: one base (a register, a constant or a symbol's address),
///   at most one index `REG*SCALE` (SCALE 1, 2, 4 or 8; a second plain register is an index
///   with scale 1), and constants added or subtracted as the displacement. An EXPR without
///   registers is constant memory.
/// - EXPR: a condition evaluated at the hit (see `ProbeCondition`): registers, `[EXPR]` or
///   `[EXPR]:SIZE` memory (SIZE 1, 2, 4 or 8, default 8), numbers (decimal, `0x` hex),
///   symbols (their address), parentheses, and with C's precedence `* + - << >> < <= > >=
///   == != & ^ | && ||` and the unary `! ~ -`.
public struct ProbeSpec: Sendable {
    /// The spec as given.
    public let text: String
    /// The resolved probe address (a caller may move it, e.g. past a kernel's ftrace site).
    public var address: UInt64
    /// How the location was written, normalised: `fib`, `fib+0x1a`, `0x100000`.
    public var location: String
    public let timing: ProbeTiming
    public let items: [ItemSpec]
    /// The `if EXPR` part, compiled; nil without one.
    public let condition: ProbeCondition?

    /// Parses `text`, resolving symbols with `symbols`.
    public static func parse(_ text: String, symbols: Symbolizer) throws(SpecError) -> ProbeSpec {
        var p = SpecParser(text, symbols: symbols)
        return try p.probeSpec()
    }
}

/// Parses a comma-separated item list (`--common`, and the items of a probe spec).
public func parseItems(_ text: String, symbols: Symbolizer) throws(SpecError) -> [ItemSpec] {
    var p = SpecParser(text, symbols: symbols)
    let items = try p.items()
    try p.expectEnd()
    return items
}

/// Parses an expression with the condition grammar (`rdi`, `[rdi+8]:4`, `caller`,
/// `rdi & 0xff`), compiled: what `--count-by` and `--hist` count.
public func parseExpression(_ text: String, symbols: Symbolizer) throws(SpecError) -> ProbeCondition {
    var p = SpecParser(text, symbols: symbols)
    guard p.peek() != nil else { throw SpecError("empty expression: give a register, [memory], caller or an expression of them") }
    return try p.compiledExpression()
}

/// Parses one item (`rdi`, `[rsp+8]:4`), as probe-data filters name them.
public func parseItem(_ text: String, symbols: Symbolizer) throws(SpecError) -> ItemSpec {
    var p = SpecParser(text, symbols: symbols)
    let item = try p.item()
    try p.expectEnd()
    return item
}

/// Parses a number: `0x` hex or decimal, `_` allowed between digits.
public func parseNumber(_ text: some StringProtocol) -> UInt64? {
    let t = text.replacingOccurrences(of: "_", with: "")
    if t.hasPrefix("0x") || t.hasPrefix("0X") { return t.count > 2 ? UInt64(t.dropFirst(2), radix: 16) : nil }
    return UInt64(t, radix: 10)
}

/// A hand-written recursive-descent parser over the spec's bytes. Every error quotes the
/// token it stopped at.
struct SpecParser {
    let text: String
    let bytes: [UInt8]
    let symbols: Symbolizer
    var i = 0

    init(_ text: String, symbols: Symbolizer) {
        self.text = text
        self.bytes = Array(text.utf8)
        self.symbols = symbols
    }

    // MARK: Lexing

    mutating func skipSpace() {
        while i < bytes.count, bytes[i] == 0x20 || bytes[i] == 0x09 || bytes[i] == 0x0A || bytes[i] == 0x0D { i += 1 }
    }

    mutating func peek() -> UInt8? {
        skipSpace()
        return i < bytes.count ? bytes[i] : nil
    }

    mutating func accept(_ c: Character) -> Bool {
        if peek() == c.asciiValue { i += 1; return true }
        return false
    }

    static func isWordByte(_ b: UInt8) -> Bool {
        (b >= 0x30 && b <= 0x39) || (b >= 0x41 && b <= 0x5A) || (b >= 0x61 && b <= 0x7A) || b == 0x5F || b == 0x2E || b == 0x24
    }

    /// A run of word bytes (letters, digits, `_`, `.`, `$`).
    mutating func word() -> String? {
        skipSpace()
        let start = i
        while i < bytes.count, Self.isWordByte(bytes[i]) { i += 1 }
        return i > start ? String(decoding: bytes[start..<i], as: UTF8.self) : nil
    }

    /// What is at the cursor, for error messages: the next token or "the end".
    mutating func here() -> String {
        skipSpace()
        guard i < bytes.count else { return "the end" }
        if Self.isWordByte(bytes[i]) {
            var j = i
            while j < bytes.count, Self.isWordByte(bytes[j]) { j += 1 }
            return "'\(String(decoding: bytes[i..<j], as: UTF8.self))'"
        }
        // One character (a whole UTF-8 sequence).
        var j = i + 1
        while j < bytes.count, bytes[j] & 0xC0 == 0x80 { j += 1 }
        return "'\(String(decoding: bytes[i..<j], as: UTF8.self))'"
    }

    mutating func number(_ what: String) throws(SpecError) -> UInt64 {
        let at = here()
        guard let w = word(), let first = w.utf8.first, first >= 0x30, first <= 0x39 else {
            throw SpecError("expected \(what) at \(at)")
        }
        guard let n = parseNumber(w) else {
            let tooLong = w.allSatisfy { $0.isHexDigit || $0 == "x" || $0 == "X" || $0 == "_" }
            throw SpecError(tooLong ? "number '\(w)' does not fit in 64 bits" : "'\(w)' is not a number (use decimal or 0x hex)")
        }
        return n
    }

    mutating func expectEnd() throws(SpecError) {
        guard peek() == nil else {
            if peek() == UInt8(ascii: "]") { throw SpecError("unbalanced brackets: ']' without '['") }
            throw SpecError("unexpected \(here())")
        }
    }

    // MARK: Grammar

    mutating func probeSpec() throws(SpecError) -> ProbeSpec {
        guard peek() != nil else { throw SpecError("empty probe spec: use LOCATION[@before|@after][:ITEM,...], e.g. fib:rdi") }
        let (address, location) = try self.location()
        var timing = ProbeTiming.before
        if accept("@") {
            let at = here()
            guard let w = word(), let t = ProbeTiming(rawValue: w.lowercased()) else {
                throw SpecError("expected 'before' or 'after' after '@', found \(at)")
            }
            timing = t
        }
        var items: [ItemSpec] = []
        if accept(":"), !atKeyword("if") { items = try self.items() }
        var condition: ProbeCondition?
        if atKeyword("if") {
            _ = word()
            guard peek() != nil else { throw SpecError("expected a condition after 'if', e.g. 'if rdi < 3'") }
            condition = try compiledExpression()
        }
        try expectEnd()
        return ProbeSpec(text: text, address: address, location: location, timing: timing, items: items, condition: condition)
    }

    /// Whether the next word is `keyword` (nothing is consumed).
    mutating func atKeyword(_ keyword: String) -> Bool {
        let save = i
        defer { i = save }
        return word() == keyword
    }

    // MARK: Conditions

    /// The expression from the cursor to the end, compiled; its text is what it reads.
    mutating func compiledExpression() throws(SpecError) -> ProbeCondition {
        skipSpace()
        let start = i
        var depth = 0
        let e = try expression(0, nesting: &depth)
        try expectEnd()
        let source = String(decoding: bytes[start..<bytes.count], as: UTF8.self).trimmingCharacters(in: .whitespaces)
        do { return try ProbeCondition(e, text: source) } catch {
            if case let .invalidCondition(what, reason) = error { throw SpecError("'\(what)': \(reason)") }
            throw SpecError(error.description)
        }
    }

    static let binaryOperators: [(text: String, op: ProbeCondition.BinaryOperator, precedence: Int)] = [
        ("||", .logicalOr, 1), ("&&", .logicalAnd, 2), ("==", .equal, 6), ("!=", .notEqual, 6),
        ("<=", .lessOrEqual, 7), (">=", .greaterOrEqual, 7), ("<<", .shiftLeft, 8), (">>", .shiftRight, 8),
        ("|", .bitOr, 3), ("^", .bitXor, 4), ("&", .bitAnd, 5), ("<", .less, 7), (">", .greater, 7),
        ("+", .add, 9), ("-", .subtract, 9), ("*", .multiply, 10),
    ]
    /// Parentheses, brackets and unary operators nested deeper than this are refused.
    static let maximumNesting = 64

    /// The binary operator at the cursor (two-character ones first), not consumed.
    mutating func binaryOperator() -> (op: ProbeCondition.BinaryOperator, precedence: Int, length: Int)? {
        skipSpace()
        for (t, op, p) in Self.binaryOperators {
            let u = Array(t.utf8)
            if i + u.count <= bytes.count, Array(bytes[i..<i + u.count]) == u { return (op, p, u.count) }
        }
        return nil
    }

    /// Precedence climbing: operands joined by operators binding at least `minimum`.
    mutating func expression(_ minimum: Int, nesting: inout Int) throws(SpecError) -> ProbeCondition.Expression {
        var lhs = try unary(nesting: &nesting)
        while let (op, precedence, length) = binaryOperator(), precedence >= minimum {
            i += length
            let rhs = try expression(precedence + 1, nesting: &nesting)
            lhs = .binary(op, lhs, rhs)
        }
        return lhs
    }

    mutating func unary(nesting: inout Int) throws(SpecError) -> ProbeCondition.Expression {
        nesting += 1
        defer { nesting -= 1 }
        guard nesting <= Self.maximumNesting else {
            throw SpecError("condition nested too deeply at \(here()) (more than \(Self.maximumNesting) levels)")
        }
        if peek() == UInt8(ascii: "!"), i + 1 < bytes.count, bytes[i + 1] == UInt8(ascii: "=") {
            throw SpecError("expected an operand at '!='")
        }
        for op in ProbeCondition.UnaryOperator.allCases where accept(Character(op.rawValue)) {
            return .unary(op, try unary(nesting: &nesting))
        }
        return try primary(nesting: &nesting)
    }

    mutating func primary(nesting: inout Int) throws(SpecError) -> ProbeCondition.Expression {
        let at = here()
        if accept("(") {
            let e = try expression(0, nesting: &nesting)
            guard accept(")") else { throw SpecError("expected ')' at \(here())") }
            return e
        }
        if accept("[") {
            let address = try expression(0, nesting: &nesting)
            guard accept("]") else { throw SpecError("expected ']' at \(here())") }
            var size = 8
            if accept(":") {
                let sizeAt = here()
                let n = try number("a memory size (1, 2, 4 or 8) after ':'")
                guard [1, 2, 4, 8].contains(n) else {
                    throw SpecError("memory size \(sizeAt) in a condition: use 1, 2, 4 or 8")
                }
                size = Int(n)
            }
            return .memory(address, size: size)
        }
        guard let c = peek(), Self.isWordByte(c) else {
            if peek() == nil { throw SpecError("expected an operand at the end of the condition") }
            throw SpecError("expected an operand at \(at)")
        }
        if c >= 0x30 && c <= 0x39 { return .constant(try number("a number")) }
        guard let name = word() else { throw SpecError("expected an operand at \(at)") }
        if let r = X86Register.named(name) { return .register(r) }
        if name == "caller" { return .memory(.register(.rsp), size: 8) }
        if let symbol = symbols.symbol(named: name) { return .constant(symbol.address) }
        let hint = X86Register.suggestions(for: name) + symbols.suggestions(for: name, limit: 2)
        throw SpecError("'\(name)' is neither a register nor a symbol" + (hint.isEmpty ? "" : " (did you mean \(hint.prefix(3).map { "'\($0)'" }.joined(separator: ", "))?)"))
    }

    mutating func location() throws(SpecError) -> (UInt64, String) {
        let at = here()
        guard let first = peek(), Self.isWordByte(first) else { throw SpecError("expected a symbol or an address at \(at)") }
        if first >= 0x30 && first <= 0x39 {
            let a = try number("an address")
            return (a, "0x" + String(a, radix: 16))
        }
        guard let name = word() else { throw SpecError("expected a symbol or an address at \(at)") }
        guard let symbol = symbols.symbol(named: name) else {
            let hint = symbols.suggestions(for: name)
            throw SpecError("unknown symbol '\(name)'" + (hint.isEmpty ? "" : " (did you mean \(hint.map { "'\($0)'" }.joined(separator: ", "))?)"))
        }
        var offset: UInt64 = 0
        if accept("+") {
            offset = try number("an offset after '+'")
        } else if peek() == UInt8(ascii: "-") {
            throw SpecError("'\(name)-...': offsets go forward from a symbol; write \(name)+OFFSET or an address")
        }
        if symbol.size > 0, offset >= symbol.size {
            throw SpecError("\(name)+0x\(String(offset, radix: 16)) is past the end of \(name) (\(symbol.size) bytes)")
        }
        let (address, overflow) = symbol.address.addingReportingOverflow(offset)
        guard !overflow else { throw SpecError("\(name)+0x\(String(offset, radix: 16)) is beyond the 64-bit address space") }
        return (address, offset == 0 ? name : "\(name)+0x\(String(offset, radix: 16))")
    }

    mutating func items() throws(SpecError) -> [ItemSpec] {
        var list = [try item()]
        while accept(",") {
            let next = try item()
            if let same = list.first(where: { $0.entry.description == next.entry.description }) {
                throw SpecError("'\(next.key)' collects the same as '\(same.key)': list each item once")
            }
            list.append(next)
        }
        return list
    }

    mutating func item() throws(SpecError) -> ItemSpec {
        skipSpace()
        let start = i
        let entry: ProbeEntry
        if accept("[") {
            entry = try memoryItem()
        } else if let first = peek(), Self.isWordByte(first), let name = word() {
            if name == "caller" {
                entry = .caller
            } else {
                do { entry = try .register(named: name) } catch { throw SpecError(error.description) }
            }
        } else if peek() == UInt8(ascii: "]") {
            throw SpecError("unbalanced brackets: ']' without '['")
        } else {
            throw SpecError("expected a register or [memory] at \(here())")
        }
        let key = String(decoding: bytes[start..<i].filter { $0 != 0x20 && $0 != 0x09 && $0 != 0x0A && $0 != 0x0D }, as: UTF8.self)
        return ItemSpec(key: key, entry: entry)
    }

    /// The word `bytes` (the raw form of a memory item: its bytes in guest order, not the
    /// number they hold); the cursor stays where it was when it is not there.
    mutating func acceptBytesForm() -> Bool {
        let before = i
        if let w = word(), w == "bytes" { return true }
        i = before
        return false
    }

    /// After `[`: `EXPR]` and an optional `:SIZE`, then an optional `:bytes`.
    mutating func memoryItem() throws(SpecError) -> ProbeEntry {
        var base: MemoryOperand.Base?
        var index: (X86Register, Int)?
        var displacement: Int64 = 0
        var negative = false
        var first = true
        while true {
            if !first {
                if accept("+") { negative = false } else if accept("-") { negative = true } else { break }
            } else if accept("-") {
                negative = true
            }
            first = false
            let at = here()
            guard let c = peek() else { throw SpecError("unbalanced brackets: '[' without ']'") }
            guard Self.isWordByte(c) else {
                if c == UInt8(ascii: "]") { throw SpecError("expected a register or a number before ']'") }
                throw SpecError("expected a register, symbol or number at \(at)")
            }
            if c >= 0x30 && c <= 0x39 {
                let n = try number("a number")
                if accept("*") {
                    // SCALE*REG
                    let regAt = here()
                    guard let name = word(), let r = X86Register.named(name) else { throw SpecError("expected an index register after '*', found \(regAt)") }
                    try addIndex(r, scale: n, negative: negative, &index)
                    continue
                }
                if base == nil && !negative && index == nil {
                    base = .constant(n)
                } else {
                    try addDisplacement(n, negative: negative, &displacement)
                }
                continue
            }
            // A word byte is at the cursor (checked above), so a word follows.
            guard let name = word() else { throw SpecError("expected a register, number or symbol, found \(here())") }
            if let r = X86Register.named(name) {
                try checkAddressRegister(r, name)
                if accept("*") {
                    let scaleAt = here()
                    guard let s = peek(), s >= 0x30, s <= 0x39 else { throw SpecError("expected a scale (1, 2, 4 or 8) after '\(name)*', found \(scaleAt)") }
                    let scale = try number("a scale")
                    try addIndex(r, scale: scale, negative: negative, &index)
                } else if negative {
                    throw SpecError("'-\(name)': registers can only be added")
                } else if case .register = base {
                    guard index == nil else { throw SpecError("'\(name)': at most a base and an index register") }
                    index = (r, 1)
                } else if case let .constant(c) = base {
                    // A constant came first: it is the displacement, the register the base.
                    base = .register(r)
                    try addDisplacement(c, negative: false, &displacement)
                } else {
                    base = .register(r)
                }
                continue
            }
            guard let symbol = symbols.symbol(named: name) else {
                let hint = closestNames(to: name.lowercased(), among: X86Register.allNames, maxDistance: 1, limit: 2)
                    + symbols.suggestions(for: name, limit: 2)
                throw SpecError("unknown register or symbol '\(name)'" + (hint.isEmpty ? "" : " (did you mean \(hint.map { "'\($0)'" }.joined(separator: ", "))?)"))
            }
            if base == nil && !negative && index == nil {
                base = .constant(symbol.address)
            } else {
                try addDisplacement(symbol.address, negative: negative, &displacement)
            }
        }
        guard accept("]") else {
            if peek() == nil { throw SpecError("unbalanced brackets: '[' without ']'") }
            throw SpecError("unexpected \(here()) in a memory operand")
        }
        var size = 8
        if accept(":") {
            // `:bytes` right after `]` keeps the default size; else a size, maybe then `:bytes`.
            if !acceptBytesForm() {
                let n = try number("a size in bytes after ':'")
                guard n >= 1, n <= UInt64(ProbeEntry.maximumMemorySize) else {
                    throw SpecError(TraceError.invalidMemorySize(n > UInt64(Int.max) ? Int.max : Int(n)).description)
                }
                size = Int(n)
                let before = i
                if accept(":"), !acceptBytesForm() { i = before }
            }
        }
        do {
            switch (base, index) {
            case (nil, nil):
                // Only a displacement: [0] or [-8].
                guard displacement >= 0 else { throw SpecError("address \(displacement) is negative") }
                return try .memory(at: UInt64(displacement), size: size)
            case let (.constant(c)?, nil):
                let (a, o) = displacement >= 0 ? c.addingReportingOverflow(UInt64(displacement))
                                               : c.subtractingReportingOverflow(displacement.magnitude)
                guard !o else { throw SpecError("address 0x\(String(c, radix: 16))\(displacement >= 0 ? "+" : "-")\(displacement.magnitude) is outside the 64-bit address space") }
                return try .memory(at: a, size: size)
            case let (b, idx):
                let operand = try MemoryOperand(base: b ?? .constant(0), index: idx?.0, scale: idx?.1 ?? 1, displacement: displacement)
                return try .memory(operand, size: size)
            }
        } catch let e as SpecError {
            throw e
        } catch let e as TraceError {
            throw SpecError(e.description)
        } catch {
            throw SpecError("\(error)")
        }
    }

    func checkAddressRegister(_ r: X86Register, _ name: String) throws(SpecError) {
        switch r.width {
        case .u8, .u128, .descriptorTable:
            throw SpecError("'\(name)' cannot form an address: use a 16-, 32- or 64-bit general-purpose register")
        default: break
        }
        switch r.storage {
        case .general, .rip: break
        default: throw SpecError("'\(name)' cannot form an address: use a general-purpose register")
        }
    }

    func addIndex(_ r: X86Register, scale: UInt64, negative: Bool, _ index: inout (X86Register, Int)?) throws(SpecError) {
        try checkAddressRegister(r, r.name)
        guard !negative else { throw SpecError("'-\(r.name)*\(scale)': the index can only be added") }
        guard [1, 2, 4, 8].contains(scale) else { throw SpecError(TraceError.invalidScale(scale > 1000 ? 1000 : Int(scale)).description) }
        guard index == nil else { throw SpecError("'\(r.name)*\(scale)': a memory operand has at most one index register") }
        index = (r, Int(scale))
    }

    func addDisplacement(_ n: UInt64, negative: Bool, _ displacement: inout Int64) throws(SpecError) {
        let magnitude = Int64(exactly: n)
        let (v, o): (Int64, Bool)
        if let magnitude {
            (v, o) = negative ? displacement.subtractingReportingOverflow(magnitude) : displacement.addingReportingOverflow(magnitude)
        } else if negative, n == UInt64(Int64.max) + 1 {
            let (a, o1) = displacement.subtractingReportingOverflow(Int64.max)
            let (b, o2) = a.subtractingReportingOverflow(1)
            (v, o) = (b, o1 || o2)
        } else {
            (v, o) = (0, true)
        }
        guard !o else { throw SpecError("displacement \(negative ? "-" : "+")0x\(String(n, radix: 16)) does not fit in 64 signed bits") }
        displacement = v
    }
}
