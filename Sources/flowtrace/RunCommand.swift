import ArgumentParser
import ELF
import FlowTrace
import Foundation
import KVM
import Machine
import TraceSpec

enum EngineOption: String, ExpressibleByArgument, CaseIterable {
    case auto, int3, hlt, hw, step

    var request: EngineRequest {
        switch self {
        case .auto: .auto
        case .int3: .engine(.int3)
        case .hlt: .engine(.hlt)
        case .hw: .engine(.hw)
        case .step: .engine(.step)
        }
    }
}

extension FilterCombination: ExpressibleByArgument {}
extension ReportFormat: ExpressibleByArgument {}

struct RunCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "run",
        abstract: "Boot an ELF guest, run it to the end, and trace it with probes.",
        discussion: """
        PROBE SPECS: LOCATION[@before|@after][:ITEM[,ITEM...]]
          LOCATION  symbol, symbol+0xOFF, symbol+DEC, or an address 0x...
          @before   record before the instruction at LOCATION runs (default);
          @after    record after it ran (the engine single-steps it first)
          ITEM      a register (rdi, eax, ah, xmm0, rip, rflags, cr3, gdtr, ...), or memory
                    [EXPR] or [EXPR]:SIZE (SIZE 1-4096 bytes, default 8); EXPR is BASE,
                    BASE+INDEX*SCALE, each with an optional +DISP/-DISP; BASE is a register,
                    a constant or a symbol; SCALE is 1, 2, 4 or 8
          Examples: --probe fib:rdi   --probe 'fib@after:rax'   --probe 'element:[rdi+rsi*8]:8,rsi'
                    --probe '0x100000:rip,[rsp]:8' --common cr3
        FILTERS (--filter, repeatable, combined by --match all|any; --reverse keeps the rest):
          seq=A..B  ts=A..B (ns since the start; us/ms/s suffixes)  vcpu=A..B  addr=SYMBOL
          addr=A..B  value:ITEM=V  common:ITEM=V (V: a number for a register, hex bytes for memory)
          Ranges may leave out an end (seq=100..) or be one number (vcpu=1).
        OUTPUT: the records go to stdout, or -o FILE, after the run: --format table (default on
        a terminal), jsonl (default otherwise; for -o, the file's extension .jsonl/.csv/.json/.txt
        picks it), csv, chrome (Chrome trace-event JSON for Perfetto UI). While records go to
        stdout the guest's console goes to stderr. A summary per location goes to stderr.
        EXIT STATUS: the guest's own (port 0xF4, or 0 when every vCPU halted), 64 bad input,
        69 KVM unavailable, 70 guest fault, 74 the report could not be written, 124 timeout,
        130 interrupted. Records taken before a fault, a timeout or Ctrl-C are still written.
        """
    )

    @Argument(help: "A static x86-64 ELF executable (e.g. guests/build/fib.elf).")
    var guest: String

    @Option(help: "Number of vCPUs; each starts at the entry with its index in rdi.")
    var vcpus: Int = 1

    @Option(help: "Guest RAM: bytes or a K/M/G suffix, a multiple of 2M.")
    var memory: String = "64M"

    @Option(help: "Stop the guest after this many seconds (exit status 124).")
    var timeout: Double?

    @Option(help: "Breakpoint engine: auto picks the fastest that works here for the probe count.")
    var engine: EngineOption = .auto

    @Option(name: .customLong("vcpu"), help: ArgumentHelp("Trace only this vCPU, or any.", valueName: "id|any"))
    var vcpuSelection: String = "any"

    @Option(help: "Take at most this many records, then stop tracing (0: no limit).")
    var hits: UInt64 = 0

    @Option(name: .customLong("max-records"), help: "Keep at most this many records; beyond it the oldest are evicted (0: no limit).")
    var maxRecords: Int = 1_000_000

    @Option(name: .customLong("probe"), help: ArgumentHelp("A probe (repeatable); see PROBE SPECS.", valueName: "spec"))
    var probeSpecs: [String] = []

    @Option(help: ArgumentHelp("Items collected at every probe, comma-separated.", valueName: "items"))
    var common: String?

    @Option(name: .customLong("filter"), help: ArgumentHelp("Select records (repeatable); see FILTERS.", valueName: "filter"))
    var filterSpecs: [String] = []

    @Option(help: "How several filters combine.")
    var match: FilterCombination = .all

    @Flag(help: "Write the records the filters do not select instead.")
    var reverse = false

    @Option(help: "Report format: table, jsonl, csv or chrome.")
    var format: ReportFormat?

    @Option(name: .short, help: ArgumentHelp("Write the records to this file instead of stdout.", valueName: "file"))
    var output: String?

    func run() throws {
        let memorySize: UInt64
        do { memorySize = try parseMemorySize(memory) } catch { throw fail(error.description, status: ExitStatus.usage) }
        if let t = timeout, !(t > 0 && t.isFinite) {
            throw fail("--timeout \(t): must be a positive number of seconds", status: ExitStatus.usage)
        }
        guard maxRecords >= 0 else { throw fail("--max-records \(maxRecords): must be 0 (no limit) or more", status: ExitStatus.usage) }
        // The image is checked first so a bad file is reported as such even without KVM.
        let image: ELFImage
        do { image = try ELFImage(path: guest) } catch { throw fail(error.description, status: ExitStatus.usage) }
        let symbols = Symbolizer(image: image)
        let plan = try TracePlan(command: self, image: image, symbols: symbols)

        let host: KVMHost
        do { host = try KVMHost(path: kvmDevicePath) } catch { throw fail(error.description, status: ExitStatus.unavailable) }
        let machine: Machine
        do {
            machine = try Machine(image: image, configuration: MachineConfiguration(vcpuCount: vcpus, memorySize: memorySize, engine: engine.request), host: host)
        } catch {
            if case .kvm = error { throw fail(error.description, status: ExitStatus.unavailable) }
            throw fail(error.description, status: ExitStatus.usage)
        }
        let tracer = try plan.arm(on: machine, engine: engine.request)

        // Ctrl-C stops every vCPU; what the run produced is still reported.
        signal(SIGINT, SIG_IGN)
        let interrupt = DispatchSource.makeSignalSource(signal: SIGINT, queue: .global())
        interrupt.setEventHandler { machine.stop() }
        interrupt.resume()
        defer { interrupt.cancel() }

        let progress = tracer.flatMap { ProgressLine(module: $0.module) }
        let consoleToStderr = tracer != nil && plan.output == nil
        var result: RunResult
        let origin = monotonicNow()
        do {
            result = try machine.run(timeout: timeout.map { .milliseconds(Int64($0 * 1000)) }) { line in
                if let progress {
                    progress.printAbove(line.text, toStdout: !consoleToStderr)
                } else if consoleToStderr {
                    printError(line.text)
                } else {
                    printOut(line.text)
                }
            }
            // No debugger to hand a halt to: report it and go on.
            while case let .halted(stop) = result.ending {
                printError("flowtrace: halt on vCPU \(stop.vcpu) at \(stop.location); resuming")
                result = try machine.resume()
            }
        } catch {
            progress?.finish()
            throw fail(error.description, status: ExitStatus.usage)
        }
        progress?.finish()

        // Records first, whatever the ending, then the summary, then the status.
        var writeFailure: String?
        var written = 0
        if let tracer {
            if tracer.module.state == .enabled {
                do { try tracer.module.disable() } catch { printError("flowtrace: warning: \(error.description)") }
            }
            (written, writeFailure) = plan.writeReport(tracer, symbols: symbols, timeOrigin: origin, title: (guest as NSString).lastPathComponent)
        }
        let name = (guest as NSString).lastPathComponent
        let elapsed = Double(result.elapsed.components.seconds) + Double(result.elapsed.components.attoseconds) / 1e18
        let seconds = String(format: "%.3f s", elapsed)
        let cpus = "\(vcpus) vCPU\(vcpus == 1 ? "" : "s")"
        if let tracer { printError(plan.summary(tracer, written: written, elapsed: elapsed)) }
        if let writeFailure { printError("flowtrace: error: \(writeFailure)") }
        switch result.ending {
        case let .exited(status):
            printError("flowtrace: \(name): guest exited with status \(status) after \(seconds) (\(cpus))")
            if writeFailure != nil { throw ExitCode(ExitStatus.ioError) }
            if status != 0 { throw ExitCode(Int32(truncatingIfNeeded: status & 0xFF == 0 ? 1 : status & 0xFF)) }
        case let .fault(f):
            printError("flowtrace: \(name): \(f.description) after \(seconds)")
            printError(f.registerDump)
            throw ExitCode(ExitStatus.guestFault)
        case .timedOut:
            printError("flowtrace: \(name): timed out after \(seconds) (--timeout \(timeout ?? 0)); every vCPU was stopped")
            throw ExitCode(ExitStatus.timeout)
        case .halted:
            break
        case .stopped:
            printError("flowtrace: \(name): interrupted after \(seconds); every vCPU was stopped")
            throw ExitCode(ExitStatus.interrupted)
        }
    }
}

