import ELF
import FlowGraph
import FlowTrace
import Foundation
import KVM
import Locking
import Machine
import Testing
import TestSupport

/// What the self-test found on this host (nil without /dev/kvm).
let hostSupport: EngineSupport? = kvmUsable ? selfTestOfThisHost() : nil

private func selfTestOfThisHost() -> EngineSupport? {
    do { return EngineSelfTest.support(host: try KVMHost()) } catch { return nil }
}

func works(_ e: BreakpointEngine) -> Bool { hostSupport?.works(e) ?? false }

/// The engines that work here, for parameterized tests.
let workingEngines: [BreakpointEngine] = BreakpointEngine.allCases.filter(works)

let int3Unavailable: Comment = {
    guard let s = hostSupport else { return "needs a usable /dev/kvm" }
    if case let .unavailable(why) = s.status(.int3) { return Comment(rawValue: "int3 trapping unavailable on this host: \(why)") }
    return "int3 works here"
}()

/// One probe to place: at a symbol (+offset) or an address.
struct Place {
    var symbol: String?
    var address: UInt64?
    var offset: UInt64 = 0
    var timing: ProbeTiming = .before
    var entries: [ProbeEntry] = []

    static func at(_ symbol: String, _ timing: ProbeTiming = .before, _ entries: [ProbeEntry]) -> Place {
        Place(symbol: symbol, timing: timing, entries: entries)
    }
}

struct Traced {
    let machine: Machine
    let module: TraceModule
    let result: RunResult
    var report: TraceReport { module.report() }
}

/// Boots `guest`, arms `places` in one module with `engine`, runs to the end.
func trace(_ guest: String, engine: BreakpointEngine, vcpus: Int = 1, module selection: VCPUSelection = .any,
           hitLimit: UInt64 = 0, maxRecords: Int = 0, _ places: [Place]) throws -> Traced {
    let m = try Machine(path: Guests.path(guest), configuration: .init(vcpuCount: vcpus, engine: .engine(engine)))
    let module = try TraceModule(target: m, vcpus: selection)
    for p in places {
        let base = try p.address ?? #require(m.symbolizer.address(of: p.symbol!), "no symbol \(p.symbol!)")
        try module.addProbe(Probe(p.symbol ?? "probe", entries: p.entries), at: base + p.offset, timing: p.timing)
    }
    try module.enable(hitLimit: hitLimit, maxRecords: maxRecords)
    let r = try m.run(timeout: .seconds(60))
    return Traced(machine: m, module: module, result: r)
}

func reg(_ name: String) throws -> ProbeEntry { try .register(named: name) }

func u64(_ v: ProbeValue?) -> UInt64? {
    if case let .register(r)? = v { return r.asUInt64 }
    return nil
}

/// The rdi of every fib(n) call in call order, and each call's return value in return order.
func fibGroundTruth(_ n: UInt64) -> (args: [UInt64], returns: [UInt64]) {
    var args: [UInt64] = [], returns: [UInt64] = []
    func fib(_ n: UInt64) -> UInt64 {
        args.append(n)
        let r = n < 2 ? n : fib(n - 1) + fib(n - 2)
        returns.append(r)
        return r
    }
    _ = fib(n)
    return (args, returns)
}

/// Addresses of the `ret` instructions of `function` in `path` (objdump as ground truth).
func returnAddresses(_ path: String, function: String) throws -> [UInt64] {
    let image = try ELFImage(path: path)
    let f = try #require(image.symbol(named: function))
    let r = try run("/usr/bin/env", ["objdump", "-d", "--no-show-raw-insn",
                                     "--start-address=0x\(String(f.address, radix: 16))",
                                     "--stop-address=0x\(String(f.address + f.size, radix: 16))", path])
    return r.stdout.split(separator: "\n").compactMap { line in
        let parts = line.split(separator: "\t")
        guard parts.count >= 2, parts[1].hasPrefix("ret") else { return nil }
        return UInt64(parts[0].trimmingCharacters(in: .whitespaces).dropLast(), radix: 16)
    }
}

@Suite("tracing real guests", .serialized, .enabled(if: kvmUsable, kvmSkipReason), .timeLimit(.minutes(5)))
struct TracingTests {
    @Test("counter: one record per call, rdi = 0..999", arguments: workingEngines)
    func counterCalls(_ engine: BreakpointEngine) throws {
        let t = try trace("counter", engine: engine, [.at("tick", .before, [try reg("rdi")])])
        #expect(t.result.ending == .exited(status: 0))
        #expect(t.result.console.map(\.text) == ["counter: 1000 calls, sum 499500"])
        let r = t.report
        #expect(r.count == 1000)
        #expect(r.map { u64($0.values[0]) } == (0..<1000).map { UInt64($0) })
        #expect(t.machine.engine?.engine == engine)
    }

