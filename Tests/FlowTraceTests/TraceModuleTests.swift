import FlowTrace
import FlowTraceSimulation
import Testing

/// rax=0x1111_2222_3333_4444, rdi=7, rsi=2, xmm0, gdtr; memory 0x1000.. holds bytes 0..255
/// twice, so the 8-byte element k of the array at 0x1000 is bytes 8k ..< 8k+8.
func makeTarget(vcpus: Int = 1) -> InMemoryTarget {
    InMemoryTarget(
        vcpuCount: vcpus,
        registers: [
            .general(0): 0x1111_2222_3333_4444, .general(7): 0x1000, .general(6): 2, .general(3): 0xAB00,
            .xmm(0): 0x0011_2233_4455_6677_8899_AABB_CCDD_EEFF, .gdtr: (0x17 << 64) | 0x1000, .rip: 0x100,
        ],
        memoryBase: 0x1000,
        memory: (0..<512).map { UInt8(truncatingIfNeeded: $0) })
}

func entries(_ specs: String...) throws -> [ProbeEntry] { try specs.map { try ProbeEntry.register(named: $0) } }

@Suite("trace modules")
struct TraceModuleTests {
    @Test func valuesAreTypedAsTheRegisterDefines() throws {
        let t = makeTarget()
        let m = try TraceModule(target: t)
        try m.addProbe(Probe("regs", entries: entries("rax", "eax", "ax", "al", "bh", "xmm0", "gdtr")), at: 0x100)
        try m.enable()
        t.fire(at: 0x100, vcpu: 0)
        let r = try #require(m.report().first)
        #expect(r.values == [
            .register(.u64(0x1111_2222_3333_4444)), .register(.u32(0x3333_4444)), .register(.u16(0x4444)),
            .register(.u8(0x44)), .register(.u8(0xAB)),
            .register(.u128(0x0011_2233_4455_6677_8899_AABB_CCDD_EEFF)),
            .register(.descriptorTable(base: 0x1000, limit: 0x17)),
        ])
        #expect(r.address == 0x100 && r.vcpu == 0 && r.sequence == 0 && r.timing == .before)
        #expect(r.value("eax") == .register(.u32(0x3333_4444)))
    }

    /// Defect 8: the indirect address uses the entry's own index register.
    @Test func memoryEntriesReadConstantAndIndirectAddresses() throws {
        let t = makeTarget()
        let m = try TraceModule(target: t)
        let rdi = try X86Register.resolve("rdi"), rsi = try X86Register.resolve("rsi")
        let element = try ProbeEntry.memory(MemoryOperand(base: .register(rdi), index: rsi, scale: 8), size: 8)
        let displaced = try ProbeEntry.memory(MemoryOperand(base: .register(rdi), index: rsi, scale: 4, displacement: -4), size: 2)
        let constant = try ProbeEntry.memory(at: 0x1010, size: 16)
        // The same probe used by two modules: each reads with its own (copied) entries.
        let probe = Probe("array", entries: [element, displaced, constant])
        try m.addProbe(probe, at: 0x200)
        let m2 = try TraceModule(target: t)
        try m2.addProbe(probe, at: 0x200)
        try m.enable()
        try m2.enable()
        t.fire(at: 0x200, vcpu: 0)
        for report in [m.report(), m2.report()] {
            let r = try #require(report.first)
            #expect(r.values == [
                .memory(address: 0x1010, bytes: Array(16..<24)),
                .memory(address: 0x1004, bytes: [4, 5]),
                .memory(address: 0x1010, bytes: Array(16..<32)),
            ])
        }
    }

    /// Defect 10: a value that cannot be read carries the reason; the rest is collected.
    @Test func unreadableValuesCarryTheirReason() throws {
        let t = makeTarget()
        let m = try TraceModule(target: t)
        try m.addProbe(Probe("mixed", entries: [
            try .register(named: "cr8"), try .memory(at: 0x9000, size: 4), try .register(named: "rdi"),
        ]), at: 0x100)
        try m.enable()
        t.fire(at: 0x100, vcpu: 0)
        let r = try #require(m.report().first)
        #expect(r.values == [
            .unreadable(reason: "register cr8 unreadable: not available in this target"),
            .unreadable(reason: "4 bytes at 0x9000 unreadable: not mapped"),
            .register(.u64(0x1000)),
        ])
    }

    @Test func commonProbeValuesComeWithEveryRecord() throws {
        let t = makeTarget()
        let m = try TraceModule(target: t, commonProbe: Probe("ctx", entries: entries("rip", "rsi")))
        try m.addProbe(Probe("a", entries: entries("rax")), at: 0x100)
        try m.addProbe(Probe("b"), at: 0x200, timing: .after)
        try m.enable()
        t.fire(at: 0x100, vcpu: 0)
        t.fire(at: 0x200, vcpu: 0)
        let rs = Array(m.report())
        #expect(rs.map(\.commonValues) == Array(repeating: [.register(.u64(0x100)), .register(.u64(2))], count: 2))
        #expect(rs.map(\.values) == [[.register(.u64(0x1111_2222_3333_4444))], []])
        #expect(rs.map(\.timing) == [.before, .after])
        #expect(rs[1].commonValue("rsi") == .register(.u64(2)))
    }

    @Test func stateRules() throws {
        let t = makeTarget(vcpus: 2)
        let m = try TraceModule(target: t)
        #expect(m.state == .created)
        #expect(throws: TraceError.noProbes) { try m.enable() }
        let p = Probe("p")
        try m.addProbe(p, at: 0x100)
        #expect(throws: TraceError.duplicateLocation(0x100)) { try m.addProbe(Probe("q"), at: 0x100, timing: .after) }
        try m.enable()
        #expect(m.state == .enabled)
        #expect(t.isArmed(0x100))
        #expect(throws: TraceError.invalidState(operation: "enable", state: .enabled)) { try m.enable() }
        #expect(throws: TraceError.invalidState(operation: "add a probe to", state: .enabled)) { try m.addProbe(p, at: 0x300) }
        try m.disable()
        #expect(m.state == .created)
        #expect(!t.isArmed(0x100))
        try m.addProbe(p, at: 0x300)
        #expect(m.locations.map(\.address) == [0x100, 0x300])
    }

    /// Defect 11: a failed creation hands out nothing and leaves the common probe unused.
    @Test func failedCreationRetainsNothing() throws {
        let t = makeTarget(vcpus: 2)
        let common = Probe("common")
        #expect(throws: TraceError.vcpuOutOfRange(2, count: 2)) { try TraceModule(target: t, vcpus: .only(2), commonProbe: common) }
        #expect(!common.isInUse)
        try common.add(.register(named: "rax"))
        #expect(common.entries.count == 1)
    }

    /// Defects 7 and 12: records, reports and modules release their probes, common one included.
    @Test func probesAreReleasedWithTheirLastUser() throws {
        weak var weakProbe: Probe?
        weak var weakCommon: Probe?
        let t = makeTarget()
        do {
            let probe = Probe("p", entries: try entries("rax"))
            let common = Probe("c", entries: try entries("rip"))
            weakProbe = probe
            weakCommon = common
            let m = try TraceModule(target: t, commonProbe: common)
            try m.addProbe(probe, at: 0x100)
            try m.enable()
            t.fire(at: 0x100, vcpu: 0)
            let report = m.report()
            #expect(report.count == 1)
            #expect(common.isInUse && probe.isInUse)
            try m.disable()
        }
        #expect(weakProbe == nil)
        #expect(weakCommon == nil)
    }

    @Test func moduleBoundToOneVCPUSuppressesTheOthers() throws {
        let t = makeTarget(vcpus: 2)
        let m = try TraceModule(target: t, vcpus: .only(1))
        try m.addProbe(Probe("p"), at: 0x100)
        try m.enable()
        for _ in 0..<3 { t.fire(at: 0x100, vcpu: 0) }
        for _ in 0..<2 { t.fire(at: 0x100, vcpu: 1) }
        #expect(m.report().map(\.vcpu) == [1, 1])
        let c = m.counters
        #expect(c.hitsSeen == 5 && c.suppressedWrongVCPU == 3 && c.recordsTaken == 2)
        #expect(c.locations == [LocationCounters(address: 0x100, timing: .before, hits: 5, taken: 2, evicted: 0)])
        #expect(c.locations[0].suppressed == 3 && c.locations[0].kept == 2)
    }

    /// Defect 1: hit limits work; at the limit the module disables itself.
    @Test func hitLimitDisablesTheModule() throws {
        let t = makeTarget()
        let m = try TraceModule(target: t)
        try m.addProbe(Probe("p", entries: try entries("rsi")), at: 0x100)
        try m.enable(hitLimit: 5)
        var delivered = 0
        for i in 0..<10 where t.fire(at: 0x100, vcpu: 0, overrides: [.general(6): UInt128(i)]) != nil { delivered += 1 }
        #expect(delivered == 5)
        #expect(m.report().map(\.values) == (0..<5).map { [.register(.u64(UInt64($0)))] })
        #expect(m.state == .created)
        #expect(t.hitLimitReports == 1)
        #expect(!t.isArmed(0x100))
        // Re-enabling resets the budget; sequence numbers go on.
        try m.enable(hitLimit: 2)
        for _ in 0..<3 { t.fire(at: 0x100, vcpu: 0) }
        #expect(m.report().map(\.sequence) == [0, 1, 2, 3, 4, 5, 6])
    }

    @Test func maxRecordsEvictsTheOldestInOrder() throws {
        let t = makeTarget()
        let m = try TraceModule(target: t)
        try m.addProbe(Probe("p", entries: try entries("rsi")), at: 0x100)
        try m.addProbe(Probe("q"), at: 0x200)
        try m.enable(maxRecords: 3)
        for i in 0..<10 { t.fire(at: i % 2 == 0 ? 0x100 : 0x200, vcpu: 0, overrides: [.general(6): UInt128(i)]) }
        let r = m.report()
        #expect(r.map(\.sequence) == [7, 8, 9])
        #expect(r.map(\.address) == [0x200, 0x100, 0x200])
        #expect(r[1].values == [.register(.u64(8))])
        let c = m.counters
        #expect(c.recordsTaken == 10 && c.recordsKept == 3 && c.evicted == 7)
        #expect(c.locations.map(\.evicted) == [4, 3])
        // Shrinking the bound on re-enable keeps the newest.
        try m.disable()
        try m.enable(maxRecords: 2)
        #expect(m.report().map(\.sequence) == [8, 9])
        #expect(m.counters.evicted == 8)
    }

    @Test func reportIsASnapshotAndClearDropsRecords() throws {
        let t = makeTarget()
        let m = try TraceModule(target: t)
        try m.addProbe(Probe("p"), at: 0x100)
        try m.enable()
        t.fire(at: 0x100, vcpu: 0)
        let before = m.report()
        t.fire(at: 0x100, vcpu: 0)
        #expect(before.count == 1)
        #expect(m.report().count == 2)
        m.clear()
        #expect(m.report().isEmpty)
        t.fire(at: 0x100, vcpu: 0)
        #expect(m.report().map(\.sequence) == [2])
        #expect(before.map(\.sequence) == [0])
    }

    /// Defect 6: the halt answer is the OR of the probe's and the common probe's.
    @Test("halt is the OR of probe and common probe", arguments: [(false, false), (true, false), (false, true), (true, true)])
    func haltIsOred(_ probeHalts: Bool, _ commonHalts: Bool) throws {
        let t = makeTarget()
        let m = try TraceModule(target: t, commonProbe: Probe("c", entries: commonHalts ? [.halt] : []))
        try m.addProbe(Probe("p", entries: probeHalts ? [.halt] : []), at: 0x100)
        try m.enable()
        #expect(t.fire(at: 0x100, vcpu: 0) == (probeHalts || commonHalts ? .halt : .continue))
    }

    @Test func callbacksRunWithTheHitContext() throws {
        let t = makeTarget()
        let m = try TraceModule(target: t)
        let seen = Locked<[String]>([])
        let cb = ProbeEntry.callback { hit, context in
            let rsi: String
            do { rsi = try context.read(X86Register.resolve("rsi")).description } catch { rsi = "\(error)" }
            seen.withLock { $0.append("vcpu \(hit.vcpu) at \(hit.address.map { String($0, radix: 16) } ?? "-") rsi \(rsi)") }
        }
        try m.addProbe(Probe("cb", entries: [cb]), at: 0x100)
        try m.enable()
        t.fire(at: 0x100, vcpu: 0)
        #expect(seen.withLock { $0 } == ["vcpu 0 at 100 rsi 0x2"])
        #expect(m.report().first?.values == [ProbeValue.none])
    }

    @Test func targetGone() throws {
        var t: InMemoryTarget? = makeTarget()
        let m = try TraceModule(target: t!)
        try m.addProbe(Probe("p"), at: 0x100)
        t = nil
        #expect(m.state == .targetGone)
        #expect(throws: TraceError.targetGone) { try m.enable() }
    }
}

import Locking
import Synchronization
