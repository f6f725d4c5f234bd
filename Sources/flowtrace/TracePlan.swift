import ArgumentParser
import ELF
import FlowTrace
import FlowTraceGraphs
import Foundation
import KVM
import FlowGraph
import LinuxKernel
import Locking
import Devices
import Machine
import Sys
import TraceSpec

/// A module armed on a machine, with what the report needs.
struct Tracer {
    let module: TraceModule
    /// Aligned with the module's locations.
    let probes: [(Probe, PlannedProbe)]
    let flows: [PlannedFlow]
    let engine: String
}

/// One probe location of the run: a --probe spec, or a block of a --flow graph.
struct PlannedProbe {
    let address: UInt64
    let timing: ProbeTiming
    let items: [ItemSpec]
    /// The summary's name for the location: `fib`, `fib+0x1b`.
    let location: String
    /// For --flow: the block and its role (`0 entry`, `3`, `2 exit`); nil for --probe.
    let block: String?
}

/// A --flow function: its graph and the probes for each role.
struct PlannedFlow {
    let text: String
    let graph: FlowGraph
    /// `graph.probePlacements`, computed once.
    let placements: [FlowProbePlacement]
    let entryItems: [ItemSpec]
    let blockItems: [ItemSpec]
    let exitItems: [ItemSpec]
}

/// Everything the command line asks for, parsed and checked before anything runs.
struct TracePlan {
    /// --probe specs, in order.
    let specs: [(ProbeSpec, PlannedProbe)]
    let flows: [PlannedFlow]
    /// Every location: the --probe specs, then each --flow's blocks.
    let probes: [PlannedProbe]
    /// What the graphs could not fully resolve, printed once the whole command line is valid.
    let warnings: [String]
    let commonItems: [ItemSpec]
    let filters: [FilterSpec]
    let selection: VCPUSelection
    let hits: UInt64
    let maxRecords: Int
    let combination: FilterCombination
    let reverse: Bool
    let format: ReportFormat
    /// --count-by, --hist, --hist-linear: what the module computes instead of records, and
    /// how they are written (json, or tables).
    let aggregations: [Aggregation]
    let aggregationsAsJSON: Bool
    let top: Int
    /// The records are written while the guest runs (jsonl, csv), not after.
    let streams: Bool
    /// nil: stdout. Checked to be writable; opened only to write the records.
    let output: String?
    /// Code probes may use besides the image's (a bzImage's code as loaded): shown as
    /// addresses, never with the vmlinux's symbols.
    let loadedCode: [Range<UInt64>]

