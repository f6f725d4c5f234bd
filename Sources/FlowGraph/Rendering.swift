extension FlowGraph {
    /// Block hit counts from record counts by address: a block's count is the largest count
    /// at any address inside it (every instruction of a block runs as often as its first, so
    /// an entry probe and an exit probe in one block count once, not twice).
    public func blockHits(fromAddressCounts counts: [UInt64: UInt64]) -> [Int: UInt64] {
        var out: [Int: UInt64] = [:]
        for (address, n) in counts {
            for b in blocks where b.start == address || (b.start <= address && address < b.endAddress) {
                out[b.id] = max(out[b.id] ?? 0, n)
            }
        }
        return out
    }

    /// The graph as text: a header, the jump tables, then each block with its instructions
    /// (address, bytes, Intel syntax, the symbol a reference points to) and its edges.
    /// `describe` names an address (`fib+0x1a`), or returns nil; `hits` adds counts.
    public func text(describe: (UInt64) -> String?, hits: [Int: UInt64]? = nil) -> String {
        var out: [String] = []
        let extent = bounds.map { " \(hex($0.lowerBound))-\(hex($0.upperBound))" } ?? " from \(hex(entry))"
        let edgeCount = edges.count
        out.append("\(name):\(extent), \(blocks.count) block\(blocks.count == 1 ? "" : "s"), \(instructionCount) instruction\(instructionCount == 1 ? "" : "s"), \(edgeCount) edge\(edgeCount == 1 ? "" : "s")"
                   + (options.splitAtCalls ? ", split at calls" : ""))
        for t in jumpTables {
            let how: String
            switch t.bound {
            case let .compare(at): how = "bound from the range check at \(hex(at))"
            case .scanned: how = "no range check found: entries read while they stay inside \(name)"
            }
            out.append("jump table for the jump at \(hex(t.jump)): \(t.targets.count) entries of \(t.entrySize) bytes at \(hex(t.table)) (\(how))")
        }
        for (jump, reason) in unresolvedJumps {
            out.append("unresolved indirect jump at \(hex(jump)): \(reason)")
        }
        let width = blocks.flatMap(\.instructions).map { $0.bytes.count * 3 - 1 }.max() ?? 0
        for b in blocks {
            out.append("")
            var head = "block \(b.id)  \(hex(b.start))  "
            head += ([b.isEntry ? "entry" : nil, b.end.kind].compactMap { $0 }).joined(separator: ", ")
            if let hits { head += "  (hits \(hits[b.id] ?? 0))" }
            out.append(head)
            for i in b.instructions {
                let bytes = hexBytes(i.bytes)
                var line = "  \(hex(i.address))  \(bytes)\(String(repeating: " ", count: max(0, width - bytes.count)))  \(i.text)"
                if let r = i.reference, let name = describe(r) { line += "  ; \(name)" }
                out.append(line)
            }
            if case let .incomplete(reason) = b.end { out.append("  !! incomplete: \(reason)") }
            if let o = b.overlaps { out.append("  !! overlaps the instruction at \(hex(o)): not probed") }
            if !b.successors.isEmpty {
                out.append("  -> " + b.successors.map { s in
                    let where_ = s.block.map { "block \($0)" } ?? "\(describe(s.target) ?? hex(s.target)) (outside)"
                    let label = s.kind == .table ? "case \(s.cases.map(String.init).joined(separator: ","))" : s.kind.rawValue
                    return "\(where_) (\(label))"
                }.joined(separator: ", "))
            }
        }
        return out.joined(separator: "\n") + "\n"
    }

    /// The graph in Graphviz DOT: one box per block (instructions left-aligned), edges
    /// labelled by kind (taken green, not taken red, jump-table cases blue), targets outside
    /// the graph as ellipses. With `hits`, blocks are filled from white (never ran, grey) to
    /// red (the hottest) and labelled with their count.
    public func dot(describe: (UInt64) -> String?, hits: [Int: UInt64]? = nil) -> String {
        var out: [String] = []
        out.append("digraph \(dotString(name)) {")
        let extent = bounds.map { " \(hex($0.lowerBound))-\(hex($0.upperBound))" } ?? ""
        out.append("  graph [label=\(dotString("\(name)\(extent)" + (hits == nil ? "" : " (block hits)"))) labelloc=t fontname=\"monospace\"];")
        out.append("  node [shape=box fontname=\"monospace\" fontsize=10];")
        out.append("  edge [fontname=\"monospace\" fontsize=9];")
        let hottest = hits?.values.max() ?? 0
        for b in blocks {
            var lines = ["block \(b.id)  \(hex(b.start))  " + ([b.isEntry ? "entry" : nil, b.end.kind].compactMap { $0 }).joined(separator: ", ")]
            if let hits { lines.append("hits \(hits[b.id] ?? 0)") }
            for i in b.instructions {
                var l = "\(hex(i.address))  \(i.text)"
                if let r = i.reference, let n = describe(r) { l += "  ; \(n)" }
                lines.append(l)
            }
            if case let .incomplete(reason) = b.end { lines.append("!! incomplete: \(reason)") }
            if let o = b.overlaps { lines.append("!! overlaps the instruction at \(hex(o))") }
            var attributes = ["label=" + dotLabel(lines)]
            if b.isEntry { attributes.append("peripheries=2") }
            if b.isExit { attributes.append("penwidth=2") }
            if b.isIncomplete || b.overlaps != nil { attributes.append("color=red") }
            if let hits {
                let n = hits[b.id] ?? 0
                attributes.append("style=filled")
                attributes.append("fillcolor=\"\(heatColour(n, hottest: hottest))\"")
            }
            out.append("  b\(b.id) [\(attributes.joined(separator: " "))];")
        }
        var outside: [UInt64: String] = [:]
        for (from, s) in edges {
            let to: String
            if let k = s.block {
                to = "b\(k)"
            } else {
                to = "x\(String(s.target, radix: 16))"
                if outside[s.target] == nil {
                    outside[s.target] = to
                    out.append("  \(to) [shape=ellipse label=\(dotString(describe(s.target) ?? hex(s.target)))];")
                }
            }
            var attributes: [String]
            switch s.kind {
            case .taken: attributes = ["label=\"taken\"", "color=darkgreen"]
            case .notTaken: attributes = ["label=\"not taken\"", "color=red"]
            case .table: attributes = ["label=\(dotString("case \(s.cases.map(String.init).joined(separator: ","))"))", "color=blue"]
            case .callReturn: attributes = ["label=\"return\"", "style=dashed"]
            case .jump: attributes = ["label=\"jump\""]
            case .fallThrough: attributes = []
            }
            if s.block == nil { attributes.append("style=dashed") }
            out.append("  b\(from) -> \(to)" + (attributes.isEmpty ? ";" : " [\(attributes.joined(separator: " "))];"))
        }
        out.append("}")
        return out.joined(separator: "\n") + "\n"
    }
}

/// A DOT string literal.
func dotString(_ s: String) -> String { "\"" + dotEscaped(s) + "\"" }

/// A DOT label of left-aligned lines.
func dotLabel(_ lines: [String]) -> String { "\"" + lines.map { dotEscaped($0) + "\\l" }.joined() + "\"" }

private func dotEscaped(_ s: String) -> String {
    var out = ""
    for c in s {
        switch c {
        case "\\": out += "\\\\"
        case "\"": out += "\\\""
        case "\n": out += "\\n"
        default: out.append(c)
        }
    }
    return out
}

/// White to red by share of the hottest block; grey for a block that never ran.
func heatColour(_ n: UInt64, hottest: UInt64) -> String {
    guard n > 0, hottest > 0 else { return "#e0e0e0" }
    let share = Double(n) / Double(hottest)
    let g = Int((1 - share) * 235 + 20), b = Int((1 - share) * 225 + 10)
    func h(_ v: Int) -> String { (v < 16 ? "0" : "") + String(v, radix: 16) }
    return "#ff\(h(g))\(h(b))"
}
