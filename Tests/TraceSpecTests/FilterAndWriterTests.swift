import Foundation
import FlowTrace
import FlowTraceSimulation
import Testing
import TraceSpec

func filter(_ text: String, probe: Set<String> = ["rdi", "[rsp]:8", "xmm0", "gdtr", "al"], common: Set<String> = ["cr3"]) throws -> FilterSpec {
    try FilterSpec.parse(text, symbols: symbols, probeItems: probe, commonItems: common)
}

func filterError(_ text: String) -> String {
    switch Result(catching: { () throws(SpecError) -> FilterSpec in try FilterSpec.parse(text, symbols: symbols, probeItems: ["rdi", "[rsp]:8", "gdtr", "al"], commonItems: []) }) {
    case let .success(f):
        Issue.record("'\(text)' parsed as \(f.filter(timeOrigin: 0))")
        return ""
    case let .failure(e):
        return e.message
    }
}

extension Result where Failure == SpecError {
    init(catching body: () throws(SpecError) -> Success) {
        do { self = .success(try body()) } catch { self = .failure(error) }
    }
}

@Suite("filter grammar")
struct FilterSpecTests {
    @Test func ranges() throws {
        #expect(try filter("seq=10..19").filter(timeOrigin: 0) == .sequence(10...19))
        #expect(try filter("seq=7").filter(timeOrigin: 0) == .sequence(7...7))
        #expect(try filter("seq=100..").filter(timeOrigin: 0) == .sequence(100...UInt64.max))
        #expect(try filter("seq=..0x10").filter(timeOrigin: 0) == .sequence(0...16))
        #expect(try filter("vcpu=1").filter(timeOrigin: 0) == .vcpu(1...1))
        #expect(try filter("vcpu=0..3").filter(timeOrigin: 0) == .vcpu(0...3))
        #expect(try filter(" addr = 0x1000..0x2000 ").filter(timeOrigin: 0) == .address(0x1000...0x2000))
        // Timestamps count from the run's start.
        #expect(try filter("ts=1000..2000").filter(timeOrigin: 5_000_000) == .timestamp(5_001_000...5_002_000))
        #expect(try filter("ts=1ms..2.5ms").filter(timeOrigin: 0) == .timestamp(1_000_000...2_500_000))
        #expect(try filter("ts=1us..1s").filter(timeOrigin: 0) == .timestamp(1_000...1_000_000_000))
        #expect(try filter("ts=5..").filter(timeOrigin: 10) == .timestamp(15...UInt64.max))
    }

    @Test func symbolsAsAddresses() throws {
        #expect(try filter("addr=fib").filter(timeOrigin: 0) == .address(0x1000a5...0x1000e8))
        #expect(try filter("addr=fib+0x10").filter(timeOrigin: 0) == .address(0x1000b5...0x1000b5))
        // A label without a size is one address.
        #expect(try filter("addr=fault_here").filter(timeOrigin: 0) == .address(0x100200...0x100200))
    }

