@testable import FlowTrace
import FlowTraceSimulation
import Foundation
import Locking
import TestSupport
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

/// The record stream: every record handed out once, in sequence order, while vCPU threads
/// hit; the producers wait for a full window; memory follows the windows, not the trace.
@Suite("record stream", .serialized)
struct RecordStreamTests {
    /// 4 threads x 100,000 hits through a window of 4,096 records (so producers wait for the
    /// consumer again and again) while only 1,000 records are kept: the consumer gets all
    /// 400,000 exactly once, sequence numbers 0, 1, 2 ... in order, each thread's rdi
    /// (its own hit counter) 0, 1, 2 ... in order.
    @Test func everyRecordOnceInOrderThroughASmallWindow() throws {
        try withWatchdog(120, "stream with a full window") {
            let threads = 4, perThread = 100_000
            let t = makeTarget(vcpus: threads)
            let m = try TraceModule(target: t)
            try m.addProbe(Probe("p", entries: entries("rdi")), at: 0x100)
            m.openStream(maxPendingBytes: 1)   // the minimum: one chunk of 4,096 records
            try m.enable(maxRecords: 1_000)
            let producing = Atomic<Int>(threads)
            let got = Locked<(count: Int, nextSeq: UInt64, next: [Int], bad: [String], maxPending: Int, maxSlots: Int)>(
                (0, 0, Array(repeating: 0, count: threads), [], 0, 0))
            onThreads(threads + 1) { k in
                if k < threads {
                    for i in 0..<perThread { _ = t.fire(at: 0x100, vcpu: k, overrides: [.general(7): UInt128(i)]) }
                    producing.subtract(1, ordering: .releasing)
                    return
                }
                // The consumer: until the producers are done and the stream is empty.
                while true {
                    let done = producing.load(ordering: .acquiring) == 0
                    let batch = m.takeStreamed(maxRecords: 1_000, wait: .milliseconds(20))
                    let totals = m.storeTotals
                    got.withLock { g in
                        g.maxPending = max(g.maxPending, totals.pending)
                        g.maxSlots = max(g.maxSlots, totals.slots)
                        for r in batch {
                            if r.sequence != g.nextSeq, g.bad.count < 5 { g.bad.append("seq \(r.sequence), expected \(g.nextSeq)") }
                            g.nextSeq = r.sequence + 1
                            guard case let .register(v)? = r.values.first else { g.bad.append("no rdi at \(r.sequence)"); continue }
                            if v.asUInt64 != UInt64(g.next[r.vcpu]), g.bad.count < 5 {
                                g.bad.append("vCPU \(r.vcpu): rdi \(v.asUInt64), expected \(g.next[r.vcpu])")
                            }
                            g.next[r.vcpu] = Int(v.asUInt64) + 1
                            g.count += 1
                        }
                    }
                    if done && batch.isEmpty { break }
                }
            }
            let g = got.withLock { $0 }
            #expect(g.bad == [])
            #expect(g.count == threads * perThread)
            #expect(g.next == Array(repeating: perThread, count: threads))
            let c = m.counters
            #expect(c.recordsTaken == UInt64(threads * perThread) && c.recordsLost == 0)
            #expect(c.recordsKept == 1_000)
            #expect(m.report().map(\.sequence) == Array(UInt64(threads * perThread - 1_000)..<UInt64(threads * perThread)))
            // The window never held more than its 4,096 records; memory: that window and
            // the 1,000 kept, in whole chunks, plus the one being filled.
            #expect(g.maxPending <= RecordStore.chunkSlots)
            #expect(g.maxSlots <= 3 * RecordStore.chunkSlots)
        }
    }

    /// `maxRecords` 1 to 3 across several chunk boundaries: the newest are kept, the rest
    /// counted as evicted (the chunk of the record being evicted is the one reused).
    @Test func tinyBoundsAcrossChunks() throws {
        for cap in 1...3 {
            let t = makeTarget()
            let m = try TraceModule(target: t)
            try m.addProbe(Probe("p", entries: entries("rdi")), at: 0x100)
            try m.enable(maxRecords: cap)
            let n = 3 * RecordStore.chunkSlots + 5
            for i in 0..<n { t.fire(at: 0x100, vcpu: 0, overrides: [.general(7): UInt128(i)]) }
            let kept = m.report().compactMap { r -> UInt64? in if case let .register(v)? = r.values.first { v.asUInt64 } else { nil } }
            #expect(kept == (n - cap..<n).map { UInt64($0) }, "cap \(cap)")
            #expect(m.counters.evicted == UInt64(n - cap))
            #expect(m.storeTotals.slots <= 2 * RecordStore.chunkSlots)
        }
    }

    /// A producer waiting for room goes on when the stream is closed (no consumer at all),
    /// and the module keeps what `maxRecords` says.
    @Test func closingReleasesAWaitingProducer() throws {
        try withWatchdog(60, "a producer waiting on a closed stream") {
            let t = makeTarget()
            let m = try TraceModule(target: t)
            try m.addProbe(Probe("p", entries: entries("rdi")), at: 0x100)
            m.openStream(maxPendingBytes: 1)
            try m.enable(maxRecords: 10)
            let fired = Atomic<Int>(0)
            let producer = try JoinableThread {
                for i in 0..<(RecordStore.chunkSlots + 100) {
                    _ = t.fire(at: 0x100, vcpu: 0, overrides: [.general(7): UInt128(i)])
                    fired.add(1, ordering: .relaxed)
                }
            }
            // The window fills: the producer stops at its 4,097th hit until the stream closes.
            while m.storeTotals.pending < RecordStore.chunkSlots { sched_yield() }
            #expect(fired.load(ordering: .relaxed) == RecordStore.chunkSlots)
            m.closeStream()
            producer.join()
            #expect(fired.load(ordering: .relaxed) == RecordStore.chunkSlots + 100)
            #expect(m.counters.recordsTaken == UInt64(RecordStore.chunkSlots + 100))
            #expect(m.report().map(\.sequence) == Array(UInt64(RecordStore.chunkSlots + 90)..<UInt64(RecordStore.chunkSlots + 100)))
            #expect(m.takeStreamed().isEmpty)
        }
    }

