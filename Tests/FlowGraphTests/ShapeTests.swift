import ELF
import FlowGraph
import Foundation
import Testing
import TestSupport

/// Graphs of the hand-written functions in guests/shapes.S, whose blocks are known exactly
/// (the comment above each function there gives them).
@Suite struct ShapeTests {
    let image: ELFImage

    init() throws {
        image = try ELFImage(path: try Guests.path("shapes"))
    }

    func graph(_ name: String, splitAtCalls: Bool = false) throws -> FlowGraph {
        try FlowGraph.build(function: name, in: image, options: FlowGraphOptions(splitAtCalls: splitAtCalls))
    }

    /// One line per block: `ID [MNEMONICS] END -> TARGET KIND, ...`, targets outside the
    /// graph by symbol name.
    func shape(_ g: FlowGraph) -> [String] {
        let symbols = Symbolizer(image: image)
        return g.blocks.map { b in
            var s = "\(b.id) [\(b.instructions.map(\.mnemonic).joined(separator: " "))] \(b.end.kind)"
            if !b.successors.isEmpty {
                s += " -> " + b.successors.map { e in
                    let to = e.block.map(String.init) ?? symbols.describe(e.target)
                    return e.kind == .table ? "\(to) case \(e.cases.map(String.init).joined(separator: ","))" : "\(to) \(e.kind.rawValue)"
                }.joined(separator: ", ")
            }
            return s
        }
    }

    @Test func straightLine() throws {
        #expect(shape(try graph("shape_straight")) == ["0 [mov add ret] exit"])
    }