    /// `checkCode`: probes must lie in the image's executable segments (payloads; a kernel
    /// maps its code where it wants).
    /// `loadedCode`: more ranges probes may use (a bzImage's protected-mode code as loaded).
    init(command c: RunCommand, image: ELFImage, symbols: Symbolizer, checkCode: Bool = true, patching: LinuxCodePatching? = nil,
         loadedCode: [Range<UInt64>] = []) throws(ExitCode) {
        self.loadedCode = loadedCode
        var specs: [(ProbeSpec, PlannedProbe)] = []
        var warnings: [String] = []
        // The patching engines must keep off code a kernel rewrites; hw and step touch nothing.
        let mayPatch = c.engine != .hw && c.engine != .step
        var byAddress: [UInt64: String] = [:]
        let decoder = X86Decoder()
        let code = ImageCodeSource(image: image)
        for text in c.probeSpecs {
            var spec: ProbeSpec
            do { spec = try ProbeSpec.parse(text, symbols: symbols) } catch {
                throw fail("--probe '\(text)': \(error.message)", status: ExitStatus.usage)
            }
            let inLoadedCode = loadedCode.contains { $0.contains(spec.address) }
            if let patching, !inLoadedCode {
                switch patching.place(spec.address) {
                case .at: break
                case let .afterFentry(address, site):
                    warnings.append("flowtrace: note: --probe '\(text)' goes at \(symbols.describe(address)), just past the ftrace call site at \(symbols.describe(site)) (the kernel rewrites that call); the registers are the entry's")
                    spec.address = address
                    spec.location = symbols.describe(address)
                case let .refused(why):
                    if mayPatch {
                        throw fail("--probe '\(text)': \(hex(spec.address)) (\(symbols.describe(spec.address))): \(why); a trap byte there would make the kernel BUG: probe another instruction, or use --engine hw", status: ExitStatus.usage)
                    }
                }
            }
            guard !checkCode || inLoadedCode || image.segments.contains(where: { $0.isExecutable && $0.range.contains(spec.address) }) else {
                let code = image.segments.filter(\.isExecutable).map { "\(hex($0.range.lowerBound))-\(hex($0.range.upperBound))" }
                    + loadedCode.map { "\(hex($0.lowerBound))-\(hex($0.upperBound)) (the bzImage's code as loaded)" }
                throw fail("--probe '\(text)': \(hex(spec.address)) is not in the guest's code (executable segments: \(code.joined(separator: ", ")))", status: ExitStatus.usage)
            }
            // A trap byte in the middle of an instruction would corrupt it: check the address
            // against the function's instructions (a linear decode from its start).
            if let (f, offset) = symbols.locate(spec.address), f.kind == .function, f.size > 0, offset > 0,
               let i = decoder.instruction(covering: spec.address, sweepingFrom: f.address, source: code), i.address != spec.address {
                throw fail("--probe '\(text)': \(hex(spec.address)) is inside the instruction at \(symbols.describe(i.address)) (\(i.text), \(i.length) bytes); "
                           + "probe \(symbols.describe(i.address)) or \(symbols.describe(i.end))", status: ExitStatus.usage)
            }
            if let other = byAddress[spec.address] {
                throw fail("--probe '\(text)': \(hex(spec.address)) already has \(other); one probe per address: merge their items into one spec", status: ExitStatus.usage)
            }
            byAddress[spec.address] = "--probe '\(text)'"
            specs.append((spec, PlannedProbe(address: spec.address, timing: spec.timing, items: spec.items, location: spec.location,
                                             block: nil)))
        }
        self.specs = specs

        /// `quoting`: the whole option value, when `text` is part of it.
        func items(_ text: String?, option: String, quoting: String? = nil) throws(ExitCode) -> [ItemSpec]? {
            guard let text else { return nil }
            do { return try parseItems(text, symbols: symbols) } catch {
                throw fail("\(option) '\(quoting ?? text)': \(error.message)", status: ExitStatus.usage)
            }
        }
        if c.flowSpecs.isEmpty {
            for (set, option) in [(c.flowEntry != nil, "--flow-entry"), (c.flowExit != nil, "--flow-exit"), (c.splitCalls, "--split-calls")] where set {
                throw fail("\(option) needs --flow (e.g. --flow fib)", status: ExitStatus.usage)
            }
        }
        let entryOverride = try items(c.flowEntry, option: "--flow-entry")
        let exitOverride = try items(c.flowExit, option: "--flow-exit")
        var flows: [PlannedFlow] = []
        var flowProbes: [PlannedProbe] = []
        for text in c.flowSpecs {
            let function = String(text.prefix { $0 != ":" })
            let itemText = function.count < text.count ? String(text.dropFirst(function.count + 1)) : nil
            guard !function.trimmingCharacters(in: .whitespaces).isEmpty else {
                throw fail("--flow '\(text)': expected a function name before the items (e.g. --flow fib:rdi)", status: ExitStatus.usage)
            }
            let blockItems = try items(itemText, option: "--flow", quoting: text) ?? []
            let graph = try buildGraph(function.trimmingCharacters(in: .whitespaces), in: image, splitAtCalls: c.splitCalls, option: "--flow")
            let flow = PlannedFlow(text: text, graph: graph, placements: graph.probePlacements, entryItems: entryOverride ?? blockItems,
                                   blockItems: blockItems, exitItems: exitOverride ?? blockItems)
            let placements = flow.placements
            guard !placements.isEmpty else {
                throw fail("--flow '\(text)': no block of \(graph.name) can be probed (see: flowtrace graph \(c.guest) \(function))", status: ExitStatus.usage)
            }
            for p in placements {
                if mayPatch, let patching, let site = patching.site(containing: p.address) {
                    warnings.append("flowtrace: warning: --flow '\(text)': block \(p.block) at \(hex(p.address)) is in \(site.what), code the kernel rewrites while it runs; not probed")
                    continue
                }
                if let other = byAddress[p.address] {
                    throw fail("--flow '\(text)': block \(p.block) at \(hex(p.address)) already has \(other); one probe per address: drop one of them", status: ExitStatus.usage)
                }
                byAddress[p.address] = "--flow '\(text)' (block \(p.block))"
                let (items, role) = switch p.role {
                case .entry: (flow.entryItems, " entry")
                case .block: (flow.blockItems, "")
                case .exit: (flow.exitItems, " exit")
                }
                flowProbes.append(PlannedProbe(address: p.address, timing: p.timing == .before ? .before : .after, items: items,
                                               location: symbols.describe(p.address), block: "\(p.block)\(role)"))
            }
            for b in graph.blocks {
                if case let .incomplete(reason) = b.end {
                    warnings.append("flowtrace: warning: --flow '\(text)': block \(b.id) at \(hex(b.start)) is incomplete (\(reason))" + (b.instructions.isEmpty ? "; not probed" : "; probed at its first instruction"))
                }
                if let o = b.overlaps {
                    warnings.append("flowtrace: warning: --flow '\(text)': block \(b.id) at \(hex(b.start)) overlaps the instruction at \(hex(o)); not probed")
                }
            }
            for (jump, reason) in graph.unresolvedJumps {
                warnings.append("flowtrace: warning: --flow '\(text)': the indirect jump at \(hex(jump)) has no known targets (\(reason)); blocks only it reaches are not traced")
            }
            flows.append(flow)
        }
        self.flows = flows
        self.warnings = warnings
        probes = specs.map(\.1) + flowProbes

        if let common = c.common {
            do { commonItems = try parseItems(common, symbols: symbols) } catch {
                throw fail("--common '\(common)': \(error.message)", status: ExitStatus.usage)
            }
        } else {
            commonItems = []
        }
        if probes.isEmpty {
            let needing = [c.common != nil ? "--common" : nil, c.filterSpecs.isEmpty ? nil : "--filter",
                           c.hits != 0 ? "--hits" : nil, c.reverse ? "--reverse" : nil, c.format != nil ? "--format" : nil,
                           c.output != nil ? "-o" : nil, c.vcpuSelection != "any" ? "--vcpu" : nil,
                           c.countBy.isEmpty ? nil : "--count-by", c.hist.isEmpty ? nil : "--hist",
                           c.histLinear.isEmpty ? nil : "--hist-linear"].compactMap { $0 }
            if let first = needing.first {
                throw fail("\(first) needs at least one --probe or --flow (e.g. --probe fib:rdi)", status: ExitStatus.usage)
            }
        }
        let probeKeys = Set(probes.flatMap { $0.items.map(\.entry.description) })
        let commonKeys = Set(commonItems.map(\.entry.description))
        var filters: [FilterSpec] = []
        for text in c.filterSpecs {
            do { filters.append(try FilterSpec.parse(text, symbols: symbols, probeItems: probeKeys, commonItems: commonKeys)) } catch {
                throw fail("--filter \(error.message)", status: ExitStatus.usage)
            }
        }
        self.filters = filters
        let v = c.vcpuSelection.trimmingCharacters(in: .whitespaces).lowercased()
        if v == "any" {
            selection = .any
        } else if let id = Int(v), id >= 0 {
            guard id < c.vcpus else {
                throw fail("--vcpu \(c.vcpuSelection): the guest has vCPUs 0 to \(c.vcpus - 1) (--vcpus \(c.vcpus))", status: ExitStatus.usage)
            }
            selection = .only(id)
        } else {
            throw fail("--vcpu '\(c.vcpuSelection)': expected a vCPU id (0 to \(c.vcpus - 1)) or 'any'", status: ExitStatus.usage)
        }
        hits = UInt64(max(0, c.hits))
        combination = c.match
        reverse = c.reverse
        output = c.output
        var aggregations: [Aggregation] = []
        func expression(_ option: String, _ text: String) throws(ExitCode) -> ProbeCondition {
            do { return try parseExpression(text, symbols: symbols) } catch {
                throw fail("\(option) '\(text)': \(error.message)", status: ExitStatus.usage)
            }
        }
        func add(_ option: String, _ text: String, _ e: ProbeCondition, _ kind: Aggregation.Kind, item: String? = nil) throws(ExitCode) {
            let key = (item ?? text).filter { !$0.isWhitespace }
            do { aggregations.append(try Aggregation(item: key, expression: e, kind: kind)) } catch {
                if case let .invalidCondition(_, reason) = error { throw fail("\(option) '\(text)': \(reason)", status: ExitStatus.usage) }
                throw fail("\(option) '\(text)': \(error.description)", status: ExitStatus.usage)
            }
        }
        for t in c.countBy { try add("--count-by", t, try expression("--count-by", t), .count) }
        for t in c.hist { try add("--hist", t, try expression("--hist", t), .log2Histogram) }
        for t in c.histLinear {
            // ITEM:MIN:MAX:STEP, the numbers from the right (ITEM may hold a ':', as in [rdi]:4).
            let parts = t.split(separator: ":", omittingEmptySubsequences: false)
            guard parts.count >= 4 else {
                throw fail("--hist-linear '\(t)': expected ITEM:MIN:MAX:STEP, e.g. rdi:0:100:10", status: ExitStatus.usage)
            }
            let numbers = parts.suffix(3).map { parseNumber($0.trimmingCharacters(in: .whitespaces)) }
            guard let lo = numbers[0], let hi = numbers[1], let step = numbers[2] else {
                let bad = parts.suffix(3).first { parseNumber($0.trimmingCharacters(in: .whitespaces)) == nil } ?? ""
                throw fail("--hist-linear '\(t)': '\(bad)' is not a number (MIN, MAX and STEP: decimal or 0x hex)", status: ExitStatus.usage)
            }
            let item = parts.dropLast(3).joined(separator: ":")
            try add("--hist-linear", t, try expression("--hist-linear", item), .linearHistogram(min: lo, max: hi, step: step), item: item)
        }
        self.aggregations = aggregations
        guard c.top >= 0 else { throw fail("--top \(c.top): must be 0 (all) or more", status: ExitStatus.usage) }
        top = c.top == 0 ? Int.max : c.top
        if !aggregations.isEmpty {
            // The aggregations replace the records: a table, or one JSON document.
            switch c.format {
            case .json?: aggregationsAsJSON = true
            case .table?: aggregationsAsJSON = false
            case let f?: throw fail("--format \(f.rawValue): --count-by and --hist write a table or json", status: ExitStatus.usage)
            case nil: aggregationsAsJSON = c.output.map { $0.lowercased().hasSuffix(".json") } ?? false
            }
            if !c.filterSpecs.isEmpty || c.reverse {
                throw fail("--filter selects records, which --count-by and --hist do not write; put the selection in the probe's condition (--probe 'LOC if EXPR')", status: ExitStatus.usage)
            }
            format = .table
        } else {
            aggregationsAsJSON = false
            if let f = c.format {
                guard let r = f.records else {
                    throw fail("--format json is for --count-by and --hist; records are table, jsonl, csv or chrome", status: ExitStatus.usage)
                }
                format = r
            } else if let o = c.output {
                format = ReportFormat.guess(fromPath: o) ?? .jsonl
            } else {
                format = isTerminal(STDOUT_FILENO) ? .table : .jsonl
            }
        }
        streams = aggregations.isEmpty && ReportWriter.streams(format)
        maxRecords = c.maxRecords ?? (!aggregations.isEmpty ? 1 : streams ? 10_000 : 1_000_000)
        if let o = c.output, !probes.isEmpty {
            do { try ByteSink.checkWritable(o) } catch { throw fail("-o \(error.message)", status: ExitStatus.usage) }
        }
    }