    /// Re-enabling with a wider probe (a new slot size) keeps the records the stream has not
    /// taken yet, with their values, and `clear()` drops only the kept ones.
    @Test func reconfigureAndClearKeepWhatTheStreamHasNotTaken() throws {
        let t = makeTarget()
        let m = try TraceModule(target: t)
        try m.addProbe(Probe("p", entries: entries("rdi")), at: 0x100)
        m.openStream()
        try m.enable(maxRecords: 5)
        for i in 0..<10_000 { _ = t.fire(at: 0x100, vcpu: 0, overrides: [.general(7): UInt128(i)]) }
        try m.disable()
        m.clear()
        #expect(m.report().isEmpty)
        try m.addProbe(Probe("wide", entries: entries("rsi") + [try .memory(at: 0x1000, size: 64)]), at: 0x200)
        try m.enable(maxRecords: 5)
        _ = t.fire(at: 0x200, vcpu: 0)
        var values: [UInt64] = []
        var seqs: [UInt64] = []
        while true {
            let b = m.takeStreamed(maxRecords: 3_000)
            if b.isEmpty { break }
            for r in b {
                seqs.append(r.sequence)
                if r.address == 0x100, case let .register(v)? = r.values.first { values.append(v.asUInt64) }
            }
        }
        #expect(seqs == Array(0...10_000))
        #expect(values == Array(0..<10_000))
        #expect(m.report().map(\.address) == [0x200])
    }
}

/// Counts and histograms computed at the hit, from several vCPU threads at once: exact.
@Suite("aggregations at the hit", .serialized)
struct AggregationTests {
    /// 4 threads x 50,000 hits, rdi = i % 100 (every value 0 ... 99 2,000 times per
    /// thread), rsi = i: counts per value, log2 and linear buckets match what the values
    /// give; a memory read that fails is counted with its reason; --max-records 1 keeps one.
    @Test func exactUnderContention() throws {
        let t = makeTarget(vcpus: 4)
        let m = try TraceModule(target: t)
        try m.addProbe(Probe("p", entries: []), at: 0x100)
        let rdi = ProbeCondition.Expression.register(X86Register.named("rdi")!)
        let rsi = ProbeCondition.Expression.register(X86Register.named("rsi")!)
        try m.addAggregation(Aggregation(item: "rdi", expression: ProbeCondition(rdi, text: "rdi"), kind: .count))
        try m.addAggregation(Aggregation(item: "rsi", expression: ProbeCondition(rsi, text: "rsi"), kind: .log2Histogram))
        try m.addAggregation(Aggregation(item: "rdi", expression: ProbeCondition(rdi, text: "rdi"), kind: .linearHistogram(min: 10, max: 50, step: 20)))
        // Memory at 0x1000 + rdi*8: mapped for rdi < 64 (512 bytes), not beyond.
        let slot = ProbeCondition.Expression.memory(.binary(.add, .constant(0x1000), .binary(.multiply, rdi, .constant(8))), size: 1)
        try m.addAggregation(Aggregation(item: "[0x1000+rdi*8]:1", expression: ProbeCondition(slot, text: "mem"), kind: .count))
        try m.enable(maxRecords: 1)
        onThreads(4) { k in
            for i in 0..<50_000 { t.fire(at: 0x100, vcpu: k, overrides: [.general(7): UInt128(i % 100), .general(6): UInt128(i)]) }
        }
        let r = m.aggregationResults
        #expect(r.count == 4)
        #expect(r[0].hits == 200_000 && r[0].values.count == 100)
        #expect(r[0].values.allSatisfy { $0.count == 2_000 })
        #expect(r[0].values.map(\.value) == Array(0..<100))      // ties: lower value first
        // log2 of rsi = 0 ... 49,999, 4 times each.
        var log2 = [UInt64](repeating: 0, count: 65)
        for i in 0..<50_000 { log2[i == 0 ? 0 : 64 - UInt64(i).leadingZeroBitCount] += 4 }
        #expect(r[1].buckets.map(\.count) == log2)
        #expect(r[1].buckets[2].low == 2 && r[1].buckets[2].high == 4 && r[1].buckets[64].high == nil)
        // Linear: below 10, [10, 30), [30, 50), 50 and above.
        let linear: [UInt64] = [10 * 2_000, 20 * 2_000, 20 * 2_000, 50 * 2_000]
        #expect(r[2].buckets.map(\.count) == linear)
        #expect(r[2].buckets.map(\.low) == [0, 10, 30, 50])
        // Memory: byte (rdi*8) & 0xff for rdi < 64; unreadable for 64 ... 99.
        #expect(r[3].hits == 64 * 2_000 && r[3].unreadable == 36 * 2_000)
        #expect(r[3].unreadableReason?.contains("unreadable: not mapped") == true)
        let bytes: Set<UInt64> = Set((0..<64).map { (v: Int) -> UInt64 in UInt64((v * 8) & 0xFF) })
        #expect(Set(r[3].values.map(\.value)) == bytes)
        #expect(m.counters.recordsTaken == 200_000 && m.counters.recordsKept == 1)
    }
}
