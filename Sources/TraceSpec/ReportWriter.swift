#if canImport(Glibc)
import Glibc
#endif
import FlowTrace
@_exported import struct Sys.SystemError
@_exported import class Sys.ByteSink

/// Output formats of `flowtrace run`.
public enum ReportFormat: String, Sendable, CaseIterable {
    /// Aligned columns, for people.
    case table
    /// One JSON object per record.
    case jsonl
    /// One row per record, one column per item.
    case csv
    /// Chrome trace-event JSON (Perfetto UI, chrome://tracing).
    case chrome

    /// The format a file name's extension suggests, if any.
    public static func guess(fromPath path: String) -> ReportFormat? {
        let lower = path.lowercased()
        if lower.hasSuffix(".jsonl") || lower.hasSuffix(".ndjson") { return .jsonl }
        if lower.hasSuffix(".csv") { return .csv }
        if lower.hasSuffix(".json") { return .chrome }
        if lower.hasSuffix(".txt") { return .table }
        return nil
    }
}

/// Writes reports in every `ReportFormat`. Item keys are the text the user wrote.
public struct ReportWriter {
    public var format: ReportFormat
    /// Each probe's item keys, aligned with its entries.
    public let keys: [ObjectIdentifier: [String]]
    /// Item columns (CSV, table): every probe key in order of first appearance.
    private let columns: [String]
    public var commonKeys: [String]
    /// Symbolizes a probe address (`fib+0x0`).
    public var describe: (UInt64) -> String
    /// CLOCK_MONOTONIC ns at the run's start: `ts_ns` counts from it.
    public var timeOrigin: UInt64
    /// Shown as the process name in the Chrome format.
    public var title: String
    /// `name+0xoff` for a value that lies in a known function (nil: it does not). Applied to
    /// 64-bit register values and 8-byte memory items: the table shows it beside the value,
    /// jsonl adds `"symbols":{"ITEM":"name+0xoff"}` for the items that have one.
    public var symbolize: ((UInt64) -> String?)?

    /// `probes` in the order the user gave them, each with its item keys.
    public init(format: ReportFormat, probes: [(Probe, [String])], commonKeys: [String],
                describe: @escaping (UInt64) -> String, timeOrigin: UInt64, title: String) {
        self.format = format
        self.keys = Dictionary(probes.map { (ObjectIdentifier($0.0), $0.1) }, uniquingKeysWith: { a, _ in a })
        var seen = Set<String>(), list: [String] = []
        for k in probes.flatMap(\.1) where seen.insert(k).inserted { list.append(k) }
        self.columns = list
        self.commonKeys = commonKeys
        self.describe = describe; self.timeOrigin = timeOrigin; self.title = title
    }

    public func write(_ report: TraceReport, to sink: ByteSink) {
        switch format {
        case .jsonl: writeJSONL(report, sink)
        case .csv:
            writeCSVHeader(sink)
            writeCSV(report, sink)
        case .table: writeTable(report, sink)
        case .chrome: writeChrome(report, sink)
        }
        sink.flush()
    }

    /// Whether the format can be written record by record while a run goes on (jsonl, csv:
    /// `begin`, then `append` per batch); table (column widths) and chrome (one JSON
    /// document) need every record first.
    public static func streams(_ format: ReportFormat) -> Bool { format == .jsonl || format == .csv }

    /// Starts a streamed report (the CSV header).
    public func begin(_ sink: ByteSink) {
        if format == .csv { writeCSVHeader(sink) }
    }

    /// Writes one batch of a streamed report (jsonl or csv rows) and flushes it. table and
    /// chrome have no streamed form: for them a batch is written as a whole report.
    /// `recordEnds` gets the sink's `bytesAccepted` after each record (jsonl, csv), so a
    /// caller whose write failed knows how many whole records reached the output.
    public func append(_ report: TraceReport, to sink: ByteSink, recordEnds: ((Int) -> Void)? = nil) {
        switch format {
        case .jsonl: writeJSONL(report, sink, recordEnds)
        case .csv: writeCSV(report, sink, recordEnds)
        case .table, .chrome: write(report, to: sink)
        }
        sink.flush()
    }

    private func keys(of record: TraceRecord) -> [String] {
        keys[ObjectIdentifier(record.probe)] ?? record.entries.map(\.description)
    }

    /// The record's values as shown: memory items of 1, 2, 4 or 8 bytes (`caller` too: 8
    /// bytes at rsp) as the little-endian number they hold, unless the item asks for its
    /// `:bytes`.
    private func values(of r: TraceRecord) -> [ProbeValue] { Self.shown(keys(of: r), r.values) }

    /// Whether an item key asks for raw bytes (`[rsp]:8:bytes`).
    public static func isBytesForm(_ key: String) -> Bool { key.hasSuffix(":bytes") }

