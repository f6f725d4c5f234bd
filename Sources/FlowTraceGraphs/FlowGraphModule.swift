import FlowGraph
import FlowTrace

extension TraceModule {
    /// Probes a function's control-flow graph, as `FlowGraph.probePlacements` says: `entry`
    /// at the entry block, `exit` after each exit block's last instruction, `regular` at
    /// every other block. Only while `created`; on an error (an address that already has a
    /// probe) none of the graph's probes is added. Returns the placements, in the order added.
    @discardableResult
    public func addFlowGraph(_ graph: FlowGraph, entry: Probe, regular: Probe, exit: Probe) throws(TraceError) -> [FlowProbePlacement] {
        let placements = graph.probePlacements
        try addProbes(placements.map { p in
            let probe = switch p.role {
            case .entry: entry
            case .block: regular
            case .exit: exit
            }
            return (probe, p.address, p.timing == .before ? ProbeTiming.before : .after)
        })
        return placements
    }
}
