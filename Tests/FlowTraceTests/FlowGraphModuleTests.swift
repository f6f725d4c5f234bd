import FlowGraph
import FlowTrace
import FlowTraceGraphs
import FlowTraceSimulation
import Testing

/// A diamond at 0x1000: test rdi,rdi ; je 0x100c ; mov eax,1 ; jmp 0x1011 ;
/// 0x100c: mov eax,2 ; 0x1011: ret.
private let diamond: [UInt8] = [0x48, 0x85, 0xFF, 0x74, 0x07, 0xB8, 0x01, 0x00, 0x00, 0x00, 0xEB, 0x05,
                                0xB8, 0x02, 0x00, 0x00, 0x00, 0xC3]

private func diamondGraph() -> FlowGraph {
    FlowGraph.build(entry: 0x1000, name: "diamond", bounds: 0x1000..<0x1012, source: BufferCodeSource(base: 0x1000, bytes: diamond))
}

@Suite("trace modules from flow graphs")
struct FlowGraphModuleTests {
    @Test func entryRegularAndExitProbesAsTheReferencePlacesThem() throws {
        let g = diamondGraph()
        #expect(g.blocks.map(\.start) == [0x1000, 0x1005, 0x100C, 0x1011])
        let t = makeTarget()
        let m = try TraceModule(target: t)
        let entry = Probe("entry", entries: try entries("rdi"))
        let regular = Probe("block", entries: try entries("rsi"))
        let exit = Probe("exit", entries: try entries("rax"))
        let placements = try m.addFlowGraph(g, entry: entry, regular: regular, exit: exit)
        #expect(placements.map(\.role) == [.entry, .block, .block, .exit])
        #expect(m.locations.map(\.address) == [0x1000, 0x1005, 0x100C, 0x1011])
        #expect(m.locations.map(\.timing) == [.before, .before, .before, .after])
        #expect(m.locations.map { ObjectIdentifier($0.probe) } == [entry, regular, regular, exit].map(ObjectIdentifier.init))

        try m.enable()
        // One pass through the not-taken side.
        for a: UInt64 in [0x1000, 0x1005, 0x1011] { t.fire(at: a, vcpu: 0) }
        let records = Array(m.report())
        #expect(records.map(\.address) == [0x1000, 0x1005, 0x1011])
        #expect(records.map(\.probe.description) == ["entry", "block", "exit"])
        #expect(records[0].values == [.register(.u64(0x1000))])
        #expect(records[2].values == [.register(.u64(0x1111_2222_3333_4444))])
        #expect(m.counters.locations.map(\.hits) == [1, 1, 0, 1])
    }

    @Test func aTakenAddressMeansNoneOfTheGraphIsAdded() throws {
        let t = makeTarget()
        let m = try TraceModule(target: t)
        try m.addProbe(Probe("mine", entries: []), at: 0x100C)
        let p = Probe("p", entries: [])
        let r = Result { () throws(TraceError) in try m.addFlowGraph(diamondGraph(), entry: p, regular: p, exit: p) }
        guard case let .failure(e) = r else { Issue.record("added a graph over an existing probe"); return }
        #expect(e == .duplicateLocation(0x100C))
        #expect(m.locations.map(\.address) == [0x100C])
        // The probes it would have used are not frozen by the failed attempt.
        #expect(p.isInUse == false)
    }

    @Test func addProbesIsAllOrNothing() throws {
        let t = makeTarget()  // modules hold their target weakly
        let m = try TraceModule(target: t)
        let p = Probe("p", entries: [])
        let r = Result { () throws(TraceError) in try m.addProbes([(p, 0x10, .before), (p, 0x20, .after), (p, 0x10, .after)]) }
        guard case let .failure(e) = r else { Issue.record("added the same address twice"); return }
        #expect(e == .duplicateLocation(0x10))
        #expect(m.locations.isEmpty && !p.isInUse)
        try m.addProbes([(p, 0x10, .before), (p, 0x20, .after)])
        #expect(m.locations.map(\.address) == [0x10, 0x20] && m.locations.map(\.timing) == [.before, .after])
        withExtendedLifetime(t) {}
    }

    @Test func notWhileEnabled() throws {
        let t = makeTarget()
        let m = try TraceModule(target: t)
        try m.addProbe(Probe("x", entries: []), at: 0x2000)
        try m.enable()
        let p = Probe("p", entries: [])
        let r = Result { () throws(TraceError) in try m.addFlowGraph(diamondGraph(), entry: p, regular: p, exit: p) }
        guard case let .failure(e) = r else { Issue.record("added probes while enabled"); return }
        #expect(e == .invalidState(operation: "add a probe to", state: .enabled))
    }
}
