import ELF
import FlowTrace
import FlowTraceSimulation
import Testing
import TestSupport
import TraceSpec

/// rdi 5, rsi 0x100, rax -1, memory 0x1000.. = 0, 1, 2, ... (the `table` symbol is at 0x102000,
/// outside it).
let conditionTarget = InMemoryTarget(
    registers: [.general(7): 5, .general(6): 0x100, .general(0): UInt128(UInt64.max), .general(3): 0x1004, .rip: 0x1000a5],
    memoryBase: 0x1000, memory: (0..<256).map { UInt8($0) })

func condition(_ text: String) throws -> ProbeCondition {
    try #require(try spec("fib:rdi if " + text).condition)
}

func outcome(_ text: String, rdi: UInt64? = nil) throws -> ProbeCondition.Outcome {
    let c = try condition(text)
    return c.evaluate(conditionTarget.context(overrides: rdi.map { [.general(7): UInt128($0)] } ?? [:]))
}

func holds(_ text: String) throws -> Bool { try outcome(text) == .pass }

@Suite("conditions at the hit")
struct ConditionTests {
    @Test func arithmeticAndPrecedenceAreC() throws {
        #expect(try holds("1 + 2 * 3 == 7"))
        #expect(try holds("(1 + 2) * 3 == 9"))
        #expect(try holds("1 << 2 + 1 == 8"))           // + binds tighter than <<
        #expect(try holds("rdi & 2 == 2"))              // == binds tighter than &: 5 & (2 == 2) = 1
        #expect(try holds("(rdi & 2) == 2") == false)
        #expect(try holds("(1 | 2 ^ 3 & 1) == 3"))      // & before ^ before |: 1 | (2 ^ (3 & 1)) (left to right: 0)
        #expect(try holds("10 - 3 - 2 == 5"))           // left to right
        #expect(try holds("rdi * rsi == 0x500"))
        #expect(try holds("rdi > 4 && rdi < 6 && rdi != 7"))
        #expect(try holds("rdi < 4 || rsi >= 0x100"))
    }

    @Test func unsignedWrappingArithmetic() throws {
        #expect(try holds("rax == 0xffffffffffffffff"))
        #expect(try holds("-1 == rax"))
        #expect(try holds("~0 == rax"))
        #expect(try holds("!0 == 1 && !7 == 0"))
        #expect(try holds("3 - 5 > 1000"))               // wraps: unsigned
        #expect(try holds("rax + 2 == 1"))
        #expect(try holds("rax * 2 == 0xfffffffffffffffe"))
        #expect(try holds("1 << 64 == 0 && rax >> 64 == 0 && 1 << 63 == 0x8000000000000000"))
        #expect(try holds("rax & (1 << 63) != 0"))       // the sign bit: rax is negative as signed
        #expect(try holds("eax == 0xffffffff && al == 0xff && ah == 0xff && ax == 0xffff"))
    }

    @Test func memoryAndSymbols() throws {
        #expect(try holds("[0x1004]:1 == 4"))
        #expect(try holds("[rbx]:2 == 0x0504"))
        #expect(try holds("[rbx + 4]:4 == 0x0b0a0908"))
        #expect(try holds("[0x1000] == 0x0706050403020100"))
        #expect(try holds("[[0x1000]:1 + 0x1010]:1 == 0x10"))
        #expect(try holds("fib == 0x1000a5 && rip == fib"))
        #expect(try holds("table + 8 == 0x102008"))
        // A read outside memory: the condition is false, with the reason.
        guard case let .unreadable(e) = try outcome("[table]:4 == 0") else { Issue.record("[table] read"); return }
        #expect(e.description.contains("4 bytes at 0x102000 unreadable"))
        // && and || do not evaluate a side that does not decide.
        #expect(try outcome("rdi == 9 && [table] == 0") == .fail)
        #expect(try outcome("rdi == 5 || [table] == 0") == .pass)
        #expect(try outcome("rsp == 0") == .unreadable(.registerUnreadable("rsp", reason: "not available in this target")))
    }