    @Test func diamond() throws {
        #expect(shape(try graph("shape_diamond")) == [
            "0 [test jz] conditional -> 2 taken, 1 not-taken",
            "1 [mov jmp] jump -> 3 jump",
            "2 [mov] fall-through -> 3 fall-through",
            "3 [ret] exit",
        ])
    }

    @Test func loopSplitsTheEntryBlockAtItsHead() throws {
        #expect(shape(try graph("shape_loop")) == [
            "0 [xor] fall-through -> 1 fall-through",
            "1 [add dec jnz] conditional -> 1 taken, 2 not-taken",
            "2 [ret] exit",
        ])
    }

    @Test func nestedLoops() throws {
        #expect(shape(try graph("shape_nested")) == [
            "0 [xor mov] fall-through -> 1 fall-through",
            "1 [mov] fall-through -> 2 fall-through",
            "2 [add dec jnz] conditional -> 2 taken, 3 not-taken",
            "3 [dec jnz] conditional -> 1 taken, 4 not-taken",
            "4 [ret] exit",
        ])
    }

    @Test func positionIndependentJumpTable() throws {
        let g = try graph("shape_pic_table")
        #expect(shape(g) == [
            "0 [cmp jnbe] conditional -> 5 taken, 1 not-taken",
            "1 [mov lea movsxd add jmp] indirect -> 2 case 0,3, 3 case 1, 4 case 2",
            "2 [mov ret] exit",
            "3 [mov ret] exit",
            "4 [mov ret] exit",
            "5 [xor ret] exit",
        ])
        let t = try #require(g.jumpTables.first)
        #expect(g.jumpTables.count == 1)
        #expect(t.entrySize == 4 && t.targets.count == 4)
        // The range check is `cmp edi, 3` at the function's start; the table is indexed by
        // eax, a copy of edi.
        #expect(t.bound == .compare(at: g.entry))
        #expect(t.jump == g.blocks[1].instructions.last?.address)
        #expect(g.unresolvedJumps.isEmpty)
    }

    @Test func absoluteJumpTable() throws {
        let g = try graph("shape_abs_table")
        #expect(shape(g) == [
            "0 [cmp jnb] conditional -> 4 taken, 1 not-taken",
            "1 [jmp] indirect -> 2 case 0, 3 case 1",
            "2 [mov ret] exit",
            "3 [mov ret] exit",
            "4 [xor ret] exit",
        ])
        let t = try #require(g.jumpTables.first)
        #expect(t.entrySize == 8 && t.targets == [g.blocks[2].start, g.blocks[3].start])
        #expect(t.bound == .compare(at: g.entry))
    }

    @Test func jumpTableWithoutRangeCheckIsScannedInsideTheFunction() throws {
        let g = try graph("shape_scan_table")
        #expect(shape(g) == [
            "0 [lea movsxd add jmp] indirect -> 1 case 0, 2 case 1",
            "1 [mov ret] exit",
            "2 [mov ret] exit",
        ])
        #expect(g.jumpTables.first?.bound == .scanned)
    }

    @Test func tailCallIsAJumpOutOfTheGraph() throws {
        let g = try graph("shape_tail")
        #expect(shape(g) == [
            "0 [test jz] conditional -> 2 taken, 1 not-taken",
            "1 [jmp] jump -> shape_straight jump",
            "2 [ret] exit",
        ])
        #expect(g.blocks[1].successors.first?.block == nil)
    }

    @Test func callsEndBlocksOnlyWhenAskedTo() throws {
        #expect(shape(try graph("shape_calls")) == ["0 [push call call pop ret] exit"])
        #expect(shape(try graph("shape_calls", splitAtCalls: true)) == [
            "0 [push call] call -> 1 return",
            "1 [call] call -> 2 return",
            "2 [pop ret] exit",
        ])
    }

    @Test func unresolvedIndirectJumpHasNoSuccessorsAndAReason() throws {
        let g = try graph("shape_indirect")
        #expect(shape(g) == ["0 [mov jmp] indirect"])
        let jump = try #require(g.unresolvedJumps.first)
        #expect(jump.jump == g.blocks[0].instructions[1].address)
        #expect(jump.reason.contains("jmp rax"))
    }

    @Test func undecodableBytesEndAnIncompleteBlockWithTheReason() throws {
        let g = try graph("shape_bad")
        #expect(shape(g) == ["0 [mov] incomplete"])
        guard case let .incomplete(reason) = g.blocks[0].end else { Issue.record("not incomplete"); return }
        let bad = g.entry + 5
        #expect(reason.contains("0x\(String(bad, radix: 16))"))
        #expect(reason.contains("invalid instruction"))
    }

    @Test func codeRunningOffTheFunctionsEndIsIncomplete() throws {
        let g = try graph("shape_runoff")
        #expect(shape(g) == ["0 [mov add] incomplete"])
        guard case let .incomplete(reason) = g.blocks[0].end else { Issue.record("not incomplete"); return }
        #expect(reason.contains("runs past the end of shape_runoff"))
    }

    @Test func jumpIntoTheMiddleOfAnInstructionFlagsBothBlocksAndProbesNeither() throws {
        let g = try graph("shape_overlap")
        #expect(shape(g) == [
            "0 [test jnz] conditional -> 2 taken, 1 not-taken",
            "1 [mov ret] exit",
            "2 [xor ret] exit",
        ])
        #expect(g.blocks[0].overlaps == nil)
        #expect(g.blocks[1].overlaps == g.blocks[2].start)
        #expect(g.blocks[2].overlaps == g.blocks[1].start)
        #expect(g.probePlacements.map(\.block) == [0])
    }

    @Test func entryBlockThatIsALoopHead() throws {
        let g = try graph("shape_entry_loop")
        #expect(shape(g) == ["0 [dec jnz] conditional -> 0 taken, 1 not-taken", "1 [ret] exit"])
        #expect(g.probePlacements.map(\.role) == [.entry, .exit])
    }

    @Test func hltEndsTheFunction() throws {
        #expect(shape(try graph("shape_hlt")) == ["0 [cli hlt] exit"])
    }

    @Test func anAddressInsideAFunctionStartsTheGraphThere() throws {
        let diamond = try graph("shape_diamond")
        let g = try FlowGraph.build(address: diamond.blocks[2].start, in: image)
        #expect(g.name == "shape_diamond+0x\(String(diamond.blocks[2].start - diamond.entry, radix: 16))")
        // Nothing in this part jumps to the ret, so the mov and the ret are one block.
        #expect(shape(g) == ["0 [mov ret] exit"])
        #expect(g.bounds == diamond.bounds)
    }

    @Test func unknownFunctionSuggestsNames() throws {
        let r = Result { () throws(FlowGraphError) in try FlowGraph.build(function: "shape_lop", in: image) }
        guard case let .failure(e) = r else { Issue.record("built a graph for a missing function"); return }
        #expect(e.description == "no function 'shape_lop' in \(image.path); did you mean 'shape_loop', 'shape_bad', 'shape_hlt'?")
    }
}