    /// Builds the module and arms it; bad engine choices fail here, before the guest runs.
    func arm(on machine: Machine, engine: EngineRequest) throws(ExitCode) -> Tracer? {
        do {
            // Checked up front so the message names the option even without probes.
            _ = try engine.resolve(locations: max(probes.count, 1), support: machine.engineSupport)
        } catch {
            throw fail(error.description, status: ExitStatus.usage)
        }
        guard !probes.isEmpty else { return nil }
        do {
            let commonProbe = commonItems.isEmpty ? nil : Probe("common", entries: commonItems.map(\.entry))
            let module = try TraceModule(target: machine, vcpus: selection, commonProbe: commonProbe)
            for (spec, _) in specs {
                try module.addProbe(Probe(spec.text, entries: spec.items.map(\.entry)), at: spec.address, timing: spec.timing,
                                    condition: spec.condition)
            }
            for f in flows {
                try module.addFlowGraph(f.graph, entry: Probe("\(f.graph.name) entry", entries: f.entryItems.map(\.entry)),
                                        regular: Probe("\(f.graph.name) block", entries: f.blockItems.map(\.entry)),
                                        exit: Probe("\(f.graph.name) exit", entries: f.exitItems.map(\.entry)))
            }
            let planned = Dictionary(probes.map { ($0.address, $0) }, uniquingKeysWith: { a, _ in a })
            var located: [(Probe, PlannedProbe)] = []
            for l in module.locations {
                guard let p = planned[l.address] else {
                    throw fail("internal error (a bug of flowtrace, please report it): the module has a location at \(hex(l.address)) nobody planned", status: ExitStatus.software)
                }
                located.append((l.probe, p))
            }
            for a in aggregations { try module.addAggregation(a) }
            if streams { module.openStream() }
            try module.enable(hitLimit: hits, maxRecords: maxRecords)
            let chosen = machine.engine.map { "\($0.engine): \($0.reason)" } ?? "none"
            return Tracer(module: module, probes: located, flows: flows, engine: chosen)
        } catch let error as ExitCode {
            throw error
        } catch let error as TraceError {
            // Refusals (capacity, a location that cannot be armed) are input; a KVM call
            // that failed while arming is the host's.
            if case .targetFailure = error { throw fail("host failure: \(error.description)", status: ExitStatus.software) }
            throw fail(error.description, status: ExitStatus.usage)
        } catch {
            throw fail(error.localizedDescription, status: ExitStatus.software)
        }
    }

