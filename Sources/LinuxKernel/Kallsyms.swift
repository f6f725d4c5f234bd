
/// A symbol as the kernel lists it in `/proc/kallsyms`: address, type letter, name.
public struct KernelSymbol: Sendable, Hashable {
    public var address: UInt64
    /// `T` text, `D` data, `B` bss, `R` read-only, `A` absolute (per-CPU offsets), `W`/`V`
    /// weak; lower case for local symbols.
    public var type: Character
    public var name: String
    public init(address: UInt64, type: Character, name: String) {
        self.address = address; self.type = type; self.name = name
    }
}

public struct KallsymsError: Error, Sendable, Equatable, CustomStringConvertible {
    public var reason: String
    public init(_ reason: String) { self.reason = reason }
    public var description: String { reason }
}

/// Reads the compressed symbol tables `scripts/kallsyms` builds into a kernel
/// (`CONFIG_KALLSYMS`), from the kernel's own bytes, without any symbol to say where they are.
///
/// The tables: `kallsyms_token_table` (256 NUL-terminated strings; a byte of a name stands for
/// the token of that number) and `kallsyms_token_index` (256 16-bit offsets into it);
/// `kallsyms_num_syms`; `kallsyms_names` (per symbol a length, one byte or, from Linux 6.1,
/// two when the first has bit 7 set, then that many token bytes, the first decoding to the
/// type letter); `kallsyms_markers` (32-bit offset of every 256th name); and the addresses:
/// `kallsyms_offsets` (32-bit, from `kallsyms_relative_base`) or `kallsyms_addresses` (64-bit).
/// Linux before 6.4 puts the addresses first and the tokens last; from 6.4 the names come
/// first and the addresses follow the token index. Both are searched.
///
/// Finding them: the token table holds every character names use as a one-character token at
/// that character's number, so "0", "1" ... "9" follow one another, 48 strings into the table;
/// the token index must then list the table's own offsets. Names are where a plausible count
/// precedes a run of exactly that many decodable names followed by markers that agree with
/// them; the addresses are the candidate array that decodes to an ascending list with `_text`
/// and `start_kernel` in kernel space.
public enum Kallsyms {
    public static func decode(_ image: [UInt8]) throws(KallsymsError) -> [KernelSymbol] {
        try Decoder(image).run()
    }
}

private struct Decoder {
    let b: [UInt8]
    init(_ b: [UInt8]) { self.b = b }

    func u16(_ i: Int) -> Int { Int(b[i]) | Int(b[i + 1]) << 8 }
    func u32(_ i: Int) -> UInt32 { UInt32(b[i]) | UInt32(b[i + 1]) << 8 | UInt32(b[i + 2]) << 16 | UInt32(b[i + 3]) << 24 }
    func u64(_ i: Int) -> UInt64 { UInt64(u32(i)) | UInt64(u32(i + 4)) << 32 }

    struct Tokens {
        var start: Int
        var end: Int
        var indexEnd: Int
        var strings: [[UInt8]]
        /// The strings one after the other, token t at `flat[bounds[t] ..< bounds[t + 1]]`:
        /// one array to read in the name scan instead of one per token.
        var flat: [UInt8]
        var bounds: [Int]

        init(start: Int, end: Int, indexEnd: Int, strings: [[UInt8]]) {
            self.start = start; self.end = end; self.indexEnd = indexEnd; self.strings = strings
            flat = strings.flatMap { $0 }
            var b = [0]
            for t in strings { b.append(b[b.count - 1] + t.count) }
            bounds = b
        }
    }

    func run() throws(KallsymsError) -> [KernelSymbol] {
        guard let tokens = findTokens() else {
            throw KallsymsError("no kallsyms token table found (a kernel built without CONFIG_KALLSYMS, or not a kernel)")
        }
        guard let names = findNames(tokens) else {
            throw KallsymsError("kallsyms token table at offset 0x\(hex(tokens.start)) but no name table that decodes with it")
        }
        guard let addresses = findAddresses(tokens: tokens, names: names) else {
            throw KallsymsError("kallsyms names (\(names.names.count)) found but no address table that decodes to ascending kernel addresses with _text and start_kernel")
        }
        var out: [KernelSymbol] = []
        out.reserveCapacity(names.names.count)
        for (n, a) in zip(names.names, addresses) {
            guard let t = n.first else { continue }
            out.append(KernelSymbol(address: a, type: Character(UnicodeScalar(t)), name: String(decoding: n.dropFirst(), as: UTF8.self)))
        }
        return out
    }

    // MARK: Token table and index

