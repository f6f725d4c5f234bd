import ELF
import FlowGraph
import Testing
import TestSupport

/// Arbitrary bytes: every graph is well formed, whatever it decodes; nothing crashes or hangs.
@Suite struct RobustnessTests {
    @Test func truncatedInstructionSaysHowManyBytesThereWere() {
        // mov rax, [rip+disp32] cut after its opcode.
        let g = FlowGraph.build(entry: 0x1000, bounds: 0x1000..<0x1003, source: BufferCodeSource(base: 0x1000, bytes: [0x48, 0x8B, 0x05]))
        #expect(g.blocks.count == 1)
        #expect(g.blocks[0].instructions.isEmpty)
        #expect(g.blocks[0].end == .incomplete("cannot decode 48 8b 05 at 0x1000: needs more bytes than the 3 readable here"))
        #expect(g.probePlacements.isEmpty)
    }

    @Test func entryOutsideTheSourceIsAnEmptyIncompleteBlock() {
        let g = FlowGraph.build(entry: 0x5000, bounds: nil, source: BufferCodeSource(base: 0x1000, bytes: [0xC3]))
        #expect(g.blocks.count == 1)
        #expect(g.blocks[0].end == .incomplete("0x5000 is outside the buffer"))
    }

    @Test func withoutBoundsDirectJumpsAreFollowedAnywhere() {
        // 0x1000: jmp 0x1010 ; ... 0x1010: ret
        var bytes = [UInt8](repeating: 0xCC, count: 0x11)
        bytes[0] = 0xEB; bytes[1] = 0x0E; bytes[0x10] = 0xC3
        let g = FlowGraph.build(entry: 0x1000, bounds: nil, source: BufferCodeSource(base: 0x1000, bytes: bytes))
        #expect(g.blocks.map(\.start) == [0x1000, 0x1010])
        #expect(g.blocks[0].successors.map(\.block) == [1])
        // With bounds that leave the target out, it is an edge out of the graph.
        let bounded = FlowGraph.build(entry: 0x1000, bounds: 0x1000..<0x1002, source: BufferCodeSource(base: 0x1000, bytes: bytes))
        #expect(bounded.blocks.count == 1)
        #expect(bounded.blocks[0].successors.map(\.block) == [nil])
    }

    @Test func singleInstructionFunctionGetsOnlyItsEntryProbe() {
        let g = FlowGraph.build(entry: 0x1000, bounds: 0x1000..<0x1001, source: BufferCodeSource(base: 0x1000, bytes: [0xC3]))
        #expect(g.probePlacements == [FlowProbePlacement(block: 0, address: 0x1000, timing: .before, role: .entry)])
    }

    @Test func randomBytesGiveWellFormedGraphs() {
        var r = SplitMix64(state: 0x5EED_F10A)
        for round in 0..<20_000 {
            let n = 1 + Int(r.next() % 96)
            let bytes = r.bytes(n)
            let bounded = round % 2 == 0
            let g = FlowGraph.build(entry: 0x4000, bounds: bounded ? 0x4000..<(0x4000 + UInt64(n)) : nil,
                                    source: BufferCodeSource(base: 0x4000, bytes: bytes), options: FlowGraphOptions(splitAtCalls: round % 3 == 0))
            checkInvariants(g)
            // Every decoded instruction is the buffer's bytes at its address.
            for i in g.blocks.flatMap(\.instructions) {
                let o = Int(i.address - 0x4000)
                #expect(Array(bytes[o ..< o + i.length]) == i.bytes)
            }
            for p in g.probePlacements {
                let b = g.blocks[p.block]
                #expect(b.overlaps == nil && !b.instructions.isEmpty)
                #expect(p.address == (p.role == .exit ? b.instructions.last!.address : b.start))
            }
        }
    }

    @Test func mutatedRealCodeGivesWellFormedGraphs() throws {
        let image = try ELFImage(path: try Guests.path("switch"))
        let dispatch = try #require(image.symbol(named: "dispatch"))
        let segment = try #require(image.segments.first { $0.isExecutable })
        let offset = Int(dispatch.address - segment.virtualAddress)
        let original = Array(segment.data[offset ..< offset + Int(dispatch.size)])
        var r = SplitMix64(state: 42)
        for _ in 0..<1000 {
            var bytes = original
            for _ in 0..<(1 + Int(r.next() % 4)) { bytes[Int(r.next() % UInt64(bytes.count))] = UInt8(truncatingIfNeeded: r.next()) }
            let g = FlowGraph.build(entry: dispatch.address, bounds: dispatch.address ..< dispatch.address + dispatch.size,
                                    source: BufferCodeSource(base: dispatch.address, bytes: bytes))
            checkInvariants(g)
        }
    }

    @Test func instructionLimitMarksTheRestIncomplete() throws {
        let image = try ELFImage(path: try Guests.path("switch"))
        let g = try FlowGraph.build(function: "dispatch", in: image, options: FlowGraphOptions(maxInstructions: 10))
        #expect(g.instructionCount == 10)
        #expect(g.blocks.contains { if case let .incomplete(r) = $0.end { r.contains("more than 10 instructions") } else { false } })
        checkInvariants(g)
    }
}
