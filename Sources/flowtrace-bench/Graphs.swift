import ELF
import FlowGraph
import Foundation

/// Building control-flow graphs from an ELF file: the switch guest's `dispatch` (21 blocks,
/// 77 instructions, a jump table) built 2000 times per run; µs per graph and ns per
/// decoded instruction. No KVM needed.
func graphs(guests: String) throws -> [Figure] {
    let image = try ELFImage(path: guests + "/switch.elf")
    let once = try FlowGraph.build(function: "dispatch", in: image)
    let perRun = 2000
    let r = try repeated(runs) {
        let start = ContinuousClock.now
        for _ in 0..<perRun {
            let g = try FlowGraph.build(function: "dispatch", in: image)
            precondition(g.blocks.count == once.blocks.count)
        }
        return seconds(ContinuousClock.now - start) * 1e6 / Double(perRun)
    }
    let perInstruction = r.median * 1000 / Double(once.instructionCount)
    return [Figure(label: "graph of dispatch, \(once.blocks.count) blocks, \(once.instructionCount) instructions (µs, median [min-max] of \(runs))",
                   value: "\(f1(r.median)) [\(f1(r.min))-\(f1(r.max))], \(f1(perInstruction)) ns per instruction",
                   json: #"{"bench":"graph.dispatch","blocks":\#(once.blocks.count),"instructions":\#(once.instructionCount),"us":\#(f1(r.median)),"min":\#(f1(r.min)),"max":\#(f1(r.max)),"ns_per_instruction":\#(f1(perInstruction)),"runs":\#(runs)}"#)]
}
