@testable import FlowTrace
import FlowTraceSimulation
import Foundation
import Locking
import Synchronization
import Testing
import TestSupport

/// Control operations racing the hit path, and a record store without memory.
@Suite("module reliability", .serialized)
struct ModuleReliabilityTests {
    /// `disable()` from a controller while vCPU threads take the last hits of the budget:
    /// every round ends (the watchdog aborts on a deadlock), and the budget is never exceeded.
    @Test func disableRacesTheHitLimit() throws {
        try withWatchdog(120, "disable() racing the hit limit") {
            var atTheLimit = 0
            for round in 0..<300 {
                let t = makeTarget(vcpus: 4)
                let m = try TraceModule(target: t)
                try m.addProbe(Probe("p", entries: try entries("rdi")), at: 0x100)
                let limit = UInt64(20 + round % 40)
                try m.enable(hitLimit: limit)
                let go = Atomic<Bool>(false)
                let group = DispatchGroup()
                for k in 0..<4 {
                    group.enter()
                    Thread {
                        while !go.load(ordering: .acquiring) {}
                        for _ in 0..<50 { t.fire(at: 0x100, vcpu: k) }
                        group.leave()
                    }.start()
                }
                go.store(true, ordering: .releasing)
                // At a different point of the hits each round.
                for _ in 0..<(round % 7) * 10 { sched_yield() }
                try m.disable()
                group.wait()
                let c = m.counters
                #expect(c.recordsTaken <= limit, "round \(round)")
                if c.recordsTaken == limit { atTheLimit += 1 }
                #expect(m.state == .created)
                #expect(!t.isArmed(0x100))
            }
            // The race was run: some rounds ended by the limit (the interesting interleaving).
            #expect(atTheLimit > 0)
        }
    }

    /// A hit in flight when a controller disables the module and adds a probe: `addProbes`
    /// waits for the hit, and the hit (its budget's last) needs no lock the controller holds.
    @Test func addProbesAfterDisableWithAHitInFlight() throws {
        try withWatchdog(120, "addProbes after disable with a hit in flight") {
            for round in 0..<200 {
                let t = makeTarget(vcpus: 1)
                let m = try TraceModule(target: t)
                let inCallback = Atomic<Bool>(false)
                let controllerGoes = Atomic<Bool>(false)
                let callback = ProbeEntry.callback { _, _ in
                    inCallback.store(true, ordering: .releasing)
                    while !controllerGoes.load(ordering: .acquiring) { sched_yield() }
                }
                try m.addProbe(Probe("p", entries: [callback]), at: 0x100)
                try m.enable(hitLimit: 1)
                let finished = DispatchSemaphore(value: 0)
                Thread { _ = t.fire(at: 0x100, vcpu: 0); finished.signal() }.start()
                while !inCallback.load(ordering: .acquiring) { sched_yield() }
                try m.disable()
                controllerGoes.store(true, ordering: .releasing)
                try m.addProbe(Probe("q", entries: try entries("rsi")), at: 0x200 + UInt64(round))
                finished.wait()
                #expect(m.counters.recordsTaken == 1)
                #expect(m.locations.count == 2)
            }
        }
    }

    /// Control operations are one at a time: a second one while the first waits in the
    /// target is refused with an error, not a wait.
    @Test func aSecondControlOperationIsRefused() throws {
        let t = BlockingTarget()
        let m = try TraceModule(target: t)
        try m.addProbe(Probe("p", entries: try entries("rdi")), at: 0x100)
        let enabled = DispatchSemaphore(value: 0)
        let failure = Locked<String?>(nil)
        Thread {
            do { try m.enable() } catch { failure.withLock { $0 = "\(error)" } }
            enabled.signal()
        }.start()
        t.entered.wait()
        #expect(throws: TraceError.concurrentOperation("disable")) { try m.disable() }
        t.release.signal()
        enabled.wait()
        #expect(failure.withLock { $0 } == nil)
        #expect(m.state == .enabled)
        try m.disable()
    }

    /// A store that cannot get a new chunk keeps what it has, counts the rest as lost, and
    /// the module goes on (hits return normally, other counters stay exact).
    @Test func aStoreWithoutMemoryLosesRecordsButNotTheRun() throws {
        let chunks = Atomic<Int>(0)
        let t = makeTarget()
        // The first chunk, then no second one; the report's copy later gets its memory.
        let m = try TraceModule(target: t, vcpus: .any, commonProbe: nil) { bytes in
            guard chunks.add(1, ordering: .relaxed).newValue != 2 else { return nil }
            return malloc(bytes)
        }
        try m.addProbe(Probe("p", entries: try entries("rdi")), at: 0x100)
        try m.enable()
        let hits = RecordStore.chunkSlots + 904
        for _ in 0..<hits { #expect(t.fire(at: 0x100, vcpu: 0) == .continue) }
        let c = m.counters
        #expect(c.hitsSeen == UInt64(hits))
        #expect(c.recordsTaken == UInt64(RecordStore.chunkSlots))
        #expect(c.recordsLost == 904)
        #expect(c.locations[0].lost == 904)
        #expect(c.locations[0].suppressed == 0)
        let seqs = m.report().map(\.sequence)
        let inOrder = seqs == Array(0..<UInt64(RecordStore.chunkSlots))
        #expect(inOrder, "kept \(seqs.count) records, \(seqs.first ?? 0)...\(seqs.last ?? 0)")
        #expect(chunks.load(ordering: .relaxed) == 3, "one growth attempt only, then the copy")
        #expect(m.state == .enabled)
    }

    /// A report that cannot get memory for its copy says how many records it misses
    /// instead of crashing.
    @Test func aSnapshotWithoutMemoryIsEmptyAndSaysSo() throws {
        let calls = Atomic<Int>(0)
        let t = makeTarget()
        let m = try TraceModule(target: t, vcpus: .any, commonProbe: nil) { bytes in
            // The store's one chunk, then nothing (the snapshot's copy).
            guard calls.add(1, ordering: .relaxed).newValue <= 1 else { return nil }
            return malloc(bytes)
        }
        try m.addProbe(Probe("p", entries: try entries("rdi")), at: 0x100)
        try m.enable()
        for _ in 0..<10 { t.fire(at: 0x100, vcpu: 0) }
        let r = m.report()
        #expect(r.count == 0)
        #expect(r.missing == 10)
    }

    /// Every register name means a register no other name means (an alias would have
    /// trapped at start-up before the catalog stopped assuming it).
    @Test func registerNamesAreUnique() {
        #expect(X86Register.aliases.map { "\($0.0)=\($0.1)" } == [])
        #expect(X86Register.allNames.count > 100)
        for n in X86Register.allNames { #expect(X86Register.named(n)?.name == n) }
    }
}

/// A target whose `arm` waits until the test lets it go.
final class BlockingTarget: TraceTarget {
    let vcpuCount = 1
    let entered = DispatchSemaphore(value: 0)
    let release = DispatchSemaphore(value: 0)
    func arm(_ module: TraceModule, locations: [ArmedLocation], vcpus: VCPUSelection) throws(TraceError) {
        entered.signal()
        release.wait()
    }
    func disarm(_ module: TraceModule) throws(TraceError) {}
    func moduleReachedHitLimit(_ module: TraceModule) {}
}