    @Test("fib: entry probes see every call's rdi; after-exec probes on ret see rax", arguments: workingEngines)
    func fibEntriesAndReturns(_ engine: BreakpointEngine) throws {
        let path = try Guests.path("fib")
        let rets = try returnAddresses(path, function: "fib")
        #expect(!rets.isEmpty)
        let image = try ELFImage(path: path)
        let fib = try #require(image.symbol(named: "fib")).address
        let rax = try reg("rax")
        let t = try trace("fib", engine: engine,
                          [Place(address: fib, entries: [try reg("rdi")])] +
                          rets.map { Place(address: $0, timing: .after, entries: [rax]) })
        #expect(t.result.console.map(\.text) == ["fib(15) = 610, calls = 1973"])
        let truth = fibGroundTruth(15)
        let r = t.report
        let entries = r.filter { $0.address == fib }
        let returns = r.filter { $0.timing == .after }
        #expect(entries.count == 1973)
        #expect(entries.map { u64($0.values[0]) } == truth.args)
        #expect(returns.map { u64($0.values[0]) } == truth.returns)
        #expect(returns.allSatisfy { rets.contains($0.address) })
    }

    /// The tests parameterised over `workingEngines` run no case at all when no engine
    /// works: on a host with KVM that is a failure, not an empty pass.
    @Test("some breakpoint engine works where KVM is usable")
    func someEngineWorks() {
        let seen = BreakpointEngine.allCases.map { e in "\(e): \(hostSupport.map { "\($0.status(e))" } ?? "no KVM")" }
        #expect(!workingEngines.isEmpty, "no breakpoint engine passed the self-test: \(seen)")
    }

    @Test("hlt, hw and step produce identical traces (fib entries and returns, smp on 2 vCPUs)",
          .enabled(if: workingEngines.filter { $0 != .int3 }.count >= 2, "fewer than two of hlt, hw and step work here: nothing to compare"))
    func enginesAgree() throws {
        let engines = workingEngines.filter { $0 != .int3 }
        let path = try Guests.path("fib")
        let rets = try returnAddresses(path, function: "fib")
        let after = [try reg("rax"), try reg("rsp")]
        func fibTrace(_ e: BreakpointEngine) throws -> [String] {
            try trace("fib", engine: e, [.at("fib", .before, [try reg("rdi"), try reg("rsp")])] +
                      rets.map { Place(address: $0, timing: .after, entries: after) })
                .report.map { "\($0.vcpu) \($0.address) \($0.timing) \($0.values)" }
        }
        // On 2 vCPUs, with an after-exec probe on work_unit's first instruction too.
        func smpTrace(_ e: BreakpointEngine) throws -> [[String]] {
            let smp = try ELFImage(path: Guests.path("smp"))
            let work = try #require(smp.symbol(named: "work_unit")).address
            let second = try instructionAfter(work, in: smp.path)
            let r = try trace("smp", engine: e, vcpus: 2, [.at("work_unit", .before, [try reg("rdi"), try reg("rsi")]),
                                                           Place(address: second, timing: .after, entries: [try reg("rip")])])
                .report
            return (0..<2).map { v in r.filter { $0.vcpu == v }.map { "\($0.address) \($0.timing) \($0.values)" } }
        }
        let reference = try fibTrace(engines[0])
        let smpReference = try smpTrace(engines[0])
        #expect(reference.count == 1973 * 2)
        #expect(smpReference.map(\.count) == [200, 400])
        for e in engines.dropFirst() {
            #expect(try fibTrace(e) == reference, "\(e) differs from \(engines[0])")
            #expect(try smpTrace(e) == smpReference, "\(e) differs from \(engines[0])")
        }
    }

    @Test("smp on 2 vCPUs: per-vCPU records equal each vCPU's work", arguments: workingEngines)
    func smpPerVCPU(_ engine: BreakpointEngine) throws {
        let t = try trace("smp", engine: engine, vcpus: 2, [.at("work_unit", .before, [try reg("rdi"), try reg("rsi")])])
        #expect(t.result.console.last?.text == "total: 300 units on 2 vcpus")
        let r = t.report
        for v in 0..<2 {
            let mine = r.filter { $0.vcpu == v }
            #expect(mine.count == 100 * (v + 1))
            #expect(mine.allSatisfy { u64($0.values[0]) == UInt64(v) })
            #expect(mine.map { u64($0.values[1]) } == (0..<(100 * (v + 1))).map { UInt64($0) })
        }
    }

