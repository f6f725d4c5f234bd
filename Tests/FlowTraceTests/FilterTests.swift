import FlowTrace
import FlowTraceSimulation
import Testing

/// Ten records: seq 0..9 alternate between 0x100 (probe rsi = i) and 0x200 (probe rsi = i),
/// vCPU = i % 3, common probe rdi = 0x1000 + i % 2.
func filterFixture() throws -> TraceReport {
    let t = makeTarget(vcpus: 3)
    let m = try TraceModule(target: t, commonProbe: Probe("ctx", entries: entries("rdi")))
    try m.addProbe(Probe("a", entries: entries("rsi", "al")), at: 0x100)
    try m.addProbe(Probe("b", entries: [try .register(named: "rsi"), try .memory(at: 0x1008, size: 4)]), at: 0x200)
    try m.enable()
    for i in 0..<10 {
        t.fire(at: i % 2 == 0 ? 0x100 : 0x200, vcpu: i % 3,
               overrides: [.general(6): UInt128(i), .general(7): 0x1000 + UInt128(i % 2), .general(0): UInt128(i * 3)])
    }
    return m.report()
}

@Suite("report filters")
struct FilterTests {
    func seqs(_ r: TraceReport) -> [UInt64] { r.map(\.sequence) }

    @Test func eachFilterAlone() throws {
        let r = try filterFixture()
        #expect(seqs(r) == Array(0..<10))
        #expect(seqs(r.filtered(by: .sequence(3...5))) == [3, 4, 5])
        #expect(seqs(r.filtered(by: .address(0x200...0x2FF))) == [1, 3, 5, 7, 9])
        #expect(seqs(r.filtered(by: .vcpu(2...2))) == [2, 5, 8])
        let ts = r.map(\.timestamp)
        #expect(ts == ts.sorted())
        // Exactly the records stamped inside the range (equal stamps may reach past 4 and 6).
        let inRange = ts.indices.filter { ts[$0] >= ts[4] && ts[$0] <= ts[6] }.map(UInt64.init)
        #expect(Set([4, 5, 6]).isSubset(of: Set(inRange)))
        #expect(seqs(r.filtered(by: .timestamp(ts[4]...ts[6]))) == inRange)
        #expect(seqs(r.filtered(by: .timestamp(0...UInt64.max))) == Array(0..<10))
    }

    /// Defect 3: probe-data filters match (on the probe's and on the common probe's values).
    @Test func probeDataMatches() throws {
        let r = try filterFixture()
        #expect(seqs(r.filtered(by: .probeData([.register("rsi", .u64(4))]))) == [4])
        // al is the low byte of rax = 3i: only location 0x100 has an al entry.
        #expect(seqs(r.filtered(by: .probeData([.register("al", .u8(12))]))) == [4])
        // Every match value must be met: rsi = 4 and al = 12 -> 4; rsi = 4 and al = 0 -> none.
        #expect(seqs(r.filtered(by: .probeData([.register("rsi", .u64(4)), .register("al", .u8(12))]))) == [4])
        #expect(seqs(r.filtered(by: .probeData([.register("rsi", .u64(4)), .register("al", .u8(0))]))).isEmpty)
        // Memory contents.
        #expect(seqs(r.filtered(by: .probeData([ValueMatch(entry: "[0x1008]:4", .bytes([8, 9, 10, 11]))]))) == [1, 3, 5, 7, 9])
        #expect(seqs(r.filtered(by: .probeData([ValueMatch(entry: "[0x1008]:4", .memory(address: 0x1008, bytes: [8, 9, 10, 11]))]))).count == 5)
        #expect(seqs(r.filtered(by: .probeData([ValueMatch(entry: "[0x1008]:4", .bytes([0, 0, 0, 0]))]))).isEmpty)
        // Common probe values.
        #expect(seqs(r.filtered(by: .probeData([.register("rdi", .u64(0x1001))], common: true))) == [1, 3, 5, 7, 9])
        // rdi is only in the common probe: a probe-data filter on the probe's values finds nothing.
        #expect(seqs(r.filtered(by: .probeData([.register("rdi", .u64(0x1001))]))).isEmpty)
    }

    @Test func combinedWithAllAndAny() throws {
        let r = try filterFixture()
        let f: [TraceFilter] = [.address(0x100...0x100), .vcpu(0...0)]
        #expect(seqs(r.filtered(by: f, combining: .all)) == [0, 6])
        #expect(seqs(r.filtered(by: f, combining: .any)) == [0, 2, 3, 4, 6, 8, 9])
        #expect(seqs(r.filtered(by: [], combining: .all)) == Array(0..<10))
        #expect(seqs(r.filtered(by: [], combining: .any)).isEmpty)
        // Filtering a filtered report narrows further.
        #expect(seqs(r.filtered(by: .sequence(2...8)).filtered(by: .vcpu(1...1))) == [4, 7])
    }

    /// Defect 4: reverse can be asked for and keeps exactly what does not match.
    @Test func reverseKeepsTheComplement() throws {
        let r = try filterFixture()
        #expect(seqs(r.filtered(by: .sequence(3...5), reverse: true)) == [0, 1, 2, 6, 7, 8, 9])
        let f: [TraceFilter] = [.address(0x100...0x100), .vcpu(0...0)]
        #expect(seqs(r.filtered(by: f, combining: .all, reverse: true)) == [1, 2, 3, 4, 5, 7, 8, 9])
        #expect(seqs(r.filtered(by: f, combining: .any, reverse: true)) == [1, 5, 7])
        #expect(seqs(r.filtered(by: .probeData([.register("rsi", .u64(4))]), reverse: true)) == [0, 1, 2, 3, 5, 6, 7, 8, 9])
        // The source report is untouched.
        #expect(r.count == 10)
    }

    @Test func filteredRecordsDecodeTheirValues() throws {
        let r = try filterFixture().filtered(by: .sequence(7...7))
        let rec = try #require(r.first)
        #expect(rec.values == [.register(.u64(7)), .memory(address: 0x1008, bytes: [8, 9, 10, 11])])
        #expect(rec.commonValues == [.register(.u64(0x1001))])
        #expect(rec.vcpu == 1 && rec.address == 0x200)
    }
}
