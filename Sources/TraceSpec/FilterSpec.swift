import Foundation
import ELF
import FlowTrace

/// A parsed `--filter`:
///
/// - `seq=A..B`, `ts=A..B` (ns since the run started; `us`, `ms`, `s` suffixes allowed),
///   `vcpu=A..B`; either end may be left out (`seq=100..`), or one number given (`vcpu=1`);
/// - `addr=SYMBOL` (the symbol's whole extent), `addr=SYMBOL+OFF`, `addr=A..B`;
/// - `value:ITEM=V` / `common:ITEM=V`: records whose probe (or common probe) collected ITEM
///   with value V, as the outputs print it: a number for a register and for memory of 1, 2,
///   4 or 8 bytes (`caller` too), hex bytes (`a0b1...`) for other memory and `:bytes` items.
public struct FilterSpec: Sendable {
    public let text: String
    private let kind: Kind

    private enum Kind: Sendable {
        case ready(TraceFilter)
        /// Timestamps relative to the run's start, made absolute by `filter(timeOrigin:)`.
        case relativeTime(ClosedRange<UInt64>)
    }

    /// The filter for records whose timestamps count from `timeOrigin` (ns).
    public func filter(timeOrigin: UInt64) -> TraceFilter {
        switch kind {
        case let .ready(f): return f
        case let .relativeTime(r):
            let (lo, o1) = r.lowerBound.addingReportingOverflow(timeOrigin)
            let (hi, o2) = r.upperBound.addingReportingOverflow(timeOrigin)
            return .timestamp((o1 ? .max : lo)...(o2 ? .max : hi))
        }
    }

    public static let kinds = ["seq=A..B", "ts=A..B", "addr=SYMBOL|A..B", "vcpu=A..B", "value:ITEM=V", "common:ITEM=V"]

    /// Parses `text`. `probeItems` and `commonItems` are the items the run collects (by entry
    /// description), so a probe-data filter on an item nobody collects is an error.
    public static func parse(_ text: String, symbols: Symbolizer, probeItems: Set<String>,
                             commonItems: Set<String>) throws(SpecError) -> FilterSpec {
        let t = text.trimmingCharacters(in: .whitespaces)
        for (prefix, common) in [("value:", false), ("common:", true)] where t.lowercased().hasPrefix(prefix) {
            let body = t.dropFirst(prefix.count)
            guard body.count(where: { $0 == "[" }) == body.count(where: { $0 == "]" }) else {
                throw SpecError("'\(t)': unbalanced brackets")
            }
            guard let eq = lastTopLevelEquals(body) else {
                throw SpecError("'\(t)': expected \(prefix)ITEM=VALUE")
            }
            let itemText = String(body[..<eq]), valueText = String(body[body.index(after: eq)...]).trimmingCharacters(in: .whitespaces)
            let item = try parseItem(itemText, symbols: symbols)
            let key = item.entry.description
            let known = common ? commonItems : probeItems
            guard known.contains(key) else {
                let where_ = common ? "--common" : "any --probe"
                throw SpecError("'\(t)': \(where_) does not collect '\(item.key)'" + (known.isEmpty ? "" : " (collected: \(known.sorted().joined(separator: ", ")))"))
            }
            let match = try valueMatch(item, valueText, filter: t)
            return FilterSpec(text: t, kind: .ready(.probeData([match], common: common)))
        }
        guard let eq = t.firstIndex(of: "=") else {
            throw SpecError("unknown filter '\(t)': use \(kinds.joined(separator: ", "))")
        }
        let name = t[..<eq].trimmingCharacters(in: .whitespaces).lowercased()
        let value = t[t.index(after: eq)...].trimmingCharacters(in: .whitespaces)
        switch name {
        case "seq":
            return FilterSpec(text: t, kind: .ready(.sequence(try range(value, filter: t, parse: parseNumber))))
        case "ts":
            return FilterSpec(text: t, kind: .relativeTime(try range(value, filter: t, parse: parseDuration)))
        case "vcpu":
            let r = try range(value, filter: t, parse: parseNumber)
            let hi = r.upperBound > UInt64(Int32.max) ? Int(Int32.max) : Int(r.upperBound)
            guard r.lowerBound <= UInt64(Int32.max) else { throw SpecError("'\(t)': no vCPU has an id that large") }
            return FilterSpec(text: t, kind: .ready(.vcpu(Int(r.lowerBound)...hi)))
        case "addr":
            if let first = value.first, first.isLetter || first == "_" || first == "." {
                return FilterSpec(text: t, kind: .ready(.address(try symbolRange(value, symbols: symbols, filter: t))))
            }
            return FilterSpec(text: t, kind: .ready(.address(try range(value, filter: t, parse: parseNumber))))
        default:
            throw SpecError("unknown filter '\(name)' in '\(t)': use \(kinds.joined(separator: ", "))")
        }
    }

    /// The `=` that separates ITEM from VALUE (the last one outside brackets).
    private static func lastTopLevelEquals(_ s: Substring) -> Substring.Index? {
        var depth = 0
        var found: Substring.Index?
        for i in s.indices {
            switch s[i] {
            case "[": depth += 1
            case "]": depth -= 1
            case "=" where depth == 0: found = i
            default: break
            }
        }
        return found
    }