    public static func shown(_ keys: [String], _ values: [ProbeValue]) -> [ProbeValue] {
        zip(keys, values).map { k, v in
            guard case let .memory(_, bytes) = v, !isBytesForm(k) else { return v }
            let n = bytes.enumerated().reduce(UInt64(0)) { $0 | UInt64($1.element) << (8 * UInt64($1.offset)) }
            switch bytes.count {
            case 1: return .register(.u8(UInt8(n)))
            case 2: return .register(.u16(UInt16(n)))
            case 4: return .register(.u32(UInt32(n)))
            case 8: return .register(.u64(n))
            default: return v
            }
        } + values.dropFirst(keys.count)
    }

    private func relative(_ ts: UInt64) -> UInt64 { ts >= timeOrigin ? ts - timeOrigin : 0 }

    // MARK: JSON Lines

    private func writeJSONL(_ report: TraceReport, _ sink: ByteSink, _ recordEnds: ((Int) -> Void)? = nil) {
        for r in report {
            var s = "{\"seq\":\(r.sequence),\"ts_ns\":\(relative(r.timestamp)),\"vcpu\":\(r.vcpu),\"addr\":\"0x\(String(r.address, radix: 16))\","
            s += "\"location\":\(jsonString(describe(r.address))),\"when\":\"\(r.timing.rawValue)\",\"values\":"
            s += jsonObject(keys(of: r), values(of: r))
            s += ",\"common\":" + jsonObject(commonKeys, Self.shown(commonKeys, r.commonValues))
            if symbolize != nil {
                var named = ""
                for (k, v) in zip(keys(of: r), values(of: r)) {
                    guard let n = symbol(v) else { continue }
                    named += (named.isEmpty ? "" : ",") + jsonString(k) + ":" + jsonString(n)
                }
                if !named.isEmpty { s += ",\"symbols\":{" + named + "}" }
            }
            s += "}\n"
            sink.write(s)
            recordEnds?(sink.bytesAccepted)
        }
    }

    /// The symbol a pointer-sized value points into.
    private func symbol(_ v: ProbeValue) -> String? {
        guard let symbolize else { return nil }
        switch v {
        case let .register(.u64(x)): return symbolize(x)
        case let .memory(_, bytes) where bytes.count == 8: return symbolize(bytes.enumerated().reduce(0) { $0 | UInt64($1.element) << (8 * UInt64($1.offset)) })
        default: return nil
        }
    }

    private func jsonObject(_ keys: [String], _ values: [ProbeValue]) -> String {
        var s = "{"
        for (i, v) in values.enumerated() {
            if case .none = v { continue }
            if s.count > 1 { s += "," }
            s += jsonString(i < keys.count ? keys[i] : "item\(i)") + ":" + Self.json(v)
        }
        return s + "}"
    }

    /// A value as JSON: `"0x..."`, `"a0b1..."`, `{"base":..,"limit":..}`, `{"error":..}`.
    public static func json(_ v: ProbeValue) -> String {
        switch v {
        case let .register(.descriptorTable(base, limit)):
            return "{\"base\":\"0x\(String(base, radix: 16))\",\"limit\":\"0x\(String(limit, radix: 16))\"}"
        case let .register(r): return "\"\(r.description)\""
        case let .memory(_, bytes): return "\"\(hexBytes(bytes))\""
        case let .unreadable(reason): return "{\"error\":\(jsonString(reason))}"
        case .none: return "null"
        }
    }

    // MARK: CSV

    /// The last column, `symbols`, holds `ITEM=name+0xoff` for each value that lies in a
    /// known function (space-separated), as jsonl's `symbols` object; value cells hold the
    /// value only.
    private func writeCSVHeader(_ sink: ByteSink) {
        let header = ["seq", "ts_ns", "vcpu", "addr", "location", "when"] + columns + commonKeys.map { "common:" + $0 }
            + (symbolize != nil ? ["symbols"] : [])
        sink.write(header.map(csvField).joined(separator: ",") + "\n")
    }

    private func writeCSV(_ report: TraceReport, _ sink: ByteSink, _ recordEnds: ((Int) -> Void)? = nil) {
        let cols = columns
        let position = Dictionary(cols.enumerated().map { ($1, $0) }, uniquingKeysWith: { a, _ in a })
        for r in report {
            var cells = [String](repeating: "", count: cols.count)
            var named: [String] = []
            for (k, v) in zip(keys(of: r), values(of: r)) {
                if let p = position[k] { cells[p] = Self.text(v) }
                if let n = symbol(v) { named.append("\(k)=\(n)") }
            }
            let fixed = ["\(r.sequence)", "\(relative(r.timestamp))", "\(r.vcpu)", "0x" + String(r.address, radix: 16), describe(r.address), r.timing.rawValue]
            let symbolCell = symbolize != nil ? [named.joined(separator: " ")] : []
            sink.write((fixed + cells + Self.shown(commonKeys, r.commonValues).map(Self.text) + symbolCell).map(csvField).joined(separator: ",") + "\n")
            recordEnds?(sink.bytesAccepted)
        }
    }