    @Test("a module bound to vCPU 1 sees only vCPU 1", arguments: workingEngines)
    func boundToOneVCPU(_ engine: BreakpointEngine) throws {
        let t = try trace("smp", engine: engine, vcpus: 2, module: .only(1), [.at("work_unit", .before, [try reg("rsi")])])
        #expect(t.result.ending == .exited(status: 0))
        let r = t.report
        #expect(r.count == 200)
        #expect(r.allSatisfy { $0.vcpu == 1 })
    }

    @Test("hit limit and max records on a live guest", arguments: workingEngines)
    func limits(_ engine: BreakpointEngine) throws {
        let limited = try trace("counter", engine: engine, hitLimit: 10, [.at("tick", .before, [try reg("rdi")])])
        #expect(limited.result.console.map(\.text) == ["counter: 1000 calls, sum 499500"])
        #expect(limited.report.map { u64($0.values[0]) } == (0..<10).map { UInt64($0) })
        #expect(limited.module.state == .created)
        #expect(limited.machine.engine == nil)  // disarmed at the limit
        let capped = try trace("counter", engine: engine, maxRecords: 5, [.at("tick", .before, [try reg("rdi")])])
        #expect(capped.report.map { u64($0.values[0]) } == (995..<1000).map { UInt64($0) })
        #expect(capped.module.counters.evicted == 995)
    }

    @Test("indirect memory entries read the right array elements", arguments: workingEngines)
    func indirectMemory(_ engine: BreakpointEngine) throws {
        let rdi = try X86Register.resolve("rdi"), rsi = try X86Register.resolve("rsi")
        let element = try ProbeEntry.memory(MemoryOperand(base: .register(rdi), index: rsi, scale: 8), size: 8)
        let t = try trace("array", engine: engine, [.at("element", .before, [element, try reg("rsi")])])
        #expect(t.result.console.map(\.text) == ["array: sum 557176"])
        let table = try #require(t.machine.symbolizer.address(of: "table"))
        let r = t.report
        #expect(r.count == 16)
        for (i, rec) in r.enumerated() {
            let want = UInt64(0x1000 * (i + 1) + i)
            #expect(rec.values[0] == .memory(address: table + UInt64(8 * i), bytes: (0..<8).map { UInt8(truncatingIfNeeded: want >> (8 * $0)) }))
        }
    }

