import Foundation
import ELF
import KVM
import Machine
import Testing
import TestSupport

private let kvmUsable = KVMHost.isUsable()
/// Whether the int3 engine works here (it does not on PVM hosts).
private let int3Works: Bool = kvmUsable && {
    do { return EngineSelfTest.support(host: try KVMHost()).works(.int3) } catch { return false }
}()

/// Every `fib(n)` argument in call order for the guest's fib(15).
func fibCalls(_ n: UInt64, into calls: inout [UInt64]) {
    calls.append(n)
    if n >= 2 { fibCalls(n - 1, into: &calls); fibCalls(n - 2, into: &calls) }
}

let fibArguments: [UInt64] = { var c: [UInt64] = []; fibCalls(15, into: &c); return c }()

/// Parses JSON Lines with Foundation's JSON parser; every line must be an object.
func parseJSONLines(_ text: String, sourceLocation: SourceLocation = #_sourceLocation) throws -> [[String: Any]] {
    try text.split(separator: "\n").map { line in
        let o = try JSONSerialization.jsonObject(with: Data(line.utf8))
        guard let d = o as? [String: Any] else { throw ParseFailure("not an object: \(line)") }
        return d
    }
}

struct ParseFailure: Error, CustomStringConvertible {
    var description: String
    init(_ d: String) { description = d }
}

/// A strict RFC 4180 parser: quoted fields, doubled quotes, CRLF or LF; every row must
/// have as many fields as the header.
func parseCSV(_ text: String) throws -> [[String]] {
    var rows: [[String]] = [], row: [String] = [], field = ""
    var inQuotes = false, wasQuoted = false
    var it = Array(text).makeIterator()
    var pending: Character? = nil
    func next() -> Character? { if let p = pending { pending = nil; return p }; return it.next() }
    while let c = next() {
        if inQuotes {
            if c == "\"" {
                if let d = next() {
                    if d == "\"" { field.append("\"") } else { inQuotes = false; pending = d }
                } else { inQuotes = false }
            } else { field.append(c) }
            continue
        }
        switch c {
        case "\"":
            guard field.isEmpty, !wasQuoted else { throw ParseFailure("quote inside an unquoted field") }
            inQuotes = true; wasQuoted = true
        case ",": row.append(field); field = ""; wasQuoted = false
        case "\n", "\r\n": row.append(field); rows.append(row); row = []; field = ""; wasQuoted = false
        default:
            guard !wasQuoted else { throw ParseFailure("text after a closing quote") }
            field.append(c)
        }
    }
    guard !inQuotes else { throw ParseFailure("unterminated quote") }
    if !field.isEmpty || !row.isEmpty { row.append(field); rows.append(row) }
    guard let width = rows.first?.count else { throw ParseFailure("no header") }
    for (i, r) in rows.enumerated() where r.count != width { throw ParseFailure("row \(i) has \(r.count) fields, header \(width)") }
    return rows
}

func hexValue(_ v: Any?) -> UInt64? {
    guard let s = v as? String, s.hasPrefix("0x") else { return nil }
    return UInt64(s.dropFirst(2), radix: 16)
}

/// Little-endian u64 from lower-case hex bytes.
func littleEndian(_ hex: String) -> UInt64? {
    guard hex.count == 16 else { return nil }
    var v: UInt64 = 0
    var i = hex.startIndex
    for k in 0..<8 {
        let j = hex.index(i, offsetBy: 2)
        guard let b = UInt64(hex[i..<j], radix: 16) else { return nil }
        v |= b << (8 * UInt64(k))
        i = j
    }
    return v
}

@Suite("flowtrace run with probes", .serialized, .timeLimit(.minutes(3)))
struct TracingCLITests {
    // MARK: formats, counts and values against the guests' ground truth

