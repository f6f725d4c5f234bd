import FlowTrace
import FlowTraceSimulation
import Foundation
import Synchronization
import Testing

/// Runs `body(k)` on `n` OS threads at once and waits for all.
func onThreads(_ n: Int, _ body: @escaping @Sendable (Int) -> Void) {
    let group = DispatchGroup()
    for k in 0..<n {
        group.enter()
        Thread { body(k); group.leave() }.start()
    }
    group.wait()
}

@Suite("concurrent hits", .serialized)
struct ConcurrencyTests {
    static let threads = 8
    static let hitsPerThread = 100_000

    /// Defect 2: with many vCPUs hitting at once, exactly `limit` records are taken.
    @Test func hitLimitAndRecordCapUnderContention() throws {
        let t = makeTarget(vcpus: Self.threads)
        let m = try TraceModule(target: t)
        try m.addProbe(Probe("p", entries: entries("rdi", "rsi", "rax", "rbx") + [try .memory(at: 0x1000, size: 16)]), at: 0x100)
        let limit: UInt64 = 150_000, cap = 20_000
        try m.enable(hitLimit: limit, maxRecords: cap)
        let delivered = Atomic<Int>(0)
        onThreads(Self.threads) { k in
            // rdi counts each thread's hits, so the records show the order it took them in.
            for i in 0..<Self.hitsPerThread where t.fire(at: 0x100, vcpu: k, overrides: [.general(7): UInt128(i)]) != nil {
                delivered.add(1, ordering: .relaxed)
            }
        }
        let c = m.counters
        #expect(c.recordsTaken == limit)
        #expect(c.recordsKept == cap)
        #expect(c.evicted + UInt64(c.recordsKept) == c.recordsTaken)
        #expect(c.hitsSeen == UInt64(delivered.load(ordering: .relaxed)))
        #expect(c.hitsSeen == limit + c.suppressedOverLimit + c.suppressedDisabled)
        #expect(m.state == .created)
        #expect(t.hitLimitReports == 1)
        // Kept: the newest `cap`, unique and contiguous.
        let seqs = m.report().map(\.sequence)
        #expect(seqs == Array((limit - UInt64(cap))..<limit))
        // Per vCPU, records appear in the order the vCPU took them: in sequence order each
        // vCPU's rdi (its hit counter) strictly increases.
        var last: [Int: UInt64] = [:]
        var outOfOrder = 0
        for r in m.report() {
            guard case let .register(v)? = r.values.first else { Issue.record("record \(r.sequence) has no rdi"); continue }
            if let l = last[r.vcpu], v.asUInt64 <= l { outOfOrder += 1 }
            last[r.vcpu] = v.asUInt64
        }
        #expect(outOfOrder == 0)
        #expect(Set(last.keys).isSubset(of: Set(0..<Self.threads)))
    }

    /// Defect 5: reports taken while vCPUs hit are consistent snapshots.
    @Test func reportsDuringHitsAreConsistent() throws {
        let t = makeTarget(vcpus: 4)
        let m = try TraceModule(target: t)
        try m.addProbe(Probe("p", entries: entries("rsi")), at: 0x100)
        try m.enable(maxRecords: 5_000)
        let stop = Atomic<Bool>(false)
        let bad = Atomic<Int>(0)
        let reports = Atomic<Int>(0)
        onThreads(4) { k in
            if k == 0 {
                while !stop.load(ordering: .relaxed) {
                    let r = m.report()
                    let s = r.map(\.sequence)
                    if r.count > 5_000 || zip(s, s.dropFirst()).contains(where: { $0.0 + 1 != $0.1 }) { bad.add(1, ordering: .relaxed) }
                    reports.add(1, ordering: .relaxed)
                }
            } else {
                for _ in 0..<50_000 { t.fire(at: 0x100, vcpu: k) }
                if k == 1 { stop.store(true, ordering: .relaxed) }
            }
        }
        #expect(bad.load(ordering: .relaxed) == 0)
        #expect(reports.load(ordering: .relaxed) > 0)
        #expect(m.counters.recordsTaken == 150_000)
    }
}
