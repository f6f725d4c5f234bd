import NameSuggestions

/// Name <-> address lookups over an image's symbols.
public struct Symbolizer: Sendable {
    private let byAddress: [Symbol]
    private let byName: [String: Symbol]

    public init(symbols: [Symbol]) {
        byAddress = symbols.sorted { ($0.address, $0.name) < ($1.address, $1.name) }
        var names: [String: Symbol] = [:]
        // A function or object wins over a label of the same name; otherwise the first.
        for s in byAddress where names[s.name] == nil || names[s.name]!.kind == .label { names[s.name] = s }
        byName = names
    }

    public init(image: ELFImage) { self.init(symbols: image.symbols) }

    /// The address of `name`, or nil.
    public func address(of name: String) -> UInt64? { byName[name]?.address }

    /// The symbol `name`, or nil.
    public func symbol(named name: String) -> Symbol? { byName[name] }

    /// The symbol containing `address` and the offset into it. A sized symbol contains
    /// `[address, address+size)`; an unsized one (a label) covers up to the next symbol.
    public func locate(_ address: UInt64) -> (symbol: Symbol, offset: UInt64)? {
        // Last symbol whose start is <= address.
        var lo = 0, hi = byAddress.count
        while lo < hi {
            let mid = (lo + hi) / 2
            if byAddress[mid].address <= address { lo = mid + 1 } else { hi = mid }
        }
        guard lo > 0 else { return nil }
        let nearest = byAddress[lo - 1]
        // An unsized symbol (a label) covers up to the next symbol, which starts after `address`.
        if nearest.size == 0 || address - nearest.address < nearest.size { return (nearest, address - nearest.address) }
        // Otherwise a sized symbol further back may still enclose `address`.
        for s in byAddress[..<(lo - 1)].reversed() where s.size > 0 && address - s.address < s.size {
            return (s, address - s.address)
        }
        return nil
    }

    /// `name+0xoff` (offset 0 included) when `value` lies in a function: how values that
    /// point at code are shown (reports, --count-by).
    public func function(containing value: UInt64) -> String? {
        guard let (s, off) = locate(value), s.kind == .function else { return nil }
        return "\(s.name)+0x\(String(off, radix: 16))"
    }

    /// `name+0xoff` (or `name` at offset 0) when a symbol contains `address`, else `0x...`.
    public func describe(_ address: UInt64) -> String {
        guard let (s, off) = locate(address) else { return "0x" + String(address, radix: 16) }
        return off == 0 ? s.name : "\(s.name)+0x\(String(off, radix: 16))"
    }

    /// Up to `limit` symbol names closest to `name` (edit distance), for "did you mean".
    public func suggestions(for name: String, limit: Int = 3) -> [String] {
        closestNames(to: name, among: byName.keys, maxDistance: max(2, name.count / 2), limit: limit)
    }
}
