import ELF
import FlowTrace
import Foundation
import Glibc
import KVM
@testable import Machine
import Synchronization
import Testing
import TestSupport

/// The names of this process's threads that run `m`'s vCPUs (`vcpuN-mSERIAL`), as the
/// kernel lists them.
/// A thread that ends between the listing and the read is skipped (it is not running), and
/// so is one past the end of its exit (joined, not yet gone from the list).
func vcpuThreads(of m: Machine) throws -> [String] {
    var names: [String] = []
    for task in try FileManager.default.contentsOfDirectory(atPath: "/proc/self/task") {
        let comm = "/proc/self/task/\(task)/comm"
        guard FileManager.default.fileExists(atPath: comm), let data = FileManager.default.contents(atPath: comm) else { continue }
        let name = String(decoding: data, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
        // A joined thread can still be listed while the kernel finishes its exit; by then it
        // has given up the address space (no Vm lines in its status): not running.
        guard let status = FileManager.default.contents(atPath: "/proc/self/task/\(task)/status"),
              String(decoding: status, as: UTF8.self).contains("VmSize:") else { continue }
        if name.hasSuffix("-m\(m.serial)") { names.append(name) }
    }
    return names
}

@Suite("machine reliability", .serialized, .enabled(if: kvmUsable, kvmSkipReason), .timeLimit(.minutes(5)))
struct MachineReliabilityTests {
    /// A failed KVM_RUN ends the run as a host failure naming the call and its errno, not
    /// as "exit reason 4294967295"; the other vCPU is released; records taken are kept.
    @Test func aFailedRunIsAHostFailure() throws {
        try withWatchdog(60, "a run whose KVM_RUN fails") {
            let m = try Machine(path: Guests.path("spin"), configuration: .init(vcpuCount: 2, engine: .engine(.hlt)))
            let module = try TraceModule(target: m)
            try module.addProbe(Probe("spin_step", entries: [try .register(named: "rdi")]), at: try #require(m.symbolizer.address(of: "spin_step")))
            try module.enable()
            m.vcpus[0].faults.fail(.run, onCall: 40, errno: EIO)
            let r = try m.run(timeout: .seconds(30))
            guard case let .fault(f) = r.ending else { Issue.record("expected a fault, got \(r.ending)"); return }
            #expect(f.vcpu == 0)
            #expect(f.cause == .host(.ioctl("KVM_RUN", errno: EIO), while: "running the guest"))
            #expect(f.exit == nil)
            #expect(f.description.contains("host failure on vCPU 0 while running the guest: KVM_RUN failed: Input/output error (errno 5)"))
            #expect(!f.description.contains("4294967295"))
            // Each hit of the hlt engine is one exit for the trap and one for the step:
            // the 40th run fails after exactly 19 hits (spin_step(0) ... spin_step(18)).
            let rdi = module.report().map { r -> UInt64 in
                if case let .register(v)? = r.values.first { return v.asUInt64 }
                return .max
            }
            #expect(rdi == Array(0..<UInt64(rdi.count)))
            #expect(rdi.count >= 1)
            #expect(try vcpuThreads(of: m) == [])
        }
    }

    /// `resume()` after a halt keeps the run's time limit: a guest that spins forever after
    /// the halt still ends at the limit.
    @Test func resumeKeepsTheTimeout() throws {
        try withWatchdog(60, "resume() after a halt with a timeout") {
            let m = try Machine(path: Guests.path("spin"))
            let module = try TraceModule(target: m)
            try module.addProbe(Probe("halt", entries: [.halt]), at: try #require(m.symbolizer.address(of: "spin_step")))
            try module.enable(hitLimit: 1)
            var r = try m.run(timeout: .milliseconds(800))
            guard case .halted = r.ending else { Issue.record("expected a halt, got \(r.ending)"); return }
            r = try m.resume()
            #expect(r.ending == .timedOut(.milliseconds(800)))
            #expect(r.elapsed >= .milliseconds(800))
        }
    }

    /// A KVM_SET_GUEST_DEBUG that fails while disarming is reported, naming the call and
    /// the vCPU, instead of being dropped; the other work of the disarm is still done.
    @Test func aFailedDisarmIsReported() throws {
        let m = try Machine(path: Guests.path("counter"), configuration: .init(vcpuCount: 2, engine: .engine(.hlt)))
        let module = try TraceModule(target: m)
        let tick = try #require(m.symbolizer.address(of: "tick"))
        try module.addProbe(Probe("tick", entries: [try .register(named: "rdi")]), at: tick)
        try module.enable()
        m.vcpus[1].faults.fail(.setGuestDebug, onCall: 1, errno: EINVAL)
        #expect(throws: TraceError.targetFailure("KVM_SET_GUEST_DEBUG failed: Invalid argument (errno 22) while disarming vCPU 1's breakpoints")) {
            try module.disable()
        }
        // The trap byte is gone all the same: the guest's code is as it was, and it runs to
        // its own end with nothing recorded.
        let original = try m.image.segments.first { $0.range.contains(tick) }.map { $0.data[Int(tick - $0.virtualAddress)] }
        #expect(try m.read(virtual: tick, count: 1) == [try #require(original)])
        let r = try m.run(timeout: .seconds(20))
        #expect(r.ending == .exited(status: 0))
        #expect(module.report().count == 0)
    }

    /// Internal errors say they are (the CLI exits 70 for them, 64 only for input).
    @Test func misuseIsAnInternalError() throws {
        let m = try Machine(path: Guests.path("status"))
        #expect(throws: MachineError.notRunning) { try m.resume() }
        _ = try m.run(timeout: .seconds(10))
        #expect(throws: MachineError.alreadyRan) { try m.run() }
        #expect(MachineError.alreadyRan.isInternal && MachineError.notRunning.isInternal)
        #expect(!MachineError.vcpuCount(0, maximum: 1).isInternal)
    }

    /// Two machines one after the other, then two side by side: each runs its guest to the
    /// right end, and no vCPU thread outlives its run.
    @Test func machinesInSequenceAndSideBySide() throws {
        try withWatchdog(60, "two machines") {
            for _ in 0..<2 {
                let m = try Machine(path: Guests.path("fib"))
                // The threads are there while it runs (seen from the guest's console callback).
                let seen = LockedBox<[String]>([])
                let r = try m.run(timeout: .seconds(20)) { _ in
                    do { seen.set(try vcpuThreads(of: m)) } catch { seen.set(["\(error)"]) }
                }
                #expect(r.console.map(\.text) == ["fib(15) = 610, calls = 1973"])
                #expect(seen.get() == ["vcpu0-m\(m.serial)"])
                #expect(try vcpuThreads(of: m) == [])
            }
            let results = LockedBox<[String]>([])
            let machines = try ["fib", "smp"].map { try Machine(path: Guests.path($0), configuration: .init(vcpuCount: 2)) }
            let group = DispatchGroup()
            for m in machines {
                group.enter()
                Thread {
                    defer { group.leave() }
                    do {
                        let r = try m.run(timeout: .seconds(20))
                        let line = r.console.last?.text ?? "\(r.ending)"
                        results.modify { $0.append(line) }
                    } catch { results.modify { $0.append("\(error)") } }
                }.start()
            }
            group.wait()
            #expect(results.get().sorted() == ["fib(15) = 610, calls = 1973", "total: 300 units on 2 vcpus"])
            for m in machines { #expect(try vcpuThreads(of: m) == []) }
        }
    }

    /// `disable()` from the controller while vCPUs take the last hits of the budget: the
    /// machine's disarm waits for every vCPU to park, and the vCPU taking the last hit must
    /// not need a lock the controller holds. Many rounds, 2 vCPUs each hitting.
    @Test func disableRacesTheHitLimitOnAMachine() throws {
        try withWatchdog(240, "disable() racing the hit limit on a machine") {
            let path = try Guests.path("loop")
            var taken: UInt64 = 0
            for round in 0..<60 {
                let m = try Machine(path: path, configuration: .init(vcpuCount: 2, engine: .engine(.hlt)))
                let module = try TraceModule(target: m)
                try module.addProbe(Probe("tick", entries: [try .register(named: "rdi")]), at: try #require(m.symbolizer.address(of: "tick")))
                let limit = UInt64(30 + round % 20)
                try module.enable(hitLimit: limit)
                let ended = DispatchSemaphore(value: 0)
                let ending = LockedBox<String>("not run")
                Thread {
                    do { ending.set("\(try m.run(timeout: .seconds(60)).ending)") } catch { ending.set("\(error)") }
                    ended.signal()
                }.start()
                // Disable as the budget runs out (observed, not timed).
                while module.counters.recordsTaken + UInt64(round % 3) < limit && module.state == .enabled { sched_yield() }
                try module.disable()
                m.stop()
                ended.wait()
                #expect(ending.get() == "stopped" || ending.get().hasPrefix("guest exited with status 0"), "round \(round): \(ending.get())")
                #expect(module.counters.recordsTaken <= limit, "round \(round)")
                // disable() came once the budget was at most 2 short of the limit.
                #expect(module.counters.recordsTaken + 2 >= limit, "round \(round)")
                taken += module.counters.recordsTaken
                #expect(module.state == .created)
            }
            #expect(taken > 0)
        }
    }

    /// The kick signal is a real-time signal; SIGUSR1, which programs use, is left alone.
    @Test func theKickSignalLeavesSIGUSR1Alone() throws {
        _ = try Machine(path: Guests.path("status")).run(timeout: .seconds(10))
        let s = VCPU.kickSignal
        #expect(s >= __libc_current_sigrtmin() && s <= __libc_current_sigrtmax())
        var usr1 = sigaction()
        sigaction(SIGUSR1, nil, &usr1)
        #expect(unsafeBitCast(usr1.__sigaction_handler.sa_handler, to: Int.self) == 0)
    }

    /// A hit that finds its module's record stream full waits for the stream's consumer.
    /// When that consumer itself ends the tracing (`disable()`) or the run (`stop()`),
    /// instead of taking records, neither may wait for that hit: spin fills a 4,096-record
    /// window nobody takes from, then the consuming thread disables, or stops, and the run
    /// ends with every record taken still in the stream, in order.
    @Test(arguments: ["disable", "stop"])
    func theStreamsConsumerCanEndTheRun(_ how: String) throws {
        try withWatchdog(60, "\(how)() from the consumer of a full record stream") {
            let m = try Machine(path: Guests.path("spin"), configuration: .init(vcpuCount: 1, engine: .engine(.hlt)))
            let module = try TraceModule(target: m)
            try module.addProbe(Probe("spin_step", entries: [try .register(named: "rdi")]), at: try #require(m.symbolizer.address(of: "spin_step")))
            module.openStream(maxPendingBytes: 1)  // the minimum window: 4,096 records
            try module.enable(maxRecords: 10)
            let ending = LockedBox<RunEnding?>(nil)
            let ran = DispatchSemaphore(value: 0)
            Thread {
                do { ending.set(try m.run(timeout: .seconds(50)).ending) } catch { Issue.record("run: \(error)") }
                ran.signal()
            }.start()
            // The window is full once 4,096 records wait: the 4,097th hit waits for room.
            while module.counters.recordsTaken < 4_096 { sched_yield() }
            if how == "disable" { try module.disable() }
            m.stop()
            ran.wait()
            #expect(ending.get() == .stopped)
            var rdi: [UInt64] = []
            while true {
                let batch = module.takeStreamed(maxRecords: 10_000)
                if batch.isEmpty { break }
                for r in batch { if case let .register(v)? = r.values.first { rdi.append(v.asUInt64) } }
            }
            #expect(rdi.count >= 4_096)
            #expect(rdi == Array(0..<UInt64(rdi.count)))
            #expect(UInt64(rdi.count) == module.counters.recordsTaken)
        }
    }
}
