import Foundation
import LinuxKernel
import Testing
import TestSupport

/// Builds kallsyms tables as `scripts/kallsyms` lays them out, from a symbol list, so the
/// decoder is checked against tables whose every symbol the test knows.
struct KallsymsBuilder {
    enum Layout { case before64 /* offsets, base, count, names, markers, seqs, tokens */, from64 /* count, names, markers, tokens, offsets, base */ }
    var symbols: [KernelSymbol]
    var relativeBase: UInt64 = 0xFFFF_FFFF_8100_0000

    /// Token table: each character names use stands for itself; the free numbers get
    /// multi-character tokens (the most frequent pairs).
    func tokenTable(_ names: [[UInt8]]) -> [[UInt8]] {
        var used = Set<UInt8>()
        for n in names { used.formUnion(n) }
        var table = [[UInt8]](repeating: [], count: 256)
        for c in used { table[Int(c)] = [c] }
        var pairs: [[UInt8]: Int] = [:]
        for n in names where n.count >= 2 { for i in 0..<(n.count - 1) { pairs[[n[i], n[i + 1]], default: 0] += 1 } }
        var best = pairs.sorted { ($0.value, $0.key.lexicographicallyPrecedes($1.key) ? 1 : 0) > ($1.value, 0) }.map(\.key)
        for i in 0..<256 where table[i].isEmpty { table[i] = best.isEmpty ? [0x5F, 0x5F, UInt8(0x41 + i % 26)] : best.removeFirst() }
        return table
    }

    func encode(_ name: [UInt8], _ table: [[UInt8]]) -> [UInt8] {
        var out: [UInt8] = []
        var i = 0
        while i < name.count {
            if i + 1 < name.count, let t = (0..<256).first(where: { table[$0].count == 2 && table[$0] == [name[i], name[i + 1]] }) {
                out.append(UInt8(t)); i += 2
            } else {
                out.append(name[i]); i += 1
            }
        }
        return out
    }

    func build(layout: Layout, filler: inout SplitMix64) -> [UInt8] {
        let sorted = symbols.sorted { $0.address < $1.address }
        let names = sorted.map { Array(String($0.type).utf8) + Array($0.name.utf8) }
        let table = tokenTable(names)
        var out = filler.bytes(3000)
        func align(_ n: Int) { while out.count % n != 0 { out.append(0) } }
        func u32(_ v: UInt32) { for i in 0..<4 { out.append(UInt8(truncatingIfNeeded: v >> (8 * i))) } }
        func u64(_ v: UInt64) { for i in 0..<8 { out.append(UInt8(truncatingIfNeeded: v >> (8 * i))) } }
        func offsets() {
            align(8)
            for s in sorted {
                // Absolute per-CPU: small addresses stored as is, the rest as base - 1 - offset.
                let o: Int32 = s.address < 0x1_0000_0000 ? Int32(s.address) : Int32(-1 - Int64(s.address - relativeBase))
                u32(UInt32(bitPattern: o))
            }
            align(8); u64(relativeBase)
        }
        func namesAndMarkers() {
            align(8); u32(UInt32(sorted.count)); align(8)
            let start = out.count
            var markers: [UInt32] = []
            for (i, n) in names.enumerated() {
                if i % 256 == 0 { markers.append(UInt32(out.count - start)) }
                let e = encode(n, table)
                if e.count > 127 { out.append(UInt8(e.count & 0x7F) | 0x80); out.append(UInt8(e.count >> 7)) } else { out.append(UInt8(e.count)) }
                out += e
            }
            align(8); for m in markers { u32(m) }
        }
        func tokens() {
            align(8)
            var index: [UInt16] = []
            let start = out.count
            for t in table { index.append(UInt16(out.count - start)); out += t; out.append(0) }
            align(8); for i in index { out.append(UInt8(i & 0xFF)); out.append(UInt8(i >> 8)) }
        }
        switch layout {
        case .before64:
            offsets(); namesAndMarkers()
            align(8); out += filler.bytes(3 * sorted.count)  // kallsyms_seqs_of_names
            tokens()
        case .from64:
            namesAndMarkers(); tokens(); offsets()
        }
        out += filler.bytes(5000)
        return out
    }
}