    @Test func unmappedProbeAddressFailsAtEnable() throws {
        let m = try Machine(path: Guests.path("counter"))
        let module = try TraceModule(target: m)
        try module.addProbe(Probe("nowhere"), at: 0x1000_0000)
        #expect { try module.enable() } throws: { e in
            guard case let .target(text) = e as? TraceError else { return false }
            return text.contains("0x10000000") && text.contains("not mapped")
        }
        #expect(module.state == .created)
        #expect(try m.run(timeout: .seconds(10)).ending == .exited(status: 0))
    }

    @Test("a halt entry stops the machine at the hit; registers can be read; resume goes on", arguments: workingEngines)
    func haltAndResume(_ engine: BreakpointEngine) throws {
        let m = try Machine(path: Guests.path("fib"), configuration: .init(engine: .engine(engine)))
        let fib = try #require(m.symbolizer.address(of: "fib"))
        let module = try TraceModule(target: m)
        try module.addProbe(Probe("stop", entries: [try reg("rdi"), .halt]), at: fib)
        try module.enable()
        var r = try m.run(timeout: .seconds(30))
        #expect(r.ending == .halted(HaltStop(vcpu: 0, address: fib, timing: .before, rip: fib, location: "fib")))
        #expect(try m.vcpus[0].registers().rdi == 15)
        r = try m.resume(timeout: .seconds(30))
        guard case let .halted(second) = r.ending else { Issue.record("expected a second halt, got \(r.ending)"); return }
        #expect(second.rip == fib)
        #expect(try m.vcpus[0].registers().rdi == 14)
        try module.disable()
        r = try m.resume(timeout: .seconds(30))
        #expect(r.ending == .exited(status: 0))
        #expect(r.console.map(\.text) == ["fib(15) = 610, calls = 1973"])
        #expect(module.report().map { u64($0.values[0]) } == [15, 14])
        #expect(throws: MachineError.notRunning) { try m.resume() }
    }

    @Test("callback entries run on the hitting vCPU's thread with the hit context")
    func callbacks() throws {
        let engine = try #require(workingEngines.first)
        let seen = Locked<[String]>([])
        let threads = Locked<Set<UInt>>([])
        let cb = ProbeEntry.callback { hit, context in
            let rdi: String
            do { rdi = try context.read(X86Register.resolve("rdi")).description } catch { rdi = "\(error)" }
            seen.withLock { $0.append("vcpu \(hit.vcpu) rdi \(rdi)") }
            threads.withLock { _ = $0.insert(UInt(pthread_self())) }
        }
        let t = try trace("counter", engine: engine, hitLimit: 3, [.at("tick", .before, [cb])])
        #expect(t.result.ending == .exited(status: 0))
        #expect(seen.withLock { $0 } == ["vcpu 0 rdi 0x0", "vcpu 0 rdi 0x1", "vcpu 0 rdi 0x2"])
        let vcpuThread = try #require(t.machine.vcpus[0].drivingThread)
        #expect(threads.withLock { $0 } == [UInt(vcpuThread)])
        #expect(UInt(vcpuThread) != UInt(pthread_self()))
    }

    @Test func autoPicksTheBestWorkingEngineAndSaysWhy() throws {
        let m = try Machine(path: Guests.path("counter"))
        let module = try TraceModule(target: m)
        try module.addProbe(Probe("p"), at: try #require(m.symbolizer.address(of: "tick")))
        try module.enable()
        let chosen = try #require(m.engine)
        #expect(chosen.engine == (works(.int3) ? .int3 : .hlt))
        if !works(.int3) { #expect(chosen.reason.contains("int3: ")) }
        #expect(try m.run(timeout: .seconds(10)).ending == .exited(status: 0))
        #expect(module.report().count == 1000)
    }

    @Test(.enabled(if: works(.hw), "the hw engine does not work here"))
    func hwTakesAtMostFourLocations() throws {
        let m = try Machine(path: Guests.path("counter"), configuration: .init(engine: .engine(.hw)))
        let module = try TraceModule(target: m)
        for a in 0..<5 { try module.addProbe(Probe("p\(a)"), at: 0x100000 + UInt64(a)) }
        #expect { try module.enable() } throws: { e in
            (e as? TraceError).map { "\($0)".contains("at most 4 locations") } ?? false
        }
    }

    @Test(.enabled(if: kvmUsable && !works(.int3), "int3 works on this host"))
    func int3RequestedWhereItDoesNotWorkSaysWhy() throws {
        #expect { try Machine(path: Guests.path("counter"), configuration: .init(engine: .engine(.int3))) } throws: { e in
            if case let .engineUnavailable(.int3, reason, working) = e as? MachineError {
                return !reason.isEmpty && working.contains("hlt")
            }
            return false
        }
    }
}