    func findTokens() -> Tokens? {
        let digits: [UInt8] = (0x30...0x39).flatMap { [UInt8($0), 0] }
        var from = 0
        while from + digits.count <= b.count {
            guard let at = find(digits, in: b, from: from) else { return nil }
            if let t = tokens(digitsAt: at) { return t }
            from = at + 1
        }
        return nil
    }

    /// The table whose string 0x30 starts at `at`, if its index follows and agrees.
    func tokens(digitsAt at: Int) -> Tokens? {
        // Walk back to string 1: each string ends with the NUL just before the next one.
        // String 0's start cannot be found that way (what precedes the table need not end
        // with a NUL): the index says how long it is.
        var second = at
        for _ in 0..<0x2F {
            guard second >= 2, b[second - 1] == 0 else { return nil }
            var s = second - 1
            while s > 0, b[s - 1] != 0 { s -= 1 }
            // A token is never empty.
            guard s < second - 1 else { return nil }
            second = s
        }
        guard second >= 2, b[second - 1] == 0 else { return nil }
        var strings: [[UInt8]] = [[]]
        var offsets: [Int] = [0]
        var p = second
        for _ in 1..<256 {
            offsets.append(p - second)
            var e = p
            while e < b.count, b[e] != 0 { e += 1 }
            guard e < b.count, e > p, e - p <= 64 else { return nil }
            strings.append(Array(b[p..<e]))
            p = e + 1
        }
        // The index follows, aligned to 2, 4 or 8 bytes: 0, then string 1's offset (string
        // 0's length + 1), then the others at the same distances as in the table.
        for pad in 0..<8 where (p + pad) % 2 == 0 && p + pad + 512 <= b.count {
            let i = p + pad
            let first = u16(i + 2)
            guard u16(i) == 0, first >= 2, first <= 65, first <= second,
                  (1..<256).allSatisfy({ u16(i + 2 * $0) - first == offsets[$0] }) else { continue }
            let start = second - first
            guard !b[start..<(second - 1)].contains(0) else { continue }
            strings[0] = Array(b[start..<(second - 1)])
            return Tokens(start: start, end: p, indexEnd: i + 512, strings: strings)
        }
        return nil
    }

    // MARK: Names and markers

    struct Names {
        var start: Int
        var end: Int
        var countAt: Int
        var markersEnd: Int
        var names: [[UInt8]]
    }

    static let typeLetters = Set("TtDdBbRrAaVvWwUuNnGgSsIi?".utf8)

    /// The length of the name at `p` and the offset of its tokens.
    func nameLength(at p: Int) -> (length: Int, tokens: Int)? {
        guard p < b.count else { return nil }
        let l = Int(b[p])
        if l & 0x80 != 0 {
            guard p + 1 < b.count else { return nil }
            return ((l & 0x7F) | Int(b[p + 1]) << 7, p + 2)
        }
        return (l, p + 1)
    }

    // Plain index loops below: these run for every candidate position in a 60 MB image and
    // every one of ~100,000 names, and must stay fast in debug builds too (no generic
    // slices, no array literal per iteration).