/// A module armed on a machine, with what the report needs.
struct Tracer {
    let module: TraceModule
    let probes: [(Probe, ProbeSpec)]
    let engine: String
}

/// Everything the command line asks for, parsed and checked before anything runs.
struct TracePlan {
    let specs: [ProbeSpec]
    let commonItems: [ItemSpec]
    let filters: [FilterSpec]
    let selection: VCPUSelection
    let hits: UInt64
    let maxRecords: Int
    let combination: FilterCombination
    let reverse: Bool
    let format: ReportFormat
    /// nil: stdout.
    let output: String?
    let sink: ByteSink?

    init(command c: RunCommand, image: ELFImage, symbols: Symbolizer) throws(ExitCode) {
        var specs: [ProbeSpec] = []
        var byAddress: [UInt64: String] = [:]
        for text in c.probeSpecs {
            let spec: ProbeSpec
            do { spec = try ProbeSpec.parse(text, symbols: symbols) } catch {
                throw fail("--probe '\(text)': \(error.message)", status: ExitStatus.usage)
            }
            guard image.segments.contains(where: { $0.isExecutable && $0.range.contains(spec.address) }) else {
                let code = image.segments.filter(\.isExecutable).map { "\(hex($0.range.lowerBound))-\(hex($0.range.upperBound))" }
                throw fail("--probe '\(text)': \(hex(spec.address)) is not in the guest's code (executable segments: \(code.joined(separator: ", ")))", status: ExitStatus.usage)
            }
            if let other = byAddress[spec.address] {
                throw fail("--probe '\(text)': \(hex(spec.address)) already has --probe '\(other)'; one probe per address: merge their items into one spec", status: ExitStatus.usage)
            }
            byAddress[spec.address] = text
            specs.append(spec)
        }
        self.specs = specs
        if let common = c.common {
            do { commonItems = try parseItems(common, symbols: symbols) } catch {
                throw fail("--common '\(common)': \(error.message)", status: ExitStatus.usage)
            }
        } else {
            commonItems = []
        }
        if specs.isEmpty {
            let needing = [c.common != nil ? "--common" : nil, c.filterSpecs.isEmpty ? nil : "--filter",
                           c.hits != 0 ? "--hits" : nil, c.reverse ? "--reverse" : nil, c.format != nil ? "--format" : nil,
                           c.output != nil ? "-o" : nil, c.vcpuSelection != "any" ? "--vcpu" : nil].compactMap { $0 }
            if let first = needing.first {
                throw fail("\(first) needs at least one --probe (e.g. --probe fib:rdi)", status: ExitStatus.usage)
            }
        }
        let probeKeys = Set(specs.flatMap { $0.items.map(\.entry.description) })
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
        hits = c.hits
        maxRecords = c.maxRecords
        combination = c.match
        reverse = c.reverse
        output = c.output
        if let f = c.format {
            format = f
        } else if let o = c.output {
            format = ReportFormat.guess(fromPath: o) ?? .jsonl
        } else {
            format = isatty(STDOUT_FILENO) == 1 ? .table : .jsonl
        }
        if let o = c.output, !specs.isEmpty {
            do { sink = try ByteSink(path: o) } catch { throw fail("-o \(error.message)", status: ExitStatus.usage) }
        } else {
            sink = nil
        }
    }