    /// Writes the aggregations' results (tables or JSON) to `out`; returns how many and the
    /// write error.
    func writeAggregations(_ tracer: Tracer, to out: ByteSink, symbols: Symbolizer) -> (Int, String?) {
        let results = tracer.module.aggregationResults
        let names = Dictionary(tracer.probes.map { ($0.1.address, $0.1.location) }, uniquingKeysWith: { a, _ in a })
        let o = AggregationOutput(results: results, locationNames: names, symbols: symbols, top: top)
        out.write(aggregationsAsJSON ? o.json() : o.text())
        out.flush()
        return (out.error == nil ? results.count : 0, out.error)
    }

    /// Writes the filtered report to `out`; returns how many records it wrote and the
    /// write error, if any.
    func writeReport(_ tracer: Tracer, to out: ByteSink, symbols: Symbolizer, timeOrigin: UInt64, title: String) -> (Int, String?) {
        var report = tracer.module.report()
        if !filters.isEmpty || reverse {
            report = report.filtered(by: filters.map { $0.filter(timeOrigin: timeOrigin) }, combining: combination, reverse: reverse)
        }
        let writer = makeWriter(tracer, symbols: symbols, timeOrigin: timeOrigin, title: title)
        writer.write(report, to: out)
        if let e = out.error { return (0, e) }
        if report.missing > 0 {
            printError("flowtrace: warning: \(report.missing) records could not be copied for the report (out of memory)")
        }
        return (report.count, nil)
    }

