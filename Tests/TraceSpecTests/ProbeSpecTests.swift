import ELF
import FlowTrace
import Testing
import TestSupport
import TraceSpec

/// Symbols like the guests': fib (0x44 bytes), sum, element, a data table, a label.
let symbols = Symbolizer(symbols: [
    Symbol(name: "fib", address: 0x1000a5, size: 0x44, kind: .function),
    Symbol(name: "sum", address: 0x100100, size: 0x20, kind: .function),
    Symbol(name: "element", address: 0x100120, size: 0x10, kind: .function),
    Symbol(name: "table", address: 0x102000, size: 128, kind: .object),
    Symbol(name: "fault_here", address: 0x100200, size: 0, kind: .label),
])

func spec(_ text: String) throws -> ProbeSpec { try ProbeSpec.parse(text, symbols: symbols) }

/// The parser's message for `text` (the test fails if it parses).
func specError(_ text: String) -> String {
    do {
        let s = try ProbeSpec.parse(text, symbols: symbols)
        Issue.record("'\(text)' parsed as \(s.location) with \(s.items.map(\.key))")
        return ""
    } catch {
        return error.message
    }
}

@Suite("probe spec grammar")
struct ProbeSpecTests {
    @Test func locations() throws {
        #expect(try spec("fib").address == 0x1000a5)
        #expect(try spec("fib").location == "fib")
        #expect(try spec("fib+0x1a").address == 0x1000a5 + 0x1a)
        #expect(try spec("fib+0x1a").location == "fib+0x1a")
        #expect(try spec("fib+26").address == 0x1000a5 + 26)
        #expect(try spec("0x100000").address == 0x100000)
        #expect(try spec("1048576").address == 0x100000)
        #expect(try spec(" fib + 0x4 ").address == 0x1000a9)
        // A label has no size: any offset is allowed.
        #expect(try spec("fault_here+0x100").address == 0x100300)
        #expect(try spec("fib").timing == .before)
        #expect(try spec("fib@after").timing == .after)
        #expect(try spec("fib@before").timing == .before)
        #expect(try spec("fib").items.isEmpty)
    }

    @Test func theIssueExamples() throws {
        let a = try spec("fib:rdi")
        #expect(a.items.map(\.key) == ["rdi"])
        #expect(a.items[0].entry.description == "rdi")
        let b = try spec("fib+0x1a@after:rax")
        #expect(b.timing == .after && b.address == 0x1000bf && b.items.map(\.key) == ["rax"])
        let c = try spec("sum:[rdi+rsi*8]:8,rsi")
        #expect(c.address == 0x100100)
        #expect(c.items.map(\.key) == ["[rdi+rsi*8]:8", "rsi"])
        #expect(c.items[0].entry.description == "[rdi+rsi*8]:8")
    }

    @Test func memoryOperands() throws {
        func entry(_ item: String) throws -> String { try parseItem(item, symbols: symbols).entry.description }
        #expect(try entry("[0x2000]:16") == "[0x2000]:16")
        #expect(try entry("[0x2000]") == "[0x2000]:8")
        #expect(try entry("[rdi+rsi*8+16]:8") == "[rdi+rsi*8+16]:8")
        #expect(try entry("[rsp-8]:4") == "[rsp-8]:4")
        #expect(try entry("[ rsp + 8 ]") == "[rsp+8]:8")
        #expect(try entry("[rdi+rsi]") == "[rdi+rsi*1]:8")
        #expect(try entry("[rsi*4+rdi]") == "[rdi+rsi*4]:8")
        #expect(try entry("[8*rsi+rdi]") == "[rdi+rsi*8]:8")
        #expect(try entry("[16+rdi]") == "[rdi+16]:8")
        #expect(try entry("[-8+rsp]") == "[rsp-8]:8")
        #expect(try entry("[0x2000+rsi*8]") == "[0x2000+rsi*8]:8")
        #expect(try entry("[table]:4") == "[0x102000]:4")
        #expect(try entry("[table+8]") == "[0x102008]:8")
        #expect(try entry("[table+rsi*8]:8") == "[0x102000+rsi*8]:8")
        #expect(try entry("[eax]:2") == "[eax]:2")
        #expect(try entry("[rip+0x10]") == "[rip+16]:8")
        #expect(try entry("[0x1000-0x10]:1") == "[0xff0]:1")
        #expect(try entry("[rdi]:4096") == "[rdi]:4096")
        // Keys keep the user's text, whitespace removed.
        #expect(try parseItem("[ rdi + rsi * 8 ] : 8", symbols: symbols).key == "[rdi+rsi*8]:8")
    }

    @Test func registers() throws {
        let items = try parseItems("rdi, EAX,ah,xmm0,cr3,gdtr,rflags,rip", symbols: symbols)
        #expect(items.map(\.key) == ["rdi", "EAX", "ah", "xmm0", "cr3", "gdtr", "rflags", "rip"])
        #expect(items.map(\.entry.description) == ["rdi", "eax", "ah", "xmm0", "cr3", "gdtr", "rflags", "rip"])
    }

