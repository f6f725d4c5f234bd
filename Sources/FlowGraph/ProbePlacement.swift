/// Where a trace module built from a flow graph probes one block.
public struct FlowProbePlacement: Sendable, Hashable {
    public enum Role: String, Sendable, Hashable {
        /// The entry block, before its first instruction runs.
        case entry
        /// Any other block, before its first instruction runs.
        case block
        /// An exit block, after its last instruction ran.
        case exit
    }

    public let block: Int
    public let address: UInt64
    public let timing: Timing
    public let role: Role

    public init(block: Int, address: UInt64, timing: Timing, role: Role) {
        self.block = block; self.address = address; self.timing = timing; self.role = role
    }

    /// Mirrors the trace modules' before/after without FlowGraph depending on them.
    public enum Timing: String, Sendable, Hashable {
        case before, after
    }
}

extension FlowGraph {
    /// Where a trace module of this graph puts its probes, in block order: the entry block
    /// before its first instruction; exit blocks after their last (the `ret`); every other
    /// block before its first. An entry block that also exits gets both when it has two
    /// instructions or more (with one, only the entry probe fits). Blocks that overlap other
    /// instructions or have none are not probed; an incomplete block is probed at its first
    /// instruction, which did decode.
    public var probePlacements: [FlowProbePlacement] {
        var out: [FlowProbePlacement] = []
        for b in blocks where b.overlaps == nil {
            guard let first = b.instructions.first, let last = b.instructions.last else { continue }
            if b.isEntry {
                out.append(FlowProbePlacement(block: b.id, address: first.address, timing: .before, role: .entry))
                if b.isExit, b.instructions.count > 1 {
                    out.append(FlowProbePlacement(block: b.id, address: last.address, timing: .after, role: .exit))
                }
            } else if b.isExit {
                out.append(FlowProbePlacement(block: b.id, address: last.address, timing: .after, role: .exit))
            } else {
                out.append(FlowProbePlacement(block: b.id, address: first.address, timing: .before, role: .block))
            }
        }
        return out
    }
}