    /// Starts writing the records while the guest runs (jsonl, csv) to `sink`: a writer
    /// thread taking the module's stream. nil: not a streamed format.
    func startStream(_ tracer: Tracer, sink: ByteSink, symbols: Symbolizer, timeOrigin: UInt64, title: String,
                     onFailure: @escaping @Sendable (String) -> Void) throws(ExitCode) -> RecordStreamWriter? {
        guard streams else { return nil }
        let filter: (@Sendable (TraceReport) -> TraceReport)?
        if filters.isEmpty && !reverse {
            filter = nil
        } else {
            let f = filters.map { $0.filter(timeOrigin: timeOrigin) }, c = combination, r = reverse
            filter = { $0.filtered(by: f, combining: c, reverse: r) }
        }
        do {
            return try RecordStreamWriter(module: tracer.module, writer: makeWriter(tracer, symbols: symbols, timeOrigin: timeOrigin, title: title),
                                          sink: sink, filter: filter, onFailure: onFailure)
        } catch {
            throw fail("starting the record writer: \(error.description)", status: ExitStatus.software)
        }
    }

    func makeWriter(_ tracer: Tracer, symbols: Symbolizer, timeOrigin: UInt64, title: String) -> ReportWriter {
        var writer = ReportWriter(
            format: format, probes: tracer.probes.map { ($0.0, $0.1.items.map(\.key)) }, commonKeys: commonItems.map(\.key),
            describe: { [loadedCode] a in
                guard !loadedCode.contains(where: { $0.contains(a) }), let (s, off) = symbols.locate(a) else { return hex(a) }
                return "\(s.name)+0x\(String(off, radix: 16))"
            },
            timeOrigin: timeOrigin, title: "flowtrace: \(title)")
        writer.symbolize = { symbols.function(containing: $0) }
        return writer
    }