    @Test func badInputNamesTheToken() {
        #expect(specError("fob:rdi") == "unknown symbol 'fob' (did you mean 'fib'?)")
        #expect(specError("fib:rbz") == "unknown register 'rbz' (did you mean 'rbx', 'rbp', 'rbl'?)"
                || specError("fib:rbz").hasPrefix("unknown register 'rbz' (did you mean 'rb"))
        #expect(specError("fib:[rdi]:0") == "memory size 0 is out of range: use 1 to 4096 bytes")
        #expect(specError("fib:[rdi]:4097") == "memory size 4097 is out of range: use 1 to 4096 bytes")
        #expect(specError("fib:[rdi+rsi*3]") == "scale 3 is invalid: use 1, 2, 4 or 8")
        #expect(specError("fib:[rdi+rsi*16]") == "scale 16 is invalid: use 1, 2, 4 or 8")
        #expect(specError("fib:[rdi") == "unbalanced brackets: '[' without ']'")
        #expect(specError("fib:[rdi+8") == "unbalanced brackets: '[' without ']'")
        #expect(specError("fib:rdi]") == "unbalanced brackets: ']' without '['")
        #expect(specError("fib:[[rdi]]").hasPrefix("expected a register, symbol or number at '['"))
        #expect(specError("fib@during") == "expected 'before' or 'after' after '@', found 'during'")
        #expect(specError("fib+0x44") == "fib+0x44 is past the end of fib (68 bytes)")
        #expect(specError("fib-4").hasPrefix("'fib-...': offsets go forward"))
        #expect(specError("fib:") == "expected a register or [memory] at the end")
        #expect(specError("fib:rdi,") == "expected a register or [memory] at the end")
        #expect(specError("fib:rdi,rdi") == "'rdi' collects the same as 'rdi': list each item once")
        #expect(specError("fib:[xmm0]") == "'xmm0' cannot form an address: use a 16-, 32- or 64-bit general-purpose register")
        #expect(specError("fib:[cr3]") == "'cr3' cannot form an address: use a general-purpose register")
        #expect(specError("fib:[rdi+rsi+rdx]") == "'rdx': at most a base and an index register")
        #expect(specError("fib:[rdi+rsi*2+rdx*4]") == "'rdx*4': a memory operand has at most one index register")
        #expect(specError("fib:[nosuch]") == "unknown register or symbol 'nosuch'")
        #expect(specError("0x1zz") == "'0x1zz' is not a number (use decimal or 0x hex)")
        #expect(specError("0x1_0000_0000_0000_0000") == "number '0x1_0000_0000_0000_0000' does not fit in 64 bits")
        #expect(specError("") == "empty probe spec: use LOCATION[@before|@after][:ITEM,...], e.g. fib:rdi")
        #expect(specError("fib:rdi extra") == "unexpected 'extra'")
        #expect(specError("fib:[rdi]:8:8") == "unexpected ':'")
        #expect(specError("fib:[-rdi]") == "'-rdi': registers can only be added")
        #expect(specError("fib:[]") == "expected a register or a number before ']'")
    }
}

/// A fuzz input: `random` a string of up to `maxLength` characters of `alphabet`, else a
/// seed with characters inserted, deleted, replaced, or another seed's tail spliced in.
func fuzzText(random: Bool, seeds: [String], alphabet: [Unicode.Scalar], maxLength: Int, mutations: ClosedRange<Int>,
              using rng: inout SplitMix64) -> String {
    if random {
        let length = Int.random(in: 0...maxLength, using: &rng)
        return String(String.UnicodeScalarView((0..<length).map { _ in alphabet.randomElement(using: &rng)! }))
    }
    var s = Array(seeds.randomElement(using: &rng)!.unicodeScalars)
    for _ in 0..<Int.random(in: mutations, using: &rng) {
        let at = Int.random(in: 0...s.count, using: &rng)
        switch Int.random(in: 0..<4, using: &rng) {
        case 0: s.insert(alphabet.randomElement(using: &rng)!, at: at)
        case 1: if at < s.count { s.remove(at: at) }
        case 2: if at < s.count { s[at] = alphabet.randomElement(using: &rng)! }
        default:
            let other = Array(seeds.randomElement(using: &rng)!.unicodeScalars)
            s.insert(contentsOf: other[Int.random(in: 0...other.count, using: &rng)...], at: at)
        }
    }
    return String(String.UnicodeScalarView(s))
}

@Suite("probe spec fuzzing")
struct ProbeSpecFuzzTests {
    static let seeds = ["fib:rdi", "fib+0x1a@after:rax", "sum:[rdi+rsi*8]:8,rsi", "0x100000:[0x2000]:16",
                        "element@before:[rdi+rsi*8+16]:8,[rsp-8]:4,xmm0,gdtr", "fib:[table+rsi*8]:4096,ah",
                        "sum+8:[8*rsi+rdi],cr3,rflags"]
    static func parse(_ text: String) -> Result<ProbeSpec, SpecError> {
        Result { () throws(SpecError) -> ProbeSpec in try ProbeSpec.parse(text, symbols: symbols) }
    }

    static let alphabet = Array("fibsumrdxacp0123456789xX+-*[]:,@ _.$\u{e9}\t\0".unicodeScalars)

    /// 120 000 specs: random strings, and seeds with bytes inserted, deleted, replaced and
    /// spliced. Every one must parse or fail with a message; whatever parses must have
    /// items whose entries round-trip through their own descriptions.
    @Test func randomAndMutatedSpecsNeverCrash() throws {
        var rng = SplitMix64(state: 0xF10_7ACE)
        var parsed = 0, rejected = 0
        for n in 0..<120_000 {
            let text = fuzzText(random: n % 3 == 0, seeds: Self.seeds, alphabet: Self.alphabet, maxLength: 24, mutations: 1...3, using: &rng)
            switch Self.parse(text) {
            case let .success(p):
                parsed += 1
                for item in p.items {
                    let again = try parseItem(item.entry.description, symbols: symbols)
                    #expect(again.entry.description == item.entry.description, "\(text)")
                }
            case let .failure(e):
                rejected += 1
                #expect(!e.message.isEmpty && !e.message.contains("\n"), "\(text)")
            }
        }
        // Both outcomes happen, so the mutations reach past the first token.
        #expect(parsed > 1000 && rejected > 1000)
    }
}