func sampleSymbols(count: Int, seed: UInt64) -> [KernelSymbol] {
    var g = SplitMix64(state: seed)
    var out: [KernelSymbol] = [
        KernelSymbol(address: 0, type: "A", name: "fixed_percpu_data"),
        KernelSymbol(address: 0x1000, type: "A", name: "cpu_debug_store"),
        KernelSymbol(address: 0xFFFF_FFFF_8100_0000, type: "T", name: "_text"),
        KernelSymbol(address: 0xFFFF_FFFF_8100_0000, type: "T", name: "startup_64"),
    ]
    var address: UInt64 = 0xFFFF_FFFF_8100_1000
    let types: [Character] = ["T", "t", "D", "d", "R", "r", "B", "b", "W"]
    for i in 0..<count {
        address += 1 + g.next() % 300
        let parts = ["do", "sys", "init", "call", "read", "write", "pci", "x86", "irq", "0123456789"]
        let long = i % 97 == 5 ? String(repeating: "long_name_", count: 16) : ""
        let name = "\(parts[Int(g.next() % 10)])_\(parts[Int(g.next() % 10)])\(long)_\(i)"
        out.append(KernelSymbol(address: address, type: types[Int(g.next() % UInt64(types.count))], name: name))
        if i == count / 2 { address += 4; out.append(KernelSymbol(address: address, type: "T", name: "start_kernel")) }
    }
    return out
}

@Suite("Linux kernels: kallsyms, symbol files, payload decompression")
struct KallsymsTests {
    @Test("kallsyms tables a test builds decode to exactly its symbols", arguments: [KallsymsBuilder.Layout.before64, .from64])
    func decodesBuiltTables(layout: KallsymsBuilder.Layout) throws {
        let symbols = sampleSymbols(count: 3000, seed: 7)
        var filler = SplitMix64(state: 99)
        let image = KallsymsBuilder(symbols: symbols).build(layout: layout, filler: &filler)
        let decoded = try Kallsyms.decode(image)
        let expected = symbols.sorted { $0.address < $1.address }
        #expect(decoded.count == expected.count)
        #expect(decoded == expected)
        // A name longer than 127 token bytes (two-byte length) survived.
        #expect(decoded.contains { $0.name.count > 160 })
    }

    @Test("no tables, or tables without _text and start_kernel, are refused with the reason")
    func refusesWhatIsNotKallsyms() throws {
        var g = SplitMix64(state: 5)
        #expect(throws: KallsymsError.self) { try Kallsyms.decode(g.bytes(100_000)) }
        let withoutStart = sampleSymbols(count: 500, seed: 3).filter { $0.name != "start_kernel" }
        let image = KallsymsBuilder(symbols: withoutStart).build(layout: .before64, filler: &g)
        let e = #expect(throws: KallsymsError.self) { try Kallsyms.decode(image) }
        #expect(e?.description.contains("start_kernel") == true, "\(String(describing: e))")
    }

    @Test("corrupted tables never crash: each mutation decodes or is refused")
    func fuzzedTables() throws {
        var g = SplitMix64(state: 11)
        let base = KallsymsBuilder(symbols: sampleSymbols(count: 600, seed: 1)).build(layout: .before64, filler: &g)
        for _ in 0..<300 {
            var m = base
            for _ in 0..<(1 + Int(g.next() % 8)) { m[Int(g.next() % UInt64(m.count))] = UInt8(truncatingIfNeeded: g.next()) }
            if g.next() % 4 == 0 { m.removeLast(Int(g.next() % UInt64(m.count))) }
            do {
                let s = try Kallsyms.decode(m)
                // Whatever decodes is ascending and has the two anchors.
                #expect(zip(s, s.dropFirst()).allSatisfy { $0.address <= $1.address })
                #expect(s.contains { $0.name == "start_kernel" })
            } catch {
                // Refused: with a reason, never a crash.
                #expect(!error.description.isEmpty)
            }
        }
    }