    @Test func probeData() throws {
        #expect(try filter("value:rdi=5").filter(timeOrigin: 0) == .probeData([.register("rdi", .u64(5))]))
        #expect(try filter("value:RDI=0x5").filter(timeOrigin: 0) == .probeData([.register("rdi", .u64(5))]))
        #expect(try filter("value:al=0xff").filter(timeOrigin: 0) == .probeData([ValueMatch(entry: "al", .register(.u8(0xff)))]))
        #expect(try filter("value:xmm0=0x0102").filter(timeOrigin: 0) == .probeData([ValueMatch(entry: "xmm0", .register(.u128(0x102)))]))
        // Memory of 8 bytes is matched as the number the outputs print (little-endian in memory).
        #expect(try filter("value:[rsp]=42").filter(timeOrigin: 0)
                == .probeData([ValueMatch(entry: "[rsp]:8", .bytes([0x2a, 0, 0, 0, 0, 0, 0, 0]))]))
        #expect(try filter("value:[ rsp ]:8=0x2a").filter(timeOrigin: 0)
                == .probeData([ValueMatch(entry: "[rsp]:8", .bytes([0x2a, 0, 0, 0, 0, 0, 0, 0]))]))
        // caller as printed (the return address), and :bytes as hex bytes in guest order.
        #expect(try filter("value:caller=0x1000d2").filter(timeOrigin: 0)
                == .probeData([ValueMatch(entry: "[rsp]:8", .bytes([0xd2, 0x00, 0x10, 0, 0, 0, 0, 0]))]))
        #expect(try filter("value:[rsp]:8:bytes=2a00000000000000").filter(timeOrigin: 0)
                == .probeData([ValueMatch(entry: "[rsp]:8", .bytes([0x2a, 0, 0, 0, 0, 0, 0, 0]))]))
        #expect(try filter("common:cr3=0x2000").filter(timeOrigin: 0) == .probeData([.register("cr3", .u64(0x2000))], common: true))
    }

    @Test func badFilters() {
        #expect(filterError("colour=red").hasPrefix("unknown filter 'colour' in 'colour=red': use seq=A..B"))
        #expect(filterError("nonsense").hasPrefix("unknown filter 'nonsense': use"))
        #expect(filterError("seq=9..1") == "'seq=9..1': the range is empty (9 > 1)")
        #expect(filterError("seq=abc") == "'seq=abc': 'abc' is not a number")
        #expect(filterError("seq=") == "'seq=': expected a value or a range A..B")
        #expect(filterError("addr=fob") == "'addr=fob': unknown symbol 'fob' (did you mean 'fib'?)")
        #expect(filterError("value:rsi=1") == "'value:rsi=1': any --probe does not collect 'rsi' (collected: [rsp]:8, al, gdtr, rdi)")
        #expect(filterError("common:rdi=1") == "'common:rdi=1': --common does not collect 'rdi'")
        #expect(filterError("value:al=0x100") == "'value:al=0x100': 0x100 does not fit in al (8 bits)")
        #expect(filterError("value:rdi=x") == "'value:rdi=x': 'x' is not a number (use decimal or 0x hex)")
        // 8 bytes of memory are a number, as the outputs print them; :bytes takes hex bytes.
        #expect(filterError("value:[rsp]=zz") == "'value:[rsp]=zz': 'zz' is not a number (use decimal or 0x hex; '[rsp]:bytes' takes hex bytes)")
        #expect(filterError("value:[rsp]:8:bytes=2a") == "'value:[rsp]:8:bytes=2a': 1 bytes given, '[rsp]:8:bytes' reads 8")
        #expect(filterError("value:[rsp]:8:bytes=zz") == "'value:[rsp]:8:bytes=zz': 'zz' is not hex bytes (two digits a byte, e.g. 2a000000)")
        #expect(filterError("value:gdtr=1").hasPrefix("'value:gdtr=1': gdtr holds a base and a limit"))
        #expect(filterError("value:rdi") == "'value:rdi': expected value:ITEM=VALUE")
        #expect(filterError("value:[rsp=1") == "'value:[rsp=1': unbalanced brackets")
    }
}

@Suite("report writers")
struct ReportWriterTests {
    /// Two records at 0x1000a5 (fib) on vCPUs 0 and 1: rdi, 8 bytes at 0x1000, gdtr, an
    /// unreadable xmm0; common cr3.
    func fixture() throws -> (TraceReport, Probe) {
        let target = InMemoryTarget(vcpuCount: 2, registers: [.general(7): 0x2a, .control(3): 0x2000, .gdtr: UInt128(0x17) << 64 | 0x1000],
                                    memoryBase: 0x1000, memory: [0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 0x01])
        let module = try TraceModule(target: target, commonProbe: Probe("c", entries: [try .register(named: "cr3")]))
        let probe = Probe("p", entries: [try .register(named: "rdi"), try .memory(at: 0x1000, size: 8),
                                         try .register(named: "gdtr"), try .register(named: "xmm0")])
        try module.addProbe(probe, at: 0x1000a5)
        try module.enable()
        target.fire(at: 0x1000a5, vcpu: 0)
        target.fire(at: 0x1000a5, vcpu: 1, overrides: [.general(7): 7])
        return (module.report(), probe)
    }