    @Test(.enabled(if: kvmUsable, kvmSkipReason))
    func jsonlFibArgumentsInCallOrder() throws {
        let r = try flowtrace("run", Guests.path("fib"), "--probe", "fib:rdi", "--format", "jsonl")
        #expect(r.status == 0)
        let records = try parseJSONLines(r.stdout)
        #expect(records.count == 1973)
        #expect(records.map { hexValue(($0["values"] as? [String: Any])?["rdi"]) } == fibArguments.map { Optional($0) })
        #expect(records.map { $0["seq"] as? Int } == (0..<1973).map { Optional($0) })
        #expect(records.allSatisfy { $0["location"] as? String == "fib+0x0" && $0["when"] as? String == "before" && $0["vcpu"] as? Int == 0 })
        let ts = records.compactMap { $0["ts_ns"] as? Int }
        #expect(ts.count == 1973 && ts == ts.sorted())
        // The console moved to stderr so stdout is only records; the summary follows.
        #expect(r.stderr.contains("fib(15) = 610, calls = 1973"))
        #expect(r.stderr.contains("1973 hits"))
        #expect(r.stderr.contains("1973 records written to stdout (jsonl, while the guest ran)"))
        #expect(r.stderr.contains("guest exited with status 0"))
    }

    @Test(.enabled(if: kvmUsable, kvmSkipReason))
    func indirectMemoryOnSum() throws {
        let r = try flowtrace("run", Guests.path("array"), "--probe", "sum:[rdi+rsi*8]:8,rsi", "--probe", "element:[rdi + rsi*8]", "--format", "jsonl")
        #expect(r.status == 0)
        let records = try parseJSONLines(r.stdout)
        #expect(records.count == 32)
        let sums = records.filter { $0["location"] as? String == "sum+0x0" }
        let elements = records.filter { $0["location"] as? String == "element+0x0" }
        #expect(sums.count == 16 && elements.count == 16)
        // 8 bytes of memory are shown as the number they hold.
        let values = sums.compactMap { hexValue(($0["values"] as? [String: Any])?["[rdi+rsi*8]:8"]) }
        #expect(values == (0..<16).map { 0x1000 * ($0 + 1) + $0 })
        #expect(values.reduce(0, +) == 557176)
        #expect(sums.map { hexValue(($0["values"] as? [String: Any])?["rsi"]) } == (0..<16).map { Optional(UInt64($0)) })
        // The key is the user's text without whitespace, the default size not added.
        #expect(elements.compactMap { hexValue(($0["values"] as? [String: Any])?["[rdi+rsi*8]"]) } == values)
        // :bytes keeps the raw bytes in guest order; 1, 2 and 4 bytes are numbers too.
        let raw = try flowtrace("run", Guests.path("array"), "--probe", "sum:[rdi+rsi*8]:8:bytes,[rdi+rsi*8]:2,[rdi+rsi*8]:4,[rdi+rsi*8]:1,[rdi+rsi*8]:3", "--format", "jsonl")
        #expect(raw.status == 0, "\(raw.stderr)")
        let rawValues = try parseJSONLines(raw.stdout).compactMap { $0["values"] as? [String: Any] }
        #expect(rawValues.compactMap { littleEndian(($0["[rdi+rsi*8]:8:bytes"] as? String) ?? "") } == values)
        #expect(rawValues.compactMap { hexValue($0["[rdi+rsi*8]:2"]) } == values.map { $0 & 0xFFFF })
        #expect(rawValues.compactMap { hexValue($0["[rdi+rsi*8]:4"]) } == values.map { $0 & 0xFFFF_FFFF })
        #expect(rawValues.compactMap { hexValue($0["[rdi+rsi*8]:1"]) } == values.map { $0 & 0xFF })
        // Other sizes stay bytes.
        #expect(rawValues.compactMap { $0["[rdi+rsi*8]:3"] as? String } == values.map { v in (0..<3).map { String(format: "%02x", (v >> (8 * UInt64($0))) & 0xFF) }.joined() })
    }

    @Test(.enabled(if: kvmUsable, kvmSkipReason))
    func csvCounterWithCommonItems() throws {
        let out = try temporaryFile([], name: "counter.csv")
        let r = try flowtrace("run", Guests.path("counter"), "--probe", "tick:rdi", "--common", "rip,cr3,gdtr", "-o", out)
        #expect(r.status == 0)
        #expect(r.stdout == "counter: 1000 calls, sum 499500\n")
        let rows = try parseCSV(String(contentsOfFile: out, encoding: .utf8))
        #expect(rows[0] == ["seq", "ts_ns", "vcpu", "addr", "location", "when", "rdi", "common:rip", "common:cr3", "common:gdtr", "symbols"])
        let data = rows.dropFirst()
        #expect(data.count == 1000)
        #expect(data.reduce(UInt64(0)) { $0 + UInt64($1[6].dropFirst(2), radix: 16)! } == 499500)
        #expect(Set(data.map { $0[7] }) == [data.first![3]])   // rip at the probe = its address
        // The boot page tables' root, as the loader lays it out.
        #expect(Set(data.map { $0[8] }) == ["0x\(String(BootLayout.pml4Address, radix: 16))"])
        #expect(data.allSatisfy { $0[9].hasPrefix("base=0x1000 limit=0x") })
        #expect(r.stderr.contains("1000 records written to \(out) (csv, while the guest ran)"))
        // No rdi (0 ... 999) lies in a function: the symbols cell is empty.
        #expect(data.allSatisfy { $0[10] == "" })
    }