    @Test("System.map, /proc/kallsyms and nm formats")
    func symbolFiles() throws {
        let text = """
        ffffffff81000000 T _text
        ffffffff81002560 T do_one_initcall
                         U undefined_in_nm
        ffffffffc0000000 t helper\t[mymodule]
        0000000000000000 A fixed_percpu_data
        """
        let s = try SymbolFile.parse(text, path: "map")
        #expect(s.map(\.name) == ["_text", "do_one_initcall", "helper", "fixed_percpu_data"])
        #expect(s[1].address == 0xFFFF_FFFF_8100_2560 && s[1].type == "T")
        let zeros = #expect(throws: SymbolFileError.self) { try SymbolFile.parse("0000000000000000 T a\n0000000000000000 T b\n", path: "/proc/kallsyms") }
        #expect(zeros?.description.contains("kptr_restrict") == true)
        let bad = #expect(throws: SymbolFileError.self) { try SymbolFile.parse("ffffffff81000000 T ok\nnot a symbol line at all\n", path: "m") }
        #expect(bad?.description == "--symbol-file m: line 2 is not 'ADDRESS TYPE NAME' (System.map, /proc/kallsyms or nm format): 'not a symbol line at all'")
    }

    @Test("sizes reach the next symbol's address; kinds follow the type letter")
    func elfView() {
        let k = KernelSymbols(symbols: [
            KernelSymbol(address: 0x100, type: "T", name: "a"),
            KernelSymbol(address: 0x100, type: "t", name: "a_alias"),
            KernelSymbol(address: 0x180, type: "D", name: "b"),
            KernelSymbol(address: 0x200, type: "A", name: "c"),
        ], source: .symtab)
        let e = k.elfSymbols
        #expect(e.map(\.size) == [0x80, 0x80, 0x80, 0])
        #expect(e.map(\.kind) == [.function, .function, .object, .label])
        #expect(e.map(\.isGlobal) == [true, false, true, true])
    }

    static func compress(_ data: [UInt8], _ format: CompressionFormat) throws -> [UInt8] {
        try compressedLikeLinux(data, format: format.rawValue)
    }

    @Test("every payload format decompresses to the original bytes", arguments: CompressionFormat.allCases)
    func decompresses(format: CompressionFormat) throws {
        var g = SplitMix64(state: 21)
        // Compressible and not: text, zeros, random; over 8 MiB so lz4 needs two blocks.
        var data = Array(String(repeating: "Linux version 6.1.0 kallsyms token table ", count: 100_000).utf8)
        data += [UInt8](repeating: 0, count: 3 << 20) + g.bytes(1 << 20)
        let packed = try Self.compress(data, format)
        #expect(CompressionFormat.detect(packed) == format)
        let out = try Decompression.decompress(packed, format: format)
        #expect(out.count == data.count)
        #expect(out == data)
    }

    @Test("truncated and corrupted payloads are refused, never a crash", arguments: CompressionFormat.allCases)
    func corruptPayloads(format: CompressionFormat) throws {
        var g = SplitMix64(state: 31)
        let data = Array(String(repeating: "start_kernel do_one_initcall ", count: 20_000).utf8) + g.bytes(50_000)
        let packed = try Self.compress(data, format)
        // Truncated to half: an error naming the format.
        let half = #expect(throws: DecompressionError.self) { try Decompression.decompress(Array(packed.prefix(packed.count / 2)), format: format) }
        #expect(half?.format == format)
        // Random damage: an error, or (rarely, where the format has no checksum) other bytes.
        for _ in 0..<40 {
            var m = packed
            for _ in 0..<(1 + Int(g.next() % 6)) { m[Int(6 + g.next() % UInt64(m.count - 6))] = UInt8(truncatingIfNeeded: g.next()) }
            do { _ = try Decompression.decompress(m, format: format, limit: 4 << 20) } catch {
                #expect(error.format == format)
            }
        }
        // A limit below the size is an error, not an allocation of the whole.
        let over = #expect(throws: DecompressionError.self) { try Decompression.decompress(packed, format: format, limit: 10_000) }
        #expect(over != nil)
    }

    @Test("the version string from a banner")
    func versionString() {
        let bytes = Array("xx%s version %sLinux version \0Linux version 6.1.0-57-amd64 (debian-kernel@lists.debian.org) #1 SMP\n".utf8)
        #expect(linuxVersionString(in: bytes) == "6.1.0-57-amd64 (debian-kernel@lists.debian.org) #1 SMP")
    }
}