    func write(_ format: ReportFormat) throws -> String {
        let (report, probe) = try fixture()
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("writer-\(getpid())-\(format).out").path
        let writer = ReportWriter(format: format, probes: [(probe, ["rdi", "[0x1000]", "gdtr", "xmm0"])], commonKeys: ["CR3"],
                                  describe: { symbols.describe($0) + "+0x0" }, timeOrigin: report[0].timestamp, title: "fixture \"1\"")
        do {
            let sink = try ByteSink(replacing: path)
            writer.write(report, to: sink)
            try sink.commit()
        }
        return try String(contentsOfFile: path, encoding: .utf8)
    }

    @Test func jsonl() throws {
        let lines = try write(.jsonl).split(separator: "\n")
        #expect(lines.count == 2)
        let first = try #require(try JSONSerialization.jsonObject(with: Data(lines[0].utf8)) as? [String: Any])
        #expect(first["seq"] as? Int == 0 && first["ts_ns"] as? Int == 0 && first["vcpu"] as? Int == 0)
        #expect(first["addr"] as? String == "0x1000a5" && first["location"] as? String == "fib+0x0" && first["when"] as? String == "before")
        let values = try #require(first["values"] as? [String: Any])
        #expect(values["rdi"] as? String == "0x2a")
        // 8 bytes de ad be ef 00 00 00 01 in memory: the little-endian number they hold.
        #expect(values["[0x1000]"] as? String == "0x1000000efbeadde")
        #expect(values["gdtr"] as? [String: String] == ["base": "0x1000", "limit": "0x17"])
        #expect((values["xmm0"] as? [String: String])?["error"]?.isEmpty == false)
        #expect(first["common"] as? [String: String] == ["CR3": "0x2000"])
        #expect(lines[1].contains("\"vcpu\":1") && lines[1].contains("\"rdi\":\"0x7\""))
    }

    @Test func csvRowsFollowTheHeader() throws {
        let text = try write(.csv)
        let rows = text.split(separator: "\n").map(String.init)
        #expect(rows[0] == "seq,ts_ns,vcpu,addr,location,when,rdi,[0x1000],gdtr,xmm0,common:CR3")
        #expect(rows[1].hasPrefix("0,0,0,0x1000a5,fib+0x0,before,0x2a,0x1000000efbeadde,base=0x1000 limit=0x17,error: register xmm0 unreadable: "))
        #expect(rows[1].hasSuffix(",0x2000"))
    }

    @Test func chromeIsOneJSONDocument() throws {
        let doc = try #require(try JSONSerialization.jsonObject(with: Data(write(.chrome).utf8)) as? [String: Any])
        let events = try #require(doc["traceEvents"] as? [[String: Any]])
        #expect(events.count == 5)  // process name, two thread names, two instants
        #expect((events[0]["args"] as? [String: String])?["name"] == "fixture \"1\"")
        let instants = events.filter { $0["ph"] as? String == "i" }
        #expect(instants.map { $0["tid"] as? Int } == [0, 1])
        #expect(instants[0]["ts"] as? Double == 0)
    }

    @Test func tableAlignsColumns() throws {
        let lines = try write(.table).split(separator: "\n").map(String.init)
        #expect(lines.count == 3)
        #expect(lines[0].hasPrefix("SEQ  TIME_US  VCPU  LOCATION  WHEN    rdi   [0x1000]"))
        let at = lines[0].range(of: "rdi")!.lowerBound.utf16Offset(in: lines[0])
        #expect(lines[1].dropFirst(at).hasPrefix("0x2a") && lines[2].dropFirst(at).hasPrefix("0x7 "))
    }

    @Test func writeErrorsAreKept() {
        let sink = ByteSink(fd: -1)
        sink.write("x")
        sink.flush()
        #expect(sink.error == "Bad file descriptor")
    }

    @Test func jsonStringsAreEscaped() {
        #expect(jsonString("a\"b\\c\nd\u{1}") == "\"a\\\"b\\\\c\\nd\\u0001\"")
        #expect(hexBytes([0, 0xff, 0x0a]) == "00ff0a")
    }
}
