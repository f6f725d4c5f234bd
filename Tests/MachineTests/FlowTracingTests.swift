import ELF
import FlowGraph
import FlowTrace
import FlowTraceGraphs
import KVM
import Machine
import Testing
import TestSupport

/// op(i) of guests/switch.c for i = 0 ..< 240; the argument x is i.
let switchOps: [UInt64] = (0..<240).map { i in (5 * i + i / 3) % 10 }

/// Flow-graph modules on real guests: block hits against what the guests compute.
@Suite("flow graphs of running guests", .serialized, .enabled(if: kvmUsable, kvmSkipReason), .timeLimit(.minutes(5)))
struct FlowTracingTests {
    @Test("fib: entry hits = calls (rdi in call order), exit hits = returns (rax in return order)", arguments: workingEngines)
    func fibFlow(_ engine: BreakpointEngine) throws { try checkFibFlow(engine) }

    /// hw has 4 breakpoints; dispatch has 21 blocks.
    @Test("switch: per-case block hits, the tail call, the loops, and flow conservation", arguments: workingEngines.filter { $0 != .hw })
    func switchFlow(_ engine: BreakpointEngine) throws { try checkSwitchFlow(engine) }

    @Test("a graph read from guest memory equals the ELF's, with probes patched in or not")
    func graphFromGuestMemory() throws {
        let m = try Machine(path: Guests.path("switch"), configuration: .init(engine: .engine(.hlt)))
        let fromELF = try FlowGraph.build(function: "dispatch", in: m.image)
        func fromMemory() -> FlowGraph {
            FlowGraph.build(entry: fromELF.entry, name: "dispatch", bounds: fromELF.bounds, source: MachineCodeSource(machine: m))
        }
        func same(_ a: FlowGraph, _ b: FlowGraph) -> Bool {
            a.blocks.map(\.instructions) == b.blocks.map(\.instructions) && a.blocks.map(\.successors) == b.blocks.map(\.successors)
                && a.jumpTables == b.jumpTables
        }
        #expect(same(fromMemory(), fromELF))
        let module = try TraceModule(target: m)
        let p = Probe("p", entries: [])
        try module.addFlowGraph(fromELF, entry: p, regular: p, exit: p)
        try module.enable()
        // The patching engine put its trap byte (hlt) at every probed block; the code source
        // shows the guest's own bytes.
        #expect(try m.read(virtual: fromELF.entry, count: 1) == [0xF4])
        #expect(same(fromMemory(), fromELF))
        // Without bounds it follows the tail call into finish() as well.
        let unbounded = FlowGraph.build(entry: fromELF.entry, bounds: nil, source: MachineCodeSource(machine: m))
        let finish = try #require(m.image.symbol(named: "finish")).address
        #expect(unbounded.blocks.contains { $0.start == finish })
        #expect(unbounded.blocks.count == fromELF.blocks.count + 1)
    }
}

/// Boots `guest`, probes `function`'s graph (rdi at entries, rax after exits), runs it.
func traceFlow(_ guest: String, _ function: String, engine: BreakpointEngine) throws -> (FlowGraph, Traced) {
    let m = try Machine(path: Guests.path(guest), configuration: .init(engine: .engine(engine)))
    let graph = try FlowGraph.build(function: function, in: m.image)
    let module = try TraceModule(target: m)
    try module.addFlowGraph(graph, entry: Probe("entry", entries: [try reg("rdi")]), regular: Probe("block", entries: []),
                            exit: Probe("exit", entries: [try reg("rax")]))
    try module.enable()
    let r = try m.run(timeout: .seconds(60))
    #expect(r.ending == .exited(status: 0))
    #expect(m.engine?.engine == engine)
    return (graph, Traced(machine: m, module: module, result: r))
}

/// Hits per block from the module's per-location counters.
func blockHits(_ g: FlowGraph, _ t: Traced) -> [Int: UInt64] {
    var hits: [UInt64: UInt64] = [:]
    for l in t.module.counters.locations { hits[l.address] = l.hits }
    return g.blockHits(fromAddressCounts: hits)
}

