import ELF
import FlowGraph
import Testing
import TestSupport

/// The graph of guests/switch.c's `dispatch`, checked against what the ELF says: each case
/// body is the one that counts that case in its own variable.
@Suite struct SwitchGuestTests {
    let image: ELFImage
    let graph: FlowGraph

    init() throws {
        image = try ELFImage(path: try Guests.path("switch"))
        graph = try FlowGraph.build(function: "dispatch", in: image)
    }

    func address(_ symbol: String) throws -> UInt64 { try #require(image.symbol(named: symbol)).address }

    /// The variables whose counters a block (and the straight line it falls into) updates.
    func counters(updatedFrom block: BasicBlock) -> Set<UInt64> {
        Set(block.instructions.compactMap(\.reference))
    }

    @Test func everyCaseOfTheJumpTableIsFound() throws {
        #expect(graph.unresolvedJumps.isEmpty)
        let table = try #require(graph.jumpTables.first)
        #expect(graph.jumpTables.count == 1)
        #expect(table.entrySize == 4)
        #expect(table.targets.count == 8)
        for (k, target) in table.targets.enumerated() {
            let block = try #require(graph.blocks.first { $0.start == target }, "case \(k) target \(target) is not a block")
            #expect(counters(updatedFrom: block).contains(try address("case\(k)_hits")), "case \(k) at \(target)")
        }
        // The range check sends everything past 7 to the default body.
        let entry = try #require(graph.entryBlock)
        #expect(entry.end == .conditional)
        let taken = try #require(entry.successors.first { $0.kind == .taken }?.block)
        #expect(counters(updatedFrom: graph.blocks[taken]).contains(try address("default_hits")))
        if case let .compare(at) = table.bound {
            #expect(entry.instructions.contains { $0.address == at && $0.mnemonic == "cmp" })
        } else {
            Issue.record("the table's bound did not come from the range check")
        }
    }

    @Test func tailCallLoopsAndTheReturn() throws {
        // case 7 leaves through a jump to finish().
        let outside = graph.edges.filter { $0.successor.block == nil }
        #expect(outside.map(\.successor.target) == [try address("finish")])
        #expect(outside.map(\.successor.kind) == [.jump])
        #expect(counters(updatedFrom: graph.blocks[outside[0].from]).contains(try address("case7_hits")))
        // Two loops: case 1's counting loop and case 3's subtraction loop.
        let loops = backEdges(graph)
        #expect(loops.count == 2)
        for (from, to) in loops {
            let head = graph.blocks[to]
            #expect(from == to && head.end == .conditional, "loop \(from) -> \(to)")
        }
        // Every early return goes through the one ret.
        #expect(graph.blocks.filter(\.isExit).count == 1)
        #expect(!graph.blocks.contains { $0.isIncomplete || $0.overlaps != nil })
        // Every block is reachable from the entry.
        var seen: Set<Int> = [0], work = [0]
        while let b = work.popLast() {
            for s in graph.blocks[b].successors { if let t = s.block, seen.insert(t).inserted { work.append(t) } }
        }
        #expect(seen.count == graph.blocks.count)
    }

    @Test func dataSymbolsAreNotFunctions() throws {
        let r = Result { () throws(FlowGraphError) in try FlowGraph.build(function: "case0_hits", in: image) }
        guard case let .failure(e) = r else { Issue.record("built a graph of a variable"); return }
        #expect(e.description.hasPrefix("no function 'case0_hits' in "))
    }

    /// Every function of every guest: compiler output decodes completely, and the blocks
    /// tile what was decoded.
    @Test(arguments: ["counter", "fib", "smp", "fault", "spin", "status", "array", "loop", "switch"])
    func everyGuestFunctionDecodes(guest: String) throws {
        let image = try ELFImage(path: try Guests.path(guest))
        for f in image.symbols where f.kind == .function && f.size > 0 {
            let g = try FlowGraph.build(function: f.name, in: image)
            for b in g.blocks {
                #expect(!b.isIncomplete, "\(guest) \(f.name) block \(b.id): \(b.end)")
            }
            #expect(g.unresolvedJumps.isEmpty, "\(guest) \(f.name)")
            checkInvariants(g)
        }
    }
}

/// What every graph must satisfy, whatever the bytes.
func checkInvariants(_ g: FlowGraph, sourceLocation: SourceLocation = #_sourceLocation) {
    #expect(g.blocks.map(\.id) == Array(g.blocks.indices), sourceLocation: sourceLocation)
    #expect(zip(g.blocks, g.blocks.dropFirst()).allSatisfy { $0.start < $1.start }, sourceLocation: sourceLocation)
    #expect(g.blocks.filter(\.isEntry).map(\.start) == [g.entry], sourceLocation: sourceLocation)
    for b in g.blocks {
        #expect(b.instructions.first.map { $0.address == b.start } ?? true, sourceLocation: sourceLocation)
        for (i, j) in zip(b.instructions, b.instructions.dropFirst()) {
            #expect(i.end == j.address, "block \(b.id) is not contiguous", sourceLocation: sourceLocation)
            #expect(!i.endsBlock, "block \(b.id) goes on after \(i.text)", sourceLocation: sourceLocation)
        }
        if case let .incomplete(reason) = b.end { #expect(!reason.isEmpty, sourceLocation: sourceLocation) }
        for s in b.successors {
            if let k = s.block {
                #expect(g.blocks.indices.contains(k) && g.blocks[k].start == s.target, sourceLocation: sourceLocation)
            } else {
                #expect(g.bounds.map { !$0.contains(s.target) } ?? false, "edge to \(s.target) left the graph", sourceLocation: sourceLocation)
            }
        }
        let expected: Int
        switch b.end {
        case .exit, .incomplete: expected = 0
        case .fallThrough, .jump, .call: expected = 1
        case .conditional: expected = 2
        case .indirect:
            // Unresolved: no successor. Resolved: one table edge per distinct target, whose
            // cases together are the table's indexes 0..<N, each once.
            if g.unresolvedJumps.contains(where: { $0.jump == b.instructions.last?.address }) {
                expected = 0
            } else {
                #expect(b.successors.allSatisfy { $0.kind == .table && !$0.cases.isEmpty }, "block \(b.id)", sourceLocation: sourceLocation)
                let cases = b.successors.flatMap(\.cases)
                #expect(!cases.isEmpty && cases.sorted() == Array(0..<cases.count), "block \(b.id) table cases", sourceLocation: sourceLocation)
                expected = Set(b.successors.map(\.target)).count
            }
        }
        #expect(b.successors.count == expected, "block \(b.id) \(b.end.kind)", sourceLocation: sourceLocation)
    }
}

/// Edges to a block on the current path of a depth-first walk from the entry: one per loop.
func backEdges(_ g: FlowGraph) -> [(Int, Int)] {
    var state = [Int](repeating: 0, count: g.blocks.count)  // 0 new, 1 on the path, 2 done
    var out: [(Int, Int)] = []
    func visit(_ b: Int) {
        state[b] = 1
        for s in g.blocks[b].successors {
            guard let t = s.block else { continue }
            if state[t] == 1 { out.append((b, t)) } else if state[t] == 0 { visit(t) }
        }
        state[b] = 2
    }
    visit(0)
    return out
}