    func expand(_ tokens: Tokens, _ p: Int, _ length: Int) -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(length * 4)
        var k = p
        while k < p + length {
            let t = tokens.strings[Int(b[k])]
            var j = 0
            while j < t.count { out.append(t[j]); j += 1 }
            k += 1
        }
        return out
    }

    /// Whether a name's expansion is a type letter and 1-511 printable characters, without
    /// building it.
    func plausibleExpansion(_ tokens: Tokens, _ p: Int, _ length: Int) -> Bool {
        let flat = tokens.flat, bounds = tokens.bounds, image = b
        var count = 0
        var k = p
        while k < p + length {
            let token = Int(image[k])
            var j = bounds[token]
            let end = bounds[token + 1]
            while j < end {
                let c = flat[j]
                if count == 0 {
                    if !Self.isTypeLetter(c) { return false }
                } else if c <= 0x20 || c >= 0x7F {
                    return false
                }
                count += 1
                j += 1
            }
            k += 1
        }
        return count >= 2 && count <= 512
    }

    func plausible(_ name: [UInt8]) -> Bool {
        guard name.count >= 2, name.count <= 512, Self.isTypeLetter(name[0]) else { return false }
        var j = 1
        while j < name.count {
            if name[j] <= 0x20 || name[j] >= 0x7F { return false }
            j += 1
        }
        return true
    }

    static let typeLetterTable: [Bool] = (0..<256).map { typeLetters.contains(UInt8($0)) }
    static func isTypeLetter(_ c: UInt8) -> Bool { typeLetterTable[Int(c)] }

    func findNames(_ tokens: Tokens) -> Names? {
        // The names come before the token table in every layout; up to 64 MiB before it.
        var c = tokens.start & ~3
        let lowest = max(8, tokens.start - (64 << 20))
        while c >= lowest {
            // The count just before the names, or 8 bytes before them after 4 bytes of zero.
            let n4 = Int(u32(c - 4))
            if n4 >= 16, n4 < (1 << 23), let found = names(at: c, count: n4, countAt: c - 4, tokens: tokens) { return found }
            if n4 == 0 {
                let n8 = Int(u32(c - 8))
                if n8 >= 16, n8 < (1 << 23), let found = names(at: c, count: n8, countAt: c - 8, tokens: tokens) { return found }
            }
            c -= 4
        }
        return nil
    }

    func names(at c: Int, count n: Int, countAt: Int, tokens: Tokens) -> Names? {
        // A cheap look at the first names before decoding them all.
        var p = c
        for _ in 0..<min(8, n) {
            guard let (l, t) = nameLength(at: p), l > 0, t + l <= tokens.start, plausibleExpansion(tokens, t, l) else { return nil }
            p = t + l
        }
        var names: [[UInt8]] = []
        names.reserveCapacity(n)
        var every256: [Int] = []
        p = c
        for i in 0..<n {
            if i % 256 == 0 { every256.append(p - c) }
            guard let (l, t) = nameLength(at: p), l > 0, t + l <= tokens.start else { return nil }
            let name = expand(tokens, t, l)
            guard plausible(name) else { return nil }
            names.append(name)
            p = t + l
        }
        // The markers follow, aligned; they must be the offsets of every 256th name.
        for m in [(p + 3) & ~3, (p + 7) & ~7] where m + 4 * every256.count <= b.count {
            if every256.indices.allSatisfy({ Int(u32(m + 4 * $0)) == every256[$0] }) {
                return Names(start: c, end: p, countAt: countAt, markersEnd: m + 4 * every256.count, names: names)
            }
        }
        return nil
    }

    // MARK: Addresses

    func findAddresses(tokens: Tokens, names: Names) -> [UInt64]? {
        let n = names.names.count
        var candidates: [(offsets: Int, base: Int?)] = []
        // Before 6.4: offsets, relative base, count, names.
        let baseBefore = (names.countAt - 8) & ~7
        for end in [baseBefore, baseBefore - 4] where end - 4 * n >= 0 {
            candidates.append((end - 4 * n, baseBefore))
        }
        // From 6.4: after the token index, offsets then the relative base.
        for start in [(tokens.indexEnd + 3) & ~3, (tokens.indexEnd + 7) & ~7] where start + 4 * n + 16 <= b.count {
            candidates.append((start, (start + 4 * n + 7) & ~7))
        }
        for c in candidates {
            guard let base = c.base, base >= 0, base + 8 <= b.count else { continue }
            let relativeBase = u64(base)
            for absolutePerCPU in [true, false] {
                var out: [UInt64] = []
                out.reserveCapacity(n)
                for i in 0..<n {
                    let o = Int32(bitPattern: u32(c.offsets + 4 * i))
                    if absolutePerCPU {
                        out.append(o >= 0 ? UInt64(o) : relativeBase &- 1 &- UInt64(bitPattern: Int64(o)))
                    } else {
                        out.append(relativeBase &+ UInt64(UInt32(bitPattern: o)))
                    }
                }
                if valid(out, names: names.names) { return out }
            }
        }
        // 64-bit absolute addresses (CONFIG_KALLSYMS_BASE_RELATIVE off): just before the count.
        let end = names.countAt & ~7
        if end - 8 * n >= 0 {
            let out = (0..<n).map { u64(end - 8 * n + 8 * $0) }
            if valid(out, names: names.names) { return out }
        }
        return nil
    }

    func valid(_ addresses: [UInt64], names: [[UInt8]]) -> Bool {
        for i in 1..<addresses.count where addresses[i] < addresses[i - 1] { return false }
        var text: UInt64?, start: UInt64?
        for (name, a) in zip(names, addresses) {
            let bare = name.dropFirst()
            if text == nil, bare.elementsEqual("_text".utf8) { text = a }
            if start == nil, bare.elementsEqual("start_kernel".utf8) { start = a }
        }
        guard let text, let start else { return false }
        return text >= 0xFFFF_8000_0000_0000 && start > text
    }

    func hex(_ v: Int) -> String { String(v, radix: 16) }
}