    /// Builds the module and arms it; bad engine choices fail here, before the guest runs.
    func arm(on machine: Machine, engine: EngineRequest) throws(ExitCode) -> Tracer? {
        do {
            // Checked up front so the message names the option even without probes.
            _ = try engine.resolve(locations: max(specs.count, 1), support: machine.engineSupport)
        } catch {
            throw fail(error.description, status: ExitStatus.usage)
        }
        guard !specs.isEmpty else { return nil }
        do {
            let commonProbe = commonItems.isEmpty ? nil : Probe("common", entries: commonItems.map(\.entry))
            let module = try TraceModule(target: machine, vcpus: selection, commonProbe: commonProbe)
            var probes: [(Probe, ProbeSpec)] = []
            for spec in specs {
                let probe = Probe(spec.text, entries: spec.items.map(\.entry))
                try module.addProbe(probe, at: spec.address, timing: spec.timing)
                probes.append((probe, spec))
            }
            try module.enable(hitLimit: hits, maxRecords: maxRecords)
            let chosen = machine.engine.map { "\($0.engine): \($0.reason)" } ?? "none"
            return Tracer(module: module, probes: probes, engine: chosen)
        } catch {
            throw fail(error.description, status: ExitStatus.usage)
        }
    }

    /// Writes the filtered report; returns how many records it wrote and the write error, if any.
    func writeReport(_ tracer: Tracer, symbols: Symbolizer, timeOrigin: UInt64, title: String) -> (Int, String?) {
        var report = tracer.module.report()
        if !filters.isEmpty || reverse {
            report = report.filtered(by: filters.map { $0.filter(timeOrigin: timeOrigin) }, combining: combination, reverse: reverse)
        }
        let writer = ReportWriter(
            format: format, probes: tracer.probes.map { ($0.0, $0.1.items.map(\.key)) }, commonKeys: commonItems.map(\.key),
            describe: { a in
                guard let (s, off) = symbols.locate(a) else { return hex(a) }
                return "\(s.name)+0x\(String(off, radix: 16))"
            },
            timeOrigin: timeOrigin, title: "flowtrace: \(title)")
        let out = sink ?? ByteSink(fd: STDOUT_FILENO)
        writer.write(report, to: out)
        if let e = out.error { return (report.count, "writing the records to \(output ?? "stdout"): \(e)") }
        return (report.count, nil)
    }