    /// A value as plain text (CSV, table).
    public static func text(_ v: ProbeValue) -> String {
        switch v {
        case let .register(.descriptorTable(base, limit)): "base=0x\(String(base, radix: 16)) limit=0x\(String(limit, radix: 16))"
        case let .register(r): r.description
        case let .memory(_, bytes): hexBytes(bytes)
        case let .unreadable(reason): "error: " + reason
        case .none: ""
        }
    }

    private func csvField(_ s: String) -> String {
        guard s.contains(where: { $0 == "," || $0 == "\"" || $0 == "\n" || $0 == "\r" }) else { return s }
        return "\"" + s.replacingOccurrences(of: "\"", with: "\"\"") + "\""
    }

    // MARK: Table

    private func writeTable(_ report: TraceReport, _ sink: ByteSink) {
        let cols = columns
        let header = ["SEQ", "TIME_US", "VCPU", "LOCATION", "WHEN"] + cols + commonKeys.map { "common:" + $0 }
        let position = Dictionary(cols.enumerated().map { ($1, $0) }, uniquingKeysWith: { a, _ in a })
        var rows: [[String]] = [header]
        rows.reserveCapacity(report.count + 1)
        for r in report {
            var cells = [String](repeating: "-", count: cols.count)
            for (k, v) in zip(keys(of: r), values(of: r)) { if let p = position[k] { cells[p] = Self.text(v) + (symbol(v).map { " <\($0)>" } ?? "") } }
            let us = relative(r.timestamp)
            let time = "\(us / 1000).\(String(us % 1000 + 1000).dropFirst())"
            rows.append(["\(r.sequence)", time, "\(r.vcpu)", describe(r.address), r.timing.rawValue] + cells + Self.shown(commonKeys, r.commonValues).map(Self.text))
        }
        var widths = [Int](repeating: 0, count: header.count)
        for row in rows { for (i, c) in row.enumerated() where i < widths.count { widths[i] = max(widths[i], c.count) } }
        for row in rows {
            var line = ""
            for (i, c) in row.enumerated() {
                // Numbers right-aligned, text left-aligned; no padding after the last column.
                let pad = String(repeating: " ", count: max(0, widths[min(i, widths.count - 1)] - c.count))
                if i > 0 { line += "  " }
                if i <= 2 { line += pad + c } else { line += c + (i == row.count - 1 ? "" : pad) }
            }
            sink.write(line + "\n")
        }
        if report.isEmpty { sink.write("(no records)\n") }
    }

    // MARK: Chrome trace events

    private func writeChrome(_ report: TraceReport, _ sink: ByteSink) {
        sink.write("{\"displayTimeUnit\":\"ns\",\"traceEvents\":[\n")
        sink.write("{\"name\":\"process_name\",\"ph\":\"M\",\"pid\":1,\"tid\":0,\"args\":{\"name\":\(jsonString(title))}}")
        var vcpus = Set<Int>()
        for r in report { vcpus.insert(r.vcpu) }
        for v in vcpus.sorted() {
            sink.write(",\n{\"name\":\"thread_name\",\"ph\":\"M\",\"pid\":1,\"tid\":\(v),\"args\":{\"name\":\"vCPU \(v)\"}}")
        }
        for r in report {
            let ns = relative(r.timestamp)
            var s = ",\n{\"name\":\(jsonString(describe(r.address))),\"cat\":\"\(r.timing.rawValue)\",\"ph\":\"i\",\"s\":\"t\","
            s += "\"ts\":\(ns / 1000).\(String(ns % 1000 + 1000).dropFirst()),\"pid\":1,\"tid\":\(r.vcpu),"
            s += "\"args\":{\"seq\":\(r.sequence),\"addr\":\"0x\(String(r.address, radix: 16))\",\"values\":\(jsonObject(keys(of: r), values(of: r)))"
            if !commonKeys.isEmpty { s += ",\"common\":" + jsonObject(commonKeys, Self.shown(commonKeys, r.commonValues)) }
            s += "}}"
            sink.write(s)
        }
        sink.write("\n]}\n")
    }
}

/// Lower-case hex, two digits a byte.
public func hexBytes(_ bytes: [UInt8]) -> String {
    let digits = Array("0123456789abcdef".utf8)
    var out = [UInt8]()
    out.reserveCapacity(bytes.count * 2)
    for b in bytes { out.append(digits[Int(b >> 4)]); out.append(digits[Int(b & 15)]) }
    return String(decoding: out, as: UTF8.self)
}

/// A JSON string literal with the required escapes.
public func jsonString(_ s: String) -> String {
    var out = "\""
    for u in s.unicodeScalars {
        switch u {
        case "\"": out += "\\\""
        case "\\": out += "\\\\"
        case "\n": out += "\\n"
        case "\r": out += "\\r"
        case "\t": out += "\\t"
        default:
            if u.value < 0x20 {
                out += "\\u" + String(String(u.value + 0x10000, radix: 16).dropFirst())
            } else {
                out.unicodeScalars.append(u)
            }
        }
    }
    return out + "\""
}