    /// The summary on stderr. Every figure says what it counts and the totals are the sums
    /// of the rows: HITS the hits delivered at each location while tracing was on; TAKEN
    /// (streamed formats) the records taken there, every one handed to the writer; KEPT and
    /// EVICTED (table, chrome) the records in memory at the end and those pushed out by
    /// --max-records; no record columns for aggregations. `outcome`: where the records went.
    func summary(_ tracer: Tracer, written: Int, outcome: String, elapsed: Double, stepOvers: (outOfLine: UInt64, inPlace: UInt64)) -> String {
        let c = tracer.module.counters
        let withBlocks = !tracer.flows.isEmpty
        let withConditions = tracer.module.locations.contains { $0.condition != nil }
        let recordColumns: [String] = !aggregations.isEmpty ? [] : streams ? ["TAKEN"] : ["KEPT", "EVICTED"]
        var rows = [["LOCATION"] + (withBlocks ? ["BLOCK"] : []) + ["WHEN", "HITS"] + (withConditions ? ["FILTERED"] : []) + recordColumns + ["SUPPRESSED"]]
        for (l, (_, planned)) in zip(c.locations, tracer.probes) {
            let records = !aggregations.isEmpty ? [] : streams ? ["\(l.taken)"] : ["\(l.kept)", "\(l.evicted)"]
            rows.append([planned.location] + (withBlocks ? [planned.block ?? "-"] : [])
                        + [l.timing.rawValue, "\(l.hits)"] + (withConditions ? ["\(l.filtered)"] : [])
                        + records + ["\(l.suppressed)"])
        }
        // The rows' sum; hits after tracing stopped (--hits reached while other vCPUs were
        // still at the probes) belong to no row and are said apart.
        let hits = c.locations.reduce(0) { $0 + $1.hits }
        let rate = elapsed > 0 ? Double(hits) / elapsed : 0
        var lines = ["flowtrace: engine \(tracer.engine)"]
        let firstNumber = withBlocks ? 3 : 2
        lines.append(table(rows, rightAligned: Set(firstNumber..<rows[0].count)))
        for f in tracer.flows {
            // Entry hits are calls and exit hits returns, whatever the records kept.
            var entries: UInt64 = 0, exits: UInt64 = 0
            let placements = f.placements
            let roles = Dictionary(placements.map { ($0.address, $0.role) }, uniquingKeysWith: { a, _ in a })
            for l in c.locations {
                switch roles[l.address] {
                case .entry?: entries += l.hits
                case .exit?: exits += l.hits
                default: break
                }
            }
            let probed = Set(placements.map(\.block)).count
            var line = "flowtrace: --flow \(f.graph.name): \(f.graph.blocks.count) blocks (\(probed) probed), entered \(entries) times, left through exit blocks \(exits) times"
            if let e = f.graph.entryBlock, f.graph.edges.contains(where: { $0.successor.block == e.id }) {
                line += " (the entry block is also a loop head: its hits count the iterations too)"
            }
            lines.append(line)
        }
        var total = "flowtrace: \(hits) hits (\(formatRate(rate)) hits/s)"
        if !aggregations.isEmpty {
            total += ", \(c.recordsTaken) aggregated"
        } else if streams {
            total += ", \(c.recordsTaken) records taken"
        } else {
            total += ", \(c.recordsTaken) records taken, \(c.recordsKept) kept"
            if c.evicted > 0 { total += ", \(c.evicted) evicted (raise --max-records to keep them)" }
        }
        if c.recordsLost > 0 { total += ", \(c.recordsLost) lost (no memory for them; lower --max-records)" }
        if c.filteredAtHit > 0 { total += ", \(c.filteredAtHit) filtered at the hit by their condition" }
        if c.suppressedOverLimit > 0 { total += ", \(c.suppressedOverLimit) over --hits \(self.hits)" }
        if c.suppressedWrongVCPU > 0 { total += ", \(c.suppressedWrongVCPU) on other vCPUs than --vcpu" }
        lines.append(total)
        if c.suppressedDisabled > 0 {
            lines.append("flowtrace: \(c.suppressedDisabled) more hit\(c.suppressedDisabled == 1 ? "" : "s") after tracing stopped (--hits reached while other vCPUs were at a probe; in no row)")
        }
        for (l, (_, planned)) in zip(c.locations, tracer.probes) where l.conditionUnreadable > 0 {
            lines.append("flowtrace: \(planned.location): the condition could not be evaluated at \(l.conditionUnreadable) hit\(l.conditionUnreadable == 1 ? "" : "s") (counted as false): \(l.conditionUnreadableReason ?? "unknown reason")")
        }
        if stepOvers.inPlace > 0 {
            // Worth knowing on several vCPUs: each in-place step held the others.
            lines.append("flowtrace: \(stepOvers.inPlace) of \(stepOvers.inPlace + stepOvers.outOfLine) step-overs in place (the other vCPUs held for each): "
                         + "their instructions depend on where they run, or the guest left the boot page tables or rewrote them")
        }
        if !aggregations.isEmpty {
            lines.append("flowtrace: \(outcome) (\(aggregations.count) aggregation\(aggregations.count == 1 ? "" : "s") x \(c.locations.count) location\(c.locations.count == 1 ? "" : "s"), \(aggregationsAsJSON ? "json" : "table")); no records")
            return lines.joined(separator: "\n")
        }
        lines.append("flowtrace: \(outcome) (\(format.rawValue)\(streams ? ", while the guest ran" : ""))"
                     + (filters.isEmpty && !reverse ? "" : " after --filter (\(filters.count) filter\(filters.count == 1 ? "" : "s"), --match \(combination.rawValue)\(reverse ? ", --reverse" : ""))"))
        return lines.joined(separator: "\n")
    }
}