    /// `A..B`, `A..`, `..B` or `A`.
    private static func range(_ text: String, filter: String, parse: (Substring) -> UInt64?) throws(SpecError) -> ClosedRange<UInt64> {
        func bound(_ s: Substring, _ empty: UInt64) throws(SpecError) -> UInt64 {
            let s = s.trimmingCharacters(in: .whitespaces)
            if s.isEmpty { return empty }
            guard let v = parse(Substring(s)) else { throw SpecError("'\(filter)': '\(s)' is not a number") }
            return v
        }
        guard !text.isEmpty else { throw SpecError("'\(filter)': expected a value or a range A..B") }
        if let dots = text.range(of: "..") {
            let lo = try bound(text[..<dots.lowerBound], 0)
            let hi = try bound(text[dots.upperBound...], .max)
            guard lo <= hi else { throw SpecError("'\(filter)': the range is empty (\(lo) > \(hi))") }
            return lo...hi
        }
        let v = try bound(Substring(text), 0)
        return v...v
    }

    /// Nanoseconds: a number with an optional `ns`, `us`, `ms` or `s` suffix.
    private static func parseDuration(_ s: Substring) -> UInt64? {
        for (suffix, factor) in [("ns", 1.0), ("us", 1e3), ("ms", 1e6), ("s", 1e9)] where s.hasSuffix(suffix) {
            guard let v = Double(s.dropLast(suffix.count)), v >= 0, v * factor < 1.8e19 else { return nil }
            return UInt64(v * factor)
        }
        return parseNumber(s)
    }

    /// `fib` (its extent) or `fib+0x10` (that address).
    private static func symbolRange(_ text: String, symbols: Symbolizer, filter: String) throws(SpecError) -> ClosedRange<UInt64> {
        let parts = text.split(separator: "+", maxSplits: 1).map { $0.trimmingCharacters(in: .whitespaces) }
        guard let symbol = symbols.symbol(named: parts[0]) else {
            let hint = symbols.suggestions(for: parts[0])
            throw SpecError("'\(filter)': unknown symbol '\(parts[0])'" + (hint.isEmpty ? "" : " (did you mean \(hint.map { "'\($0)'" }.joined(separator: ", "))?)"))
        }
        if parts.count == 2 {
            guard let off = parseNumber(parts[1]) else { throw SpecError("'\(filter)': '\(parts[1])' is not an offset") }
            let a = symbol.address &+ off
            return a...a
        }
        return symbol.address...(symbol.address &+ max(symbol.size, 1) &- 1)
    }

    private static func valueMatch(_ item: ItemSpec, _ text: String, filter: String) throws(SpecError) -> ValueMatch {
        let key = item.entry.description
        switch item.entry {
        case let .register(r):
            let v: RegisterValue
            switch r.width {
            case .descriptorTable:
                throw SpecError("'\(filter)': \(r.name) holds a base and a limit; filter on records with addr= or seq= instead")
            case .u128:
                let digits = text.lowercased().hasPrefix("0x") ? text.dropFirst(2) : Substring(text)
                guard let n = UInt128(digits, radix: text.lowercased().hasPrefix("0x") ? 16 : 10) else {
                    throw SpecError("'\(filter)': '\(text)' is not a 128-bit number")
                }
                v = .u128(n)
            default:
                guard let n = parseNumber(text) else { throw SpecError("'\(filter)': '\(text)' is not a number (use decimal or 0x hex)") }
                let bits = r.width.byteCount * 8
                guard bits == 64 || n >> UInt64(bits) == 0 else {
                    throw SpecError("'\(filter)': \(text) does not fit in \(r.name) (\(bits) bits)")
                }
                v = RegisterValue(width: r.width, raw: UInt128(n))
            }
            return ValueMatch(entry: key, .register(v))
        case let .constantMemory(_, size), let .indirectMemory(_, size) where [1, 2, 4, 8].contains(size) && !ReportWriter.isBytesForm(item.key):
            // Shown as the number it holds: matched as one (decimal or 0x hex), little-endian.
            guard let n = parseNumber(text) else {
                throw SpecError("'\(filter)': '\(text)' is not a number (use decimal or 0x hex; '\(item.key):bytes' takes hex bytes)")
            }
            guard size == 8 || n >> UInt64(size * 8) == 0 else {
                throw SpecError("'\(filter)': \(text) does not fit in \(size) bytes ('\(item.key)')")
            }
            return ValueMatch(entry: key, .bytes((0..<size).map { UInt8(truncatingIfNeeded: n >> (8 * UInt64($0))) }))
        case let .constantMemory(_, size), let .indirectMemory(_, size):
            var hex = text.lowercased()
            if hex.hasPrefix("0x") { hex.removeFirst(2) }
            hex.removeAll { $0 == "_" || $0 == " " }
            // ASCII only: Character.isHexDigit also accepts fullwidth digits, which UInt8(_:radix:) does not.
            guard hex.count % 2 == 0, hex.unicodeScalars.allSatisfy({ $0.isASCII && $0.properties.isASCIIHexDigit }) else {
                throw SpecError("'\(filter)': '\(text)' is not hex bytes (two digits a byte, e.g. 2a000000)")
            }
            guard hex.count / 2 == size else {
                throw SpecError("'\(filter)': \(hex.count / 2) bytes given, '\(item.key)' reads \(size)")
            }
            var bytes: [UInt8] = []
            var idx = hex.startIndex
            while idx < hex.endIndex {
                let next = hex.index(idx, offsetBy: 2)
                guard let byte = UInt8(hex[idx..<next], radix: 16) else {
                    throw SpecError("'\(filter)': '\(hex[idx..<next])' in '\(text)' is not a hex byte")
                }
                bytes.append(byte)
                idx = next
            }
            return ValueMatch(entry: key, .bytes(bytes))
        case .callback, .halt:
            throw SpecError("'\(filter)': '\(item.key)' collects no value")
        }
    }
}