/// `objdump`: cross-check the rets with objdump (not there inside the nested KVM machine).
func checkFibFlow(_ engine: BreakpointEngine, objdump: Bool = true) throws {
    let (g, t) = try traceFlow("fib", "fib", engine: engine)
    #expect(t.result.console.map(\.text) == ["fib(15) = 610, calls = 1973"])
    let truth = fibGroundTruth(15)
    let records = Array(t.report)
    let entries = records.filter { $0.probe.description == "entry" }
    let exits = records.filter { $0.probe.description == "exit" }
    #expect(entries.count == 1973 && exits.count == 1973)
    #expect(entries.map { u64($0.values[0]) } == truth.args)
    #expect(exits.map { u64($0.values[0]) } == truth.returns)
    // The exit probes sit on fib's rets (objdump as the second opinion).
    let rets = g.blocks.filter(\.isExit).compactMap { $0.instructions.last }
    #expect(rets.allSatisfy { $0.mnemonic == "ret" })
    #expect(Set(exits.map(\.address)) == Set(rets.map(\.address)))
    if objdump { #expect(Set(rets.map(\.address)) == Set(try returnAddresses(try Guests.path("fib"), function: "fib"))) }
    // fib(n) recurses when n >= 2: the block with the calls runs once per such call.
    let hits = blockHits(g, t)
    let recursive = try #require(g.blocks.first { $0.instructions.contains { $0.flow == .call(target: g.entry) } })
    #expect(hits[recursive.id] == UInt64(truth.args.filter { $0 >= 2 }.count))
}

func checkSwitchFlow(_ engine: BreakpointEngine) throws {
    let (g, t) = try traceFlow("switch", "dispatch", engine: engine)
    let perCase = (0..<8).map { k in UInt64(switchOps.filter { $0 == k }.count) }
    let defaults = UInt64(switchOps.filter { $0 >= 8 }.count)
    let total = switchOps.enumerated().reduce(UInt64(0)) { $0 + dispatchResult(op: $1.element, x: UInt64($1.offset)) }
    #expect(t.result.console.map(\.text) == [
        "switch: calls 240 cases \(perCase.map(String.init).joined(separator: " ")) default \(defaults) finish \(perCase[7]) total \(total)",
    ])
    let hits = blockHits(g, t)
    let entry = try #require(g.entryBlock)
    #expect(hits[entry.id] == 240)
    let table = try #require(g.jumpTables.first)
    for (k, target) in table.targets.enumerated() {
        let b = try #require(g.blocks.first { $0.start == target })
        #expect(hits[b.id] == perCase[k], "case \(k)")
    }
    let defaultBlock = try #require(entry.successors.first { $0.kind == .taken }?.block)
    #expect(hits[defaultBlock] == defaults)
    // Calls leave through the ret or through the tail call to finish().
    let tail = try #require(g.blocks.first { $0.successors.contains { $0.block == nil } })
    let exitHits = g.blocks.filter(\.isExit).map { hits[$0.id] ?? 0 }.reduce(0, +)
    #expect(hits[tail.id] == perCase[7])
    #expect(exitHits + perCase[7] == 240)
    // The loops' bodies run once per iteration: case 1 adds x % 8 terms, case 3 subtracts
    // 7 while x > 10.
    let case1 = switchOps.indices.filter { switchOps[$0] == 1 }.map { UInt64($0 % 8) }.reduce(0, +)
    let case3 = switchOps.indices.filter { switchOps[$0] == 3 }.map { x in x > 10 ? UInt64((x - 10 + 6) / 7) : 0 }.reduce(0, +)
    let loopBodies = g.blocks.filter { b in b.successors.contains { $0.block == b.id } }.map { hits[$0.id] ?? 0 }
    #expect(loopBodies.sorted() == [case1, case3].sorted())
    // Flow conservation: each run of a block that stays in the graph enters exactly one
    // block; blocks are entered only that way, and the entry block by the 240 calls too.
    let entered = g.blocks.map { hits[$0.id] ?? 0 }.reduce(0, +) - 240
    let handedOn = g.blocks.filter { b in !b.isExit && b.successors.contains { $0.block != nil } }.map { hits[$0.id] ?? 0 }.reduce(0, +)
    #expect(entered == handedOn)
}

/// dispatch(op, x) of guests/switch.c.
func dispatchResult(op: UInt64, x: UInt64) -> UInt64 {
    var x = x
    switch op {
    case 0: return x + 1
    case 1: return (0..<(x % 8)).reduce(0) { $0 + $1 * x }
    case 2:
        if x & 1 == 1 { return x * 3 }
        x /= 2
    case 3: while x > 10 { x -= 7 }
    case 4: return x << 2
    case 5: x = x * x + 5
    case 6:
        if x == 0 { return 0 }
        x -= 1
    case 7: return x ^ 0x5A
    default: return 0
    }
    return x + 100
}
