import FlowGraph
import TraceSpec

extension FlowGraph {
    /// The graph as one JSON object, for scripts: `{"function", "entry", "bounds", "blocks":
    /// [{"id", "start", "end", "kind", "entry", "incomplete"?, "overlaps"?, "hits"?,
    /// "instructions": [{"addr", "bytes", "text", "ref"?}], "successors": [{"kind", "target",
    /// "block" (null outside the graph), "cases"?}]}], "jump_tables": [...], "unresolved": [...]}`.
    /// Addresses are "0x..." strings; `ref` is the symbol an operand points to.
    func json(describe: (UInt64) -> String?, hits: [Int: UInt64]? = nil) -> String {
        var out = "{\"function\":\(jsonString(name)),\"entry\":\"\(hex(entry))\","
        out += "\"bounds\":" + (bounds.map { "[\"\(hex($0.lowerBound))\",\"\(hex($0.upperBound))\"]" } ?? "null") + ","
        out += "\"split_at_calls\":\(options.splitAtCalls),\"blocks\":["
        out += blocks.map { b in
            var o = "{\"id\":\(b.id),\"start\":\"\(hex(b.start))\",\"end\":\"\(hex(b.endAddress))\",\"kind\":\"\(b.end.kind)\",\"entry\":\(b.isEntry)"
            if case let .incomplete(reason) = b.end { o += ",\"incomplete\":\(jsonString(reason))" }
            if let v = b.overlaps { o += ",\"overlaps\":\"\(hex(v))\"" }
            if let hits { o += ",\"hits\":\(hits[b.id] ?? 0)" }
            o += ",\"instructions\":[" + b.instructions.map { i in
                var s = "{\"addr\":\"\(hex(i.address))\",\"bytes\":\"\(hexBytes(i.bytes))\",\"text\":\(jsonString(i.text))"
                if let r = i.reference, let n = describe(r) { s += ",\"ref\":\(jsonString(n))" }
                return s + "}"
            }.joined(separator: ",") + "]"
            o += ",\"successors\":[" + b.successors.map { e in
                var s = "{\"kind\":\"\(e.kind.rawValue)\",\"target\":\"\(hex(e.target))\",\"block\":\(e.block.map(String.init) ?? "null")"
                if e.kind == .table { s += ",\"cases\":[\(e.cases.map(String.init).joined(separator: ","))]" }
                return s + "}"
            }.joined(separator: ",") + "]"
            return o + "}"
        }.joined(separator: ",")
        out += "],\"jump_tables\":[" + jumpTables.map { t in
            let bound: String
            switch t.bound {
            case let .compare(at): bound = "\"compare\",\"compare_at\":\"\(hex(at))\""
            case .scanned: bound = "\"scanned\""
            }
            return "{\"jump\":\"\(hex(t.jump))\",\"table\":\"\(hex(t.table))\",\"entry_size\":\(t.entrySize),\"bound\":\(bound),"
                + "\"targets\":[\(t.targets.map { "\"\(hex($0))\"" }.joined(separator: ","))]}"
        }.joined(separator: ",")
        out += "],\"unresolved\":[" + unresolvedJumps.map { "{\"jump\":\"\(hex($0.jump))\",\"reason\":\(jsonString($0.reason))}" }.joined(separator: ",")
        return out + "]}\n"
    }
}