@Suite("the int3 engine end to end", .serialized, .enabled(if: works(.int3), int3Unavailable), .timeLimit(.minutes(5)))
struct Int3Tests {
    @Test("auto picks int3 where it works, and the self-test says what works")
    func autoPicksInt3() throws {
        let support = try #require(hostSupport)
        for e in BreakpointEngine.allCases { print("engine self-test: \(e): \(support.status(e))") }
        let m = try Machine(path: Guests.path("counter"))
        let module = try TraceModule(target: m)
        try module.addProbe(Probe("p"), at: try #require(m.symbolizer.address(of: "tick")))
        try module.enable()
        #expect(m.engine?.engine == .int3)
        #expect(try m.run(timeout: .seconds(60)).ending == .exited(status: 0))
        #expect(module.report().count == 1000)
    }

    @Test func counterAndFibUnderInt3() throws {
        let t = try trace("counter", engine: .int3, [.at("tick", .before, [try reg("rdi")])])
        #expect(t.report.map { u64($0.values[0]) } == (0..<1000).map { UInt64($0) })
        let f = try trace("fib", engine: .int3, [.at("fib", .before, [try reg("rdi")])])
        #expect(f.report.map { u64($0.values[0]) } == fibGroundTruth(15).args)
    }

    @Test func flowGraphsUnderInt3() throws {
        try checkFibFlow(.int3, objdump: false)
        try checkSwitchFlow(.int3)
    }

    @Test func outOfLineSteppingUnderInt3() throws {
        try switchEveryInstructionSteppedOutOfLine(engine: .int3)
        _ = try everyInstructionSteppedOutOfLine("smp", ["work_unit"], vcpus: 2, engine: .int3,
                                                 console: ["vcpu 0: 100 units", "vcpu 1: 200 units", "total: 300 units on 2 vcpus"])
    }

    @Test func smpUnderInt3OnTwoVCPUs() throws {
        let t = try trace("smp", engine: .int3, vcpus: 2, [.at("work_unit", .before, [try reg("rdi")])])
        #expect((0..<2).map { v in t.report.filter { $0.vcpu == v }.count } == [100, 200])
    }

    /// The pc platform under int3: the timer handler's probe sees every tick in order.
    @Test func timerHandlerUnderInt3OnThePC() throws {
        let m = try Machine(path: Guests.path("timer"), configuration: .init(engine: .engine(.int3), platform: .platform(.pc)))
        let module = try TraceModule(target: m)
        try module.addProbe(Probe("tick", entries: [try reg("rdi")]), at: try #require(m.symbolizer.address(of: "timer_tick")))
        try module.enable()
        let r = try m.run(timeout: .seconds(120))
        #expect(r.ending == .exited(status: 0x54))
        #expect(r.console.map(\.text) == ["timer: 20 ticks, sum 210"])
        #expect(module.report().map { u64($0.values[0]) } == (1...20).map { UInt64($0) })
    }

    /// The guest's own int3s (its #BP handler counts them) with our int3 probe on the very
    /// same instruction, and its own single-stepping with every instruction of the region
    /// probed: its counts stay what it computes untraced (5 and 13).
    @Test func guestsOwnBreakpointsAndSingleStepsUnderInt3() throws {
        let path = try Guests.path("own-traps")
        let untraced = try Machine(path: path).run(timeout: .seconds(60))
        #expect(untraced.ending == .exited(status: 0x42))
        #expect(untraced.console.map(\.text) == ["own-traps: 5 breakpoints, 13 single steps"])
        // Decoded here (no objdump in the nested machine; the host's tests check the two agree).
        let places = try decodedInstructions(path, "stepped_region") + [try #require(ELFImage(path: path).symbol(named: "own_int3")).address]
        let m = try Machine(path: path, configuration: .init(engine: .engine(.int3)))
        let module = try TraceModule(target: m)
        for a in places { try module.addProbe(Probe("p"), at: a) }
        try module.enable()
        let r = try m.run(timeout: .seconds(120))
        #expect(r.ending == .exited(status: 0x42))
        #expect(r.console == untraced.console)
        let ownInt3 = try #require(m.symbolizer.address(of: "own_int3"))
        #expect(module.report().filter { $0.address == ownInt3 }.count == 5)
        #expect(module.report().filter { $0.address != ownInt3 }.count == places.count - 1)
        // Each of the guest's own int3s exited to flowtrace and was delivered back once.
        #expect(r.exits.reinjectedBreakpoints == 5)
    }
}

/// The instruction addresses of `function` in `path` by a linear sweep of flowtrace's decoder.
func decodedInstructions(_ path: String, _ function: String) throws -> [UInt64] {
    let image = try ELFImage(path: path)
    let f = try #require(image.symbol(named: function))
    let source = ImageCodeSource(image: image)
    var addresses: [UInt64] = [], a = f.address
    while a < f.address + f.size {
        let bytes = try source.code(at: a, count: X86Decoder.maxLength).get()
        let i = try X86Decoder().decode(bytes, at: a).get()
        addresses.append(a)
        a = i.end
    }
    return addresses
}

/// The instruction addresses of `function` in `path` (objdump as ground truth, symbols
/// inside it included).
func functionInstructions(_ path: String, _ function: String) throws -> [UInt64] {
    let f = try #require(ELFImage(path: path).symbol(named: function))
    let r = try run("/usr/bin/env", ["objdump", "-d", "--start-address=0x\(String(f.address, radix: 16))",
                                     "--stop-address=0x\(String(f.address + f.size, radix: 16))", path])
    return objdumpInstructions(r.stdout)
}

/// The address of the instruction after the one at `address` (objdump as ground truth).
func instructionAfter(_ address: UInt64, in path: String) throws -> UInt64 {
    let r = try run("/usr/bin/env", ["objdump", "-d", "--start-address=0x\(String(address, radix: 16))",
                                     "--stop-address=0x\(String(address + 16, radix: 16))", path])
    return try #require(objdumpInstructions(r.stdout).dropFirst().first)
}

/// Instruction addresses in `objdump -d` output: lines "ADDR:<tab>BYTES<tab>MNEMONIC";
/// a long instruction's extra bytes continue on a line without a mnemonic, skipped here.
func objdumpInstructions(_ output: String) -> [UInt64] {
    output.split(separator: "\n").compactMap { line -> UInt64? in
        let fields = line.split(separator: "\t", omittingEmptySubsequences: false)
        guard fields.count >= 3, let colon = fields[0].firstIndex(of: ":") else { return nil }
        return UInt64(fields[0][..<colon].trimmingCharacters(in: .whitespaces), radix: 16)
    }
}
