import ELF
import FlowTrace
import TraceSpec

/// `--count-by` and `--hist` results as people read them (tables, bpftrace-style bars) or
/// as one JSON document.
struct AggregationOutput {
    let results: [AggregationResult]
    /// The location as the user wrote it, per address.
    let locationNames: [UInt64: String]
    let symbols: Symbolizer
    let top: Int

    /// `0x10011f <main+0x1f>` for a value in a function, else `0x...`.
    func describe(_ v: UInt64) -> String {
        let h = "0x" + String(v, radix: 16)
        guard let s = symbol(v) else { return h }
        return "\(h) <\(s)>"
    }

    func symbol(_ v: UInt64) -> String? { symbols.function(containing: v) }

    func title(_ r: AggregationResult) -> String {
        let at = locationNames[r.address] ?? describe(r.address)
        let what: String
        switch r.kind {
        case .count: what = "count by \(r.item)"
        case .log2Histogram: what = "hist of \(r.item)"
        case let .linearHistogram(min, max, step): what = "hist-linear of \(r.item) from \(min) to \(max) by \(step)"
        }
        var t = "\(at) (\(r.timing.rawValue)): \(what), \(r.hits) hit\(r.hits == 1 ? "" : "s")"
        if r.kind == .count { t += ", \(r.values.count) value\(r.values.count == 1 ? "" : "s")" + (r.values.count > top ? " (top \(top))" : "") }
        if r.unreadable > 0 { t += "; \(r.unreadable) unreadable: \(r.unreadableReason ?? "unknown reason")" }
        return t
    }

    /// Tables and bars, one block per location and aggregation.
    func text() -> String {
        var blocks: [String] = []
        for r in results {
            var lines = [title(r)]
            switch r.kind {
            case .count:
                var rows = [[r.item, "COUNT"]]
                for v in r.values.prefix(top) { rows.append([describe(v.value), "\(v.count)"]) }
                if r.values.isEmpty { lines.append("  (no hits)") } else { lines.append(table(rows, rightAligned: [1])) }
            case .log2Histogram, .linearHistogram:
                lines += bars(r)
            }
            blocks.append(lines.joined(separator: "\n"))
        }
        return blocks.joined(separator: "\n\n") + "\n"
    }

    /// bpftrace's layout: `[low, high)  count |@@@@   |`, from the first bucket with hits to
    /// the last, bars scaled to the fullest (52 columns).
    func bars(_ r: AggregationResult) -> [String] {
        guard let first = r.buckets.firstIndex(where: { $0.count > 0 }), let last = r.buckets.lastIndex(where: { $0.count > 0 }) else {
            return ["  (no hits)"]
        }
        let width = 52
        let most = r.buckets.map(\.count).max() ?? 1
        let log2 = r.kind == .log2Histogram
        func bound(_ b: AggregationResult.Bucket) -> String {
            if log2, let h = b.high, h - b.low == 1 { return "[\(number(b.low))]" }
            guard let h = b.high else { return "[\(number(b.low)), ...)" }
            return "[\(number(b.low)), \(number(h)))"
        }
        let labels = r.buckets[first...last].map(bound)
        let labelWidth = labels.map(\.count).max() ?? 0
        let countWidth = r.buckets[first...last].map { "\($0.count)".count }.max() ?? 1
        return zip(labels, r.buckets[first...last]).map { label, b in
            let n = most == 0 ? 0 : Int((Double(b.count) * Double(width) / Double(most)).rounded())
            let bar = String(repeating: "@", count: n) + String(repeating: " ", count: width - n)
            let count = String(repeating: " ", count: countWidth - "\(b.count)".count) + "\(b.count)"
            return "  " + label + String(repeating: " ", count: labelWidth - label.count) + "  " + count + " |" + bar + "|"
        }
    }

    /// Bucket bounds as bpftrace prints them: 1K, 4M ... for powers of two, else decimal.
    func number(_ v: UInt64) -> String {
        let units = ["", "K", "M", "G", "T", "P", "E"]
        var x = v, u = 0
        while x >= 1024, x % 1024 == 0, u < units.count - 1 { x /= 1024; u += 1 }
        return "\(x)\(units[u])"
    }

    /// `{"aggregations":[...]}`: per location and aggregation its values (count) or buckets
    /// (histograms, every one), values as `0x` hex strings, `symbol` where one is known.
    func json() -> String {
        var parts: [String] = []
        for r in results {
            var s = "{\"location\":" + jsonString(locationNames[r.address] ?? describe(r.address))
            s += ",\"addr\":\"0x\(String(r.address, radix: 16))\",\"when\":\"\(r.timing.rawValue)\",\"item\":" + jsonString(r.item)
            switch r.kind {
            case .count: s += ",\"kind\":\"count\""
            case .log2Histogram: s += ",\"kind\":\"hist\""
            case let .linearHistogram(min, max, step): s += ",\"kind\":\"hist-linear\",\"min\":\(min),\"max\":\(max),\"step\":\(step)"
            }
            s += ",\"hits\":\(r.hits),\"unreadable\":\(r.unreadable)"
            if let why = r.unreadableReason { s += ",\"unreadable_reason\":" + jsonString(why) }
            if r.kind == .count {
                s += ",\"values\":[" + r.values.map { v in
                    "{\"value\":\"0x\(String(v.value, radix: 16))\",\"count\":\(v.count)" + (symbol(v.value).map { ",\"symbol\":" + jsonString($0) } ?? "") + "}"
                }.joined(separator: ",") + "]"
            } else {
                s += ",\"buckets\":[" + r.buckets.map { b in
                    "{\"low\":\"0x\(String(b.low, radix: 16))\",\"high\":" + (b.high.map { "\"0x\(String($0, radix: 16))\"" } ?? "null") + ",\"count\":\(b.count)}"
                }.joined(separator: ",") + "]"
            }
            parts.append(s + "}")
        }
        return "{\"aggregations\":[" + parts.joined(separator: ",") + "]}\n"
    }
}