    /// A csv value cell holds the value only, as printed elsewhere (caller as the return
    /// address); the function it lies in goes to the symbols column; the filter takes the
    /// value as printed. fib(15)'s recursive calls return to fib+0x2d or fib+0x39, the first
    /// to guest_main: 1 + 986 + 986 = 1973 (the guest's own count).
    @Test(.enabled(if: kvmUsable, kvmSkipReason))
    func csvCellsHoldValuesAndSymbolsTheirOwnColumn() throws {
        let r = try flowtrace("run", Guests.path("fib"), "--probe", "fib:rdi,caller", "--format", "csv")
        #expect(r.status == 0, "\(r.stderr)")
        let rows = try parseCSV(r.stdout)
        #expect(rows[0] == ["seq", "ts_ns", "vcpu", "addr", "location", "when", "rdi", "caller", "symbols"])
        let data = rows.dropFirst()
        #expect(data.count == 1973)
        let callers = Dictionary(grouping: data, by: { $0[7] })
        let fib = try #require(Symbolizer(image: try ELFImage(path: Guests.path("fib"))).address(of: "fib"))
        let inFib = [fib + 0x2d, fib + 0x39].map { "0x" + String($0, radix: 16) }
        #expect(callers[inFib[0]]?.count == 986 && callers[inFib[1]]?.count == 986, "\(callers.mapValues(\.count))")
        #expect(callers[inFib[0]]?.allSatisfy { $0[8] == "caller=fib+0x2d" } == true)
        let filtered = try flowtrace("run", Guests.path("fib"), "--probe", "fib:rdi,caller", "--format", "csv", "--filter", "value:caller=\(inFib[1])")
        #expect(filtered.status == 0, "\(filtered.stderr)")
        #expect(try parseCSV(filtered.stdout).dropFirst().map { $0[7] } == Array(repeating: inFib[1], count: 986))
    }