    @Test func errorsNameTheToken() throws {
        #expect(specError("fib:rdi if") == "expected a condition after 'if', e.g. 'if rdi < 3'")
        #expect(specError("fib:rdi if rdi <") == "expected an operand at the end of the condition")
        #expect(specError("fib:rdi if (rdi < 3") == "expected ')' at the end")
        #expect(specError("fib:rdi if rdi < 3)") == "unexpected ')'")
        #expect(specError("fib:rdi if rdi @ 3") == "unexpected '@'")
        #expect(specError("fib:rdi if [rdi]:3 == 0") == "memory size '3' in a condition: use 1, 2, 4 or 8")
        #expect(specError("fib:rdi if [rdi == 0") == "expected ']' at the end")
        #expect(specError("fib:rdi if rdx < fibb") == "'fibb' is neither a register nor a symbol (did you mean 'fib'?)")
        #expect(specError("fib:rdi if xmm0 == 0") == "'xmm0': xmm0 is wider than 64 bits; conditions and aggregations compute in 64 bits")
        #expect(specError("fib:rdi if != 3") == "expected an operand at '!='")
        #expect(specError("fib if rdi == 99999999999999999999") == "number '99999999999999999999' does not fit in 64 bits")
        #expect(specError("fib:rdi if " + String(repeating: "(", count: 70) + "1" + String(repeating: ")", count: 70))
                .hasPrefix("condition nested too deeply at '(' (more than 64 levels)"))
        let wide = (0..<40).map { _ in "(1 +" }.joined() + "1" + String(repeating: ")", count: 40)
        #expect(specError("fib:rdi if " + wide).hasPrefix("'\(wide)': too complex: it needs 41 values at once"))
    }

    @Test func specsWithConditions() throws {
        let s = try spec("fib@after:rdi,rsi if rdi < 3 && [rsp]:8 != 0")
        #expect(s.timing == .after && s.items.map(\.key) == ["rdi", "rsi"])
        #expect(s.condition?.description == "rdi < 3 && [rsp]:8 != 0")
        #expect(try spec("fib if rdi == 1").items.isEmpty)
        #expect(try spec("fib if rdi == 1").condition != nil)
        #expect(try spec("fib:rdi").condition == nil)
    }

    /// A false condition takes no hit budget and keeps no record; read failures are counted
    /// with their reason.
    @Test func moduleCountsWhatTheConditionFilters() throws {
        let m = try TraceModule(target: conditionTarget)
        let c = try condition("(rdi & 1) == 0 || [0x1000 + rdi]:1 == 0x7f")
        try m.addProbe(Probe("p", entries: [try .register(named: "rdi")]), at: 0x100, condition: c)
        let u = try condition("[rdi]:1 == 0")
        try m.addProbe(Probe("q", entries: [try .register(named: "rdi")]), at: 0x200, condition: u)
        try m.enable(hitLimit: 60)
        // rdi 0 ... 199 at 0x100: even values pass, and 0x7f (memory[0x7f] == 0x7f).
        for v in 0..<200 { conditionTarget.fire(at: 0x100, vcpu: 0, overrides: [.general(7): UInt128(v)]) }
        // rdi 0 ... 9 at 0x200: addresses 0 ... 9 are not mapped.
        for v in 0..<10 { conditionTarget.fire(at: 0x200, vcpu: 0, overrides: [.general(7): UInt128(v)]) }
        let counters = m.counters
        let values = m.report().compactMap { r -> UInt64? in if case let .register(x)? = r.values.first { x.asUInt64 } else { nil } }
        // The budget of 60 went to passing hits only: 0, 2, ..., 118 (0x7f = 127 is past them).
        #expect(values == (0..<60).map { UInt64($0 * 2) })
        #expect(counters.locations[0].filtered == 59)     // the odd values 1 ... 117 before the limit
        #expect(counters.locations[0].taken == 60)
        #expect(counters.recordsTaken == 60)
        #expect(counters.locations[1].hits == 0)           // disarmed at the limit: nothing delivered
        let m2 = try TraceModule(target: conditionTarget)
        try m2.addProbe(Probe("q", entries: []), at: 0x300, condition: u)
        try m2.enable()
        for v in 0..<10 { conditionTarget.fire(at: 0x300, vcpu: 0, overrides: [.general(7): UInt128(v)]) }
        let l = m2.counters.locations[0]
        #expect(l.hits == 10 && l.filtered == 10 && l.conditionUnreadable == 10 && l.taken == 0 && l.suppressed == 0)
        #expect(l.conditionUnreadableReason == "1 bytes at 0x9 unreadable: not mapped")
        #expect(m2.counters.filteredAtHit == 10)
    }
}

@Suite("condition fuzzing")
struct ConditionFuzzTests {
    static let seeds = ["rdi < 3", "rdi == 1 || [rsp]:8 != fib", "(rax & 0xff) << 2 >= rsi * 3 - 1",
                        "![rbx + 4]:4 && ~rdi ^ table | 7", "-rax > 0x10 && (rdi != rsi || [0x1000]:2 == 0x100)"]
    static let alphabet = Array("rdisaxbfibtable0123456789xX+-*/[]():<>=!&|^~ _\t\u{e9}\0".unicodeScalars)

    /// 110 000 conditions: random strings and mutated seeds. Each parses or fails with a
    /// one-line message; each that parses is evaluated against registers and memory (some
    /// unreadable) without crashing.
    @Test func randomAndMutatedConditionsNeverCrash() throws {
        var rng = SplitMix64(state: 0xC0_DD17)
        var parsed = 0, rejected = 0, outcomes: [String: Int] = [:]
        for n in 0..<110_000 {
            let text = "fib:rdi if " + fuzzText(random: n % 3 == 0, seeds: Self.seeds, alphabet: Self.alphabet, maxLength: 30, mutations: 1...4, using: &rng)
            do {
                let p = try ProbeSpec.parse(text, symbols: symbols)
                guard let c = p.condition else { Issue.record("\(text): no condition"); continue }
                parsed += 1
                let r = c.evaluate(conditionTarget.context(overrides: [.general(7): UInt128(n & 0xFF)]))
                switch r {
                case .pass: outcomes["pass", default: 0] += 1
                case .fail: outcomes["fail", default: 0] += 1
                case .unreadable: outcomes["unreadable", default: 0] += 1
                }
            } catch {
                rejected += 1
                #expect(!error.message.isEmpty && !error.message.contains("\n"), "\(text)")
            }
        }
        #expect(parsed > 5_000 && rejected > 5_000)
        // Every outcome happens, so evaluation was reached with reads that work and fail.
        #expect(outcomes.count == 3, "\(outcomes)")
    }
}