    func summary(_ tracer: Tracer, written: Int, elapsed: Double) -> String {
        let c = tracer.module.counters
        var rows = [["LOCATION", "WHEN", "HITS", "KEPT", "EVICTED", "SUPPRESSED"]]
        for (l, (_, spec)) in zip(c.locations, tracer.probes) {
            rows.append([spec.location, l.timing.rawValue, "\(l.hits)", "\(l.kept)", "\(l.evicted)", "\(l.suppressed)"])
        }
        let rate = elapsed > 0 ? Double(c.hitsSeen) / elapsed : 0
        var lines = ["flowtrace: engine \(tracer.engine)"]
        lines.append(table(rows, rightAligned: [2, 3, 4, 5]))
        var total = "flowtrace: \(c.hitsSeen) hits (\(formatRate(rate)) hits/s), \(c.recordsTaken) records taken, \(c.recordsKept) kept"
        if c.evicted > 0 { total += ", \(c.evicted) evicted (raise --max-records to keep them)" }
        if c.suppressedOverLimit > 0 { total += ", \(c.suppressedOverLimit) over --hits \(hits)" }
        if c.suppressedWrongVCPU > 0 { total += ", \(c.suppressedWrongVCPU) on other vCPUs than --vcpu" }
        lines.append(total)
        lines.append("flowtrace: \(written) records written to \(output ?? "stdout") (\(format.rawValue))"
                     + (filters.isEmpty && !reverse ? "" : " after --filter (\(filters.count) filter\(filters.count == 1 ? "" : "s"), --match \(combination.rawValue)\(reverse ? ", --reverse" : ""))"))
        return lines.joined(separator: "\n")
    }
}

func formatRate(_ r: Double) -> String {
    if r >= 1e6 { return String(format: "%.2fM", r / 1e6) }
    if r >= 1e3 { return String(format: "%.1fk", r / 1e3) }
    return String(format: "%.0f", r)
}

/// CLOCK_MONOTONIC in ns, the clock records are stamped with.
func monotonicNow() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
}