    @Test(.enabled(if: kvmUsable, kvmSkipReason))
    func chromeTraceOnTwoVCPUs() throws {
        let out = try temporaryFile([], name: "smp.json")
        let r = try flowtrace("run", Guests.path("smp"), "--vcpus", "2", "--probe", "work_unit:rdi", "-o", out)
        #expect(r.status == 0)
        let doc = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: out))) as? [String: Any]
        let events = try #require(doc?["traceEvents"] as? [[String: Any]])
        let instants = events.filter { $0["ph"] as? String == "i" }
        #expect(instants.count == 300)
        #expect(instants.filter { $0["tid"] as? Int == 0 }.count == 100)
        #expect(instants.filter { $0["tid"] as? Int == 1 }.count == 200)
        #expect(instants.allSatisfy { $0["name"] as? String == "work_unit+0x0" && $0["s"] as? String == "t" && $0["ts"] is Double })
        let names = events.filter { $0["ph"] as? String == "M" && $0["name"] as? String == "thread_name" }
            .compactMap { ($0["args"] as? [String: Any])?["name"] as? String }
        #expect(Set(names) == ["vCPU 0", "vCPU 1"])
    }

    @Test(.enabled(if: kvmUsable, kvmSkipReason))
    func tableIsAlignedAndSymbolized() throws {
        let r = try flowtrace("run", Guests.path("array"), "--probe", "element:rsi", "--format", "table")
        #expect(r.status == 0)
        let lines = r.stdout.split(separator: "\n").map(String.init)
        #expect(lines.count == 17)
        #expect(lines[0].hasPrefix("SEQ") && lines[0].contains("LOCATION") && lines[0].hasSuffix("rsi"))
        // Aligned: every column starts where its heading starts, after a blank, on every row.
        var starts: [Int] = []
        for (i, c) in lines[0].enumerated() where c != " " && (i == 0 || Array(lines[0])[i - 1] == " ") { starts.append(i) }
        #expect(starts.count == 6)
        for line in lines.dropFirst() {
            let chars = Array(line)
            for (k, s) in starts.enumerated() where k > 0 {
                // Right-aligned number columns end where their heading ends; text columns start there.
                let heading = Array(lines[0])[s...].prefix { $0 != " " }
                let headingEnd = s + heading.count - 1
                let cellStartsHere = s < chars.count && chars[s] != " " && chars[s - 1] == " "
                let cellEndsHere = headingEnd < chars.count && chars[headingEnd] != " "
                #expect(cellStartsHere || cellEndsHere, "column \(k) of '\(line)'")
            }
        }
        let column = lines[0].range(of: "LOCATION")!.lowerBound.utf16Offset(in: lines[0])
        #expect(lines.dropFirst().allSatisfy { $0.dropFirst(column).hasPrefix("element+0x0") })
        #expect(lines.last!.hasSuffix("0xf"))
    }

    @Test(.enabled(if: kvmUsable, kvmSkipReason))
    func afterProbesRecordPastTheInstruction() throws {
        let fib = try #require(try Machine(path: Guests.path("fib")).symbolizer.address(of: "fib"))
        let r = try flowtrace("run", Guests.path("fib"), "--probe", "fib@after:rip,[fib_calls]:8", "--format", "jsonl")
        #expect(r.status == 0)
        let records = try parseJSONLines(r.stdout)
        #expect(records.count == 1973)
        let rips = records.compactMap { hexValue(($0["values"] as? [String: Any])?["rip"]) }
        // One instruction (at most 15 bytes) past fib's first byte, on every hit.
        #expect(rips.count == 1973 && Set(rips).count == 1 && rips[0] > fib && rips[0] <= fib + 15)
        #expect(records.allSatisfy { $0["when"] as? String == "after" })
    }

    @Test(.enabled(if: kvmUsable, kvmSkipReason))
    func hitLimitAndMaxRecords() throws {
        let limited = try flowtrace("run", Guests.path("fib"), "--probe", "fib:rdi", "--hits", "10", "--format", "jsonl")
        #expect(limited.status == 0)
        #expect(try parseJSONLines(limited.stdout).map { hexValue(($0["values"] as? [String: Any])?["rdi"]) } == fibArguments.prefix(10).map { Optional($0) })
        // jsonl is written while the guest runs: --max-records bounds memory, nothing is lost.
        let streamed = try flowtrace("run", Guests.path("fib"), "--probe", "fib:[fib_calls]:8", "--max-records", "100", "--format", "jsonl")
        #expect(streamed.status == 0)
        let all = try parseJSONLines(streamed.stdout)
        #expect(all.map { $0["seq"] as? Int } == (0..<1973).map { Optional($0) })
        #expect(all.map { hexValue(($0["values"] as? [String: Any])?["[fib_calls]:8"]) } == (0..<1973).map { Optional(UInt64($0)) })
        #expect(streamed.stderr.contains("1973 records taken\n"))
        // Streamed: TAKEN per location, every one written; no EVICTED that reads like loss.
        #expect(streamed.stderr.contains("  LOCATION  WHEN    HITS  TAKEN  SUPPRESSED\n  fib       before  1973   1973           0\n"))
        #expect(streamed.stderr.contains("flowtrace: 1973 records written to stdout (jsonl, while the guest ran)"))
        // The table is written from what is kept: the newest 100.
        let bounded = try flowtrace("run", Guests.path("fib"), "--probe", "fib:[fib_calls]:8", "--max-records", "100", "--format", "table")
        #expect(bounded.status == 0)
        let seqs = bounded.stdout.split(separator: "\n").dropFirst().compactMap { Int($0.split(separator: " ").first ?? "") }
        #expect(seqs == Array(1873..<1973))
        #expect(bounded.stderr.contains("1873 evicted"))
    }

    // MARK: conditions at the hit

    /// `if rdi < 3`: exactly the calls fib(0), fib(1), fib(2), in the guest's own order
    /// (the arguments its recursion makes), F(14) + F(15) + F(14) = 1364 of the 1973; the
    /// other 609 are filtered at the hit and take none of --hits.
    @Test(.enabled(if: kvmUsable, kvmSkipReason))
    func conditionsSelectAtTheHit() throws {
        let r = try flowtrace("run", Guests.path("fib"), "--probe", "fib:rdi if rdi < 3", "--format", "jsonl")
        #expect(r.status == 0)
        let rdi = try parseJSONLines(r.stdout).map { hexValue(($0["values"] as? [String: Any])?["rdi"]) }
        #expect(rdi == fibArguments.filter { $0 < 3 }.map { Optional($0) })
        #expect(rdi.count == 1364)
        #expect(r.stderr.contains("1973 hits"))
        #expect(r.stderr.contains("1364 records taken, 609 filtered at the hit by their condition"))
        #expect(r.stderr.contains("  LOCATION  WHEN    HITS  FILTERED  TAKEN  SUPPRESSED\n  fib       before  1973       609   1364           0"))
        // The budget counts passing hits only: the first 10 calls with rdi == 1.
        let limited = try flowtrace("run", Guests.path("fib"), "--probe", "fib:rdi,[rsp]:8 if rdi == 1 && [rsp]:8 != 0", "--hits", "10", "--format", "jsonl")
        #expect(limited.status == 0)
        #expect(try parseJSONLines(limited.stdout).map { hexValue(($0["values"] as? [String: Any])?["rdi"]) } == Array(repeating: Optional(UInt64(1)), count: 10))
        // A condition reading memory the guest does not map: false at every hit, and said why.
        let unmapped = try flowtrace("run", Guests.path("fib"), "--probe", "fib:rdi if [0x7fff00000000]:4 == 0", "--format", "jsonl")
        #expect(unmapped.status == 0 && unmapped.stdout.isEmpty)
        #expect(unmapped.stderr.contains("flowtrace: fib: the condition could not be evaluated at 1973 hits (counted as false): 4 bytes at 0x7fff00000000 unreadable: guest-virtual address 0x7fff00000000 is not mapped"))
        expectOneLineError(try flowtrace("run", Guests.path("fib"), "--probe", "fib:rdi if rdi <"), status: 64,
                           "--probe 'fib:rdi if rdi <': expected an operand at the end of the condition")
    }

    // MARK: filters select exactly the right records

    @Test(.enabled(if: kvmUsable, kvmSkipReason))
    func filtersSelectExactly() throws {
        let fib = try Guests.path("fib")
        func seqs(_ extra: String...) throws -> [Int] {
            let r = try flowtrace(["run", fib, "--probe", "fib:rdi", "--format", "jsonl"] + extra)
            #expect(r.status == 0, "\(extra): \(r.stderr)")
            return try parseJSONLines(r.stdout).compactMap { $0["seq"] as? Int }
        }
        let all = Array(0..<1973)
        let five = all.filter { fibArguments[$0] == 5 }
        #expect(try seqs("--filter", "value:rdi=5") == five)
        #expect(try seqs("--filter", "value:RDI=0x5") == five)
        #expect(try seqs("--filter", "seq=10..19") == Array(10...19))
        #expect(try seqs("--filter", "seq=1970..") == [1970, 1971, 1972])
        #expect(try seqs("--filter", "seq=10..19", "--filter", "value:rdi=5") == five.filter { (10...19).contains($0) })
        #expect(try seqs("--filter", "seq=0..1", "--filter", "value:rdi=0", "--match", "any") == Array(Set([0, 1] + all.filter { fibArguments[$0] == 0 })).sorted())
        #expect(try seqs("--filter", "value:rdi=5", "--reverse") == all.filter { fibArguments[$0] != 5 })
        #expect(try seqs("--filter", "addr=fib") == all)
        #expect(try seqs("--filter", "addr=guest_main") == [])
        #expect(try seqs("--filter", "vcpu=1") == [])
        #expect(try seqs("--filter", "ts=0..") == all)
        #expect(try seqs("--filter", "ts=..1ns") == [])
    }

    @Test(.enabled(if: kvmUsable, kvmSkipReason))
    func vcpuSelectionAndCommonFilterOnSMP() throws {
        let r = try flowtrace("run", Guests.path("smp"), "--vcpus", "2", "--vcpu", "1", "--probe", "work_unit:rdi", "--format", "jsonl")
        #expect(r.status == 0)
        let records = try parseJSONLines(r.stdout)
        #expect(records.count == 200 && records.allSatisfy { $0["vcpu"] as? Int == 1 })
        #expect(r.stderr.contains("100 on other vCPUs than --vcpu"))
        let both = try flowtrace("run", Guests.path("smp"), "--vcpus", "2", "--probe", "work_unit", "--common", "rdi",
                                 "--filter", "vcpu=0", "--format", "jsonl")
        #expect(try parseJSONLines(both.stdout).count == 100)
    }

    // MARK: interrupted runs still write their records

    @Test(.enabled(if: kvmUsable, kvmSkipReason))
    func faultAndTimeoutStillWriteRecords() throws {
        let r = try flowtrace("run", Guests.path("spin"), "--probe", "spin_step:rdi", "--timeout", "3", "--format", "jsonl")
        #expect(r.status == 124)
        let records = try parseJSONLines(r.stdout)
        // The guest printed its 1000-steps line (to stderr, records on stdout), so at least
        // spin_step(0) ... spin_step(999) were taken before the limit.
        #expect(r.stderr.contains("spin: 1000 steps"))
        #expect(records.count >= 1000)
        #expect(r.stderr.contains("\(records.count) records written to stdout"))
        #expect(records.map { hexValue(($0["values"] as? [String: Any])?["rdi"]) } == (0..<records.count).map { Optional(UInt64($0)) })
        let f = try flowtrace("run", Guests.path("fault"), "--probe", "guest_main:rdi", "--format", "jsonl")
        #expect(f.status == 70)
        #expect(try parseJSONLines(f.stdout).count == 1)
        #expect(f.stderr.contains("guest fault on vCPU 0"))
    }

    // MARK: bad input: one line naming the token, exit 64, nothing run

    @Test func badProbeSpecs() throws {
        let fib = try Guests.path("fib")
        expectOneLineError(try flowtrace("run", fib, "--probe", "fob:rdi"), "--probe 'fob:rdi'", "unknown symbol 'fob'", "did you mean 'fib'")
        expectOneLineError(try flowtrace("run", fib, "--probe", "fib:rbz"), "--probe 'fib:rbz'", "unknown register 'rbz'", "did you mean")
        expectOneLineError(try flowtrace("run", fib, "--probe", "fib:[rdi]:0"), "memory size 0 is out of range")
        expectOneLineError(try flowtrace("run", fib, "--probe", "fib:[rdi]:4097"), "memory size 4097 is out of range")
        expectOneLineError(try flowtrace("run", fib, "--probe", "fib:[rdi+rsi*3]"), "scale 3 is invalid")
        expectOneLineError(try flowtrace("run", fib, "--probe", "fib:[rdi"), "unbalanced brackets")
        expectOneLineError(try flowtrace("run", fib, "--probe", "fib:rdi]"), "unbalanced brackets")
        expectOneLineError(try flowtrace("run", fib, "--probe", "fib:rdi", "--probe", "fib+0:rsi"), "--probe 'fib+0:rsi'", "already has --probe 'fib:rdi'")
        expectOneLineError(try flowtrace("run", fib, "--probe", "0x10", "--format", "jsonl"), "0x10 is not in the guest's code")
        expectOneLineError(try flowtrace("run", fib, "--common", "rdi,,"), "--common 'rdi,,'")
        expectOneLineError(try flowtrace("run", fib, "--filter", "seq=1"), "--filter needs at least one --probe")
        expectOneLineError(try flowtrace("run", fib, "--probe", "fib:rdi", "--filter", "colour=red"), "unknown filter 'colour'")
        expectOneLineError(try flowtrace("run", fib, "--probe", "fib:rdi", "--filter", "value:rsi=1"), "does not collect 'rsi'")
        expectOneLineError(try flowtrace("run", fib, "--probe", "fib:rdi", "--filter", "seq=9..1"), "the range is empty")
        expectOneLineError(try flowtrace("run", fib, "--probe", "fib:rdi", "--vcpu", "1"), "--vcpu 1", "vCPUs 0 to 0")
        expectOneLineError(try flowtrace("run", fib, "--probe", "fib:rdi", "-o", "/nonexistent/dir/x.jsonl"), "cannot write '/nonexistent/dir/x.jsonl'")
    }

    @Test(.enabled(if: kvmUsable, kvmSkipReason))
    func hwTakesAtMostFourLocations() throws {
        let probes = ["_start", "guest_main", "fib", "console_puts", "console_u64"].flatMap { ["--probe", $0] }
        let r = try flowtrace(["run", try Guests.path("fib"), "--engine", "hw"] + probes)
        expectOneLineError(r, "--engine hw arms at most 4 locations, 5 asked for")
    }

    @Test(.enabled(if: kvmUsable && !int3Works, "needs a usable /dev/kvm on which int3 does not work (a PVM host)"))
    func int3WhereItDoesNotWorkSaysWhy() throws {
        let r = try flowtrace("run", Guests.path("fib"), "--engine", "int3", "--probe", "fib:rdi")
        expectOneLineError(r, "--engine int3: does not work on this host (", "engines that work here: ")
    }

    @Test(.enabled(if: kvmUsable, kvmSkipReason))
    func doctorReportsEveryEngine() throws {
        let r = try flowtrace("doctor")
        #expect(r.status == 0)
        #expect(r.stdout.contains("API version 12"))
        #expect(r.stdout.contains("KVM_CAP_SET_GUEST_DEBUG"))
        for e in ["int3", "hlt", "hw", "step"] { #expect(r.stdout.contains("\n  \(e) ")) }
        for n in ["1 location ", "4 locations", "5 locations"] { #expect(r.stdout.contains(n)) }
        // Observed here, not by the self-test doctor prints: a 0xCC patched at counter's
        // tick, run directly on the KVM layer with USE_SW_BP, exits with #BP at tick or not.
        let observed = try int3TrapsHere()
        #expect(r.stdout.contains(observed ? "int3  works" : "int3  does not work"), "observed int3 trapping: \(observed)")
    }
}

/// Whether a guest int3 exits to us as KVM_EXIT_DEBUG #BP at its address on this host.
func int3TrapsHere() throws -> Bool {
    let m = try Machine(path: Guests.path("counter"))
    let tick = try #require(m.symbolizer.address(of: "tick"))
    try m.memory.write(physical: m.memory.translate(virtual: tick, cr3: m.layout.cr3).physical, bytes: [0xCC])
    var debug = GuestDebug()
    debug.softwareBreakpoints = true
    let v = m.vcpus[0]
    try v.setGuestDebug(debug)
    for _ in 0..<10_000 {
        switch try v.run() {
        case .ioOut, .interrupted: continue
        case let .debug(exception, pc, _, _): return exception == 3 && pc == tick
        default: return false
        }
    }
    return false
}

func flowtrace(_ args: [String]) throws -> ProcessOutput { try run(Guests.flowtrace, args) }

/// --count-by, --hist and --hist-linear on fib(15), against the guest's own recursion: fib(n)
/// runs F(16-n) times for n >= 1 and fib(0) F(14) = 377 times; every fib(n >= 2) calls fib
/// from its two call sites, main once.
@Suite("flowtrace run --count-by and --hist", .serialized, .timeLimit(.minutes(3)))
struct AggregationCLITests {
    static func fibonacci(_ n: Int) -> UInt64 { n <= 2 ? 1 : fibonacci(n - 1) + fibonacci(n - 2) }
    /// fib(n)'s calls in fib(15), n = 0 ... 15.
    static let calls: [UInt64] = (0...15).map { $0 == 0 ? 377 : fibonacci(16 - $0) }

    @Test(.enabled(if: kvmUsable, kvmSkipReason))
    func countsAndHistogramsMatchTheRecursion() throws {
        let out = try temporaryFile([], name: "fib-aggregations.json")
        let r = try flowtrace("run", Guests.path("fib"), "--probe", "fib", "--count-by", "rdi", "--count-by", "caller",
                              "--hist", "rdi", "--hist-linear", "rdi:0:16:4", "--max-records", "1", "-o", out)
        #expect(r.status == 0, "\(r.stderr)")
        #expect(r.stderr.contains("flowtrace: 4 results written to \(out) (4 aggregations x 1 location, json); no records"))
        // No record columns: aggregations keep no records.
        #expect(r.stderr.contains("  LOCATION  WHEN    HITS  SUPPRESSED\n  fib       before  1973           0\n"))
        #expect(r.stderr.contains("flowtrace: 1973 hits") && r.stderr.contains("1973 aggregated\n"))
        let doc = try #require(try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: out))) as? [String: Any])
        let list = try #require(doc["aggregations"] as? [[String: Any]])
        #expect(list.map { $0["kind"] as? String } == ["count", "count", "hist", "hist-linear"])
        #expect(list.allSatisfy { $0["hits"] as? Int == 1973 && $0["location"] as? String == "fib" })
        // Counts per argument: exactly the recursion's, most first (ties by value).
        let values = try #require(list[0]["values"] as? [[String: Any]])
        var expected = Self.calls.enumerated().map { (UInt64($0.offset), $0.element) }
        expected.sort { $0.1 != $1.1 ? $0.1 > $1.1 : $0.0 < $1.0 }
        #expect(values.map { hexValue($0["value"]) } == expected.map { Optional($0.0) })
        #expect(values.map { ($0["count"] as? Int).map(UInt64.init) } == expected.map { Optional($0.1) })
        // Callers: fib's two call sites 986 times each (one per fib(n >= 2)), guest_main once.
        let callers = try #require(list[1]["values"] as? [[String: Any]])
        #expect(callers.map { $0["count"] as? Int } == [986, 986, 1])
        #expect(callers.map { (($0["symbol"] as? String) ?? "").split(separator: "+").first.map(String.init) } == ["fib", "fib", "guest_main"])
        #expect(UInt64(Self.calls[2...].reduce(0, +)) == 986)
        // log2 buckets: [0], [1], [2, 4), [4, 8), [8, 16), the rest empty.
        let buckets = try #require(list[2]["buckets"] as? [[String: Any]])
        func sum(_ r: ClosedRange<Int>) -> UInt64 { Self.calls[r].reduce(0, +) }
        #expect(buckets.prefix(6).map { ($0["count"] as? Int).map(UInt64.init) } == [sum(0...0), sum(1...1), sum(2...3), sum(4...7), sum(8...15), 0])
        #expect(buckets.count == 65 && buckets.dropFirst(5).allSatisfy { $0["count"] as? Int == 0 })
        let linear = try #require(list[3]["buckets"] as? [[String: Any]])
        #expect(linear.map { ($0["count"] as? Int).map(UInt64.init) } == [sum(0...3), sum(4...7), sum(8...11), sum(12...15), 0])
        // The same counts as a full record run gives.
        let records = try flowtrace("run", Guests.path("fib"), "--probe", "fib:rdi,caller", "--format", "jsonl")
        let rows = try parseJSONLines(records.stdout)
        var byArgument: [UInt64: UInt64] = [:], byCaller: [String: Int] = [:]
        for row in rows {
            let v = row["values"] as? [String: Any]
            if let a = hexValue(v?["rdi"]) { byArgument[a, default: 0] += 1 }
            if let c = v?["caller"] as? String { byCaller[c, default: 0] += 1 }
        }
        #expect(byArgument == Dictionary(uniqueKeysWithValues: expected))
        #expect(Set(byCaller.values) == [986, 1] && byCaller.count == 3)
        #expect(Set(callers.compactMap { $0["value"] as? String }) == Set(byCaller.keys))
    }

    /// The tables people read: values sorted by count with --top, bpftrace-style bars.
    @Test(.enabled(if: kvmUsable, kvmSkipReason))
    func tablesAndBars() throws {
        let r = try flowtrace("run", Guests.path("fib"), "--probe", "fib if rdi < 4", "--count-by", "rdi", "--top", "2", "--hist", "rdi", "--format", "table")
        #expect(r.status == 0, "\(r.stderr)")
        let text = r.stdout
        #expect(text.hasPrefix("""
        fib (before): count by rdi, 1597 hits, 4 values (top 2)
          rdi  COUNT
          0x1    610
          0x0    377

        fib (before): hist of rdi, 1597 hits
          [0]     377 |@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@                    |
          [1]     610 |@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@|
          [2, 4)  610 |@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@|

        """), "\(text)")
        #expect(r.stderr.contains("376 filtered at the hit"))
        expectOneLineError(try flowtrace("run", Guests.path("fib"), "--probe", "fib", "--count-by", "rdi", "--format", "csv"), status: 64,
                           "--format csv: --count-by and --hist write a table or json")
        expectOneLineError(try flowtrace("run", Guests.path("fib"), "--probe", "fib", "--hist-linear", "rdi:0:10"), status: 64,
                           "--hist-linear 'rdi:0:10': expected ITEM:MIN:MAX:STEP")
        expectOneLineError(try flowtrace("run", Guests.path("fib"), "--probe", "fib", "--count-by", "[rdi]:3"), status: 64,
                           "--count-by '[rdi]:3': memory size '3'")
    }
}
