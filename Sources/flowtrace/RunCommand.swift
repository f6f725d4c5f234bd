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

enum PlatformOption: String, ExpressibleByArgument, CaseIterable {
    case auto, payload, pc

    var request: PlatformRequest {
        switch self {
        case .auto: .auto
        case .payload: .platform(.payload)
        case .pc: .platform(.pc)
        }
    }
}

enum BootOption: String, ExpressibleByArgument, CaseIterable {
    case auto, payload, linux, pvh, multiboot, multiboot2

    var request: BootRequest {
        switch self {
        case .auto: .auto
        case .payload: .boot(.payload)
        case .linux: .boot(.linux)
        case .pvh: .boot(.pvh)
        case .multiboot: .boot(.multiboot)
        case .multiboot2: .boot(.multiboot2)
        }
    }
}

/// What --serial asks for.
enum SerialMode: Equatable {
    /// Output to the console, no input.
    case none
    /// Output to the console, standard input to the guest.
    case stdio
    /// Output to a file, no input.
    case file(String)

    init(parsing text: String) throws(ExitCode) {
        switch text {
        case "none": self = .none
        case "stdio": self = .stdio
        default:
            guard text.hasPrefix("file:"), text.count > 5 else {
                throw fail("--serial '\(text)': expected none, stdio or file:PATH", status: ExitStatus.usage)
            }
            self = .file(String(text.dropFirst(5)))
        }
    }
}

extension FilterCombination: ExpressibleByArgument {}
/// `--format`: the record formats, and `json` for `--count-by` / `--hist` results.
enum OutputFormat: String, ExpressibleByArgument, CaseIterable {
    case table, jsonl, csv, chrome, json
    var records: ReportFormat? { ReportFormat(rawValue: rawValue) }
}

struct RunCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "run",
        abstract: "Boot a guest (an ELF payload or a kernel), run it to the end, and trace it with probes.",
        discussion: """
        PROBE SPECS: LOCATION[@before|@after][:ITEM[,ITEM...]][ if EXPR]
          LOCATION  symbol, symbol+0xOFF, symbol+DEC, or an address 0x...
          @before   record before the instruction at LOCATION runs (default)
          @after    record after it ran (the engine single-steps it first)
          ITEM      a register (rdi, eax, ah, xmm0, rip, rflags, cr3, gdtr, ...),
                    memory [EXPR] or [EXPR]:SIZE (SIZE 1-4096 bytes, default 8;
                    EXPR is BASE or BASE+INDEX*SCALE, each with an optional
                    +DISP/-DISP; BASE a register, a constant or a symbol; SCALE
                    1, 2, 4 or 8; shown as the number it holds for SIZE 1, 2, 4
                    or 8, or as bytes with :bytes after it), or caller (the
                    return address at a function's entry, [rsp]:8)
          if EXPR   a condition at the hit: a false one takes no --hits and no
                    record. Registers, [EXPR]:1|2|4|8, numbers, symbols,
                    caller, ( ), and C's * + - << >> < <= > >= == != & ^ | &&
                    || ! ~, unsigned 64-bit
          Examples: --probe fib:rdi    --probe 'fib@after:rax'
                    --probe 'element:[rdi+rsi*8]:8,rsi'
                    --probe '0x100000:rip,[rsp]:8' --common cr3
                    --probe 'fib:rdi if rdi < 3'
        FLOW: --flow FUNCTION[:ITEM,...] probes the function's control-flow graph
          (see flowtrace graph): its entry block before the first instruction,
          each exit block after its last (the ret), every other block before its
          first; ITEMs are collected at each (--flow-entry and --flow-exit
          replace them for entry and exit blocks). Entry hits count the calls,
          exit hits the returns; a tail call leaves through a jump block.
          FUNCTION may be an address. Example: --flow fib:rdi --flow-exit rax
        FILTERS (--filter, repeatable, combined by --match all|any; --reverse
          keeps the rest): seq=A..B  ts=A..B (ns since the start; us/ms/s
          suffixes)  vcpu=A..B  addr=SYMBOL  addr=A..B  value:ITEM=V
          common:ITEM=V (V as printed: a number for a register and for memory
          of 1, 2, 4 or 8 bytes, hex bytes for other memory and ITEM:bytes).
          Ranges may leave out an end (seq=100..) or be one number (vcpu=1).
        AGGREGATIONS: --count-by ITEM counts the hits at each location per value
          of ITEM (a register, [memory]:1|2|4|8, caller, or an expression of
          them as in conditions); --hist ITEM draws a power-of-two histogram of
          its values, --hist-linear ITEM:MIN:MAX:STEP one with STEP-wide
          buckets. Computed at each hit taken (after --vcpu, the condition and
          --hits), without records: the tables (--top N values) or JSON
          (--format json, -o x.json) replace the records on stdout or in -o
          FILE. ITEM caller: at a function's first instruction, the return
          address ([rsp]:8). Example: --probe fib --count-by caller --hist rdi
        OUTPUT: the records go to stdout, or -o FILE: --format table (default on
          a terminal), jsonl (default otherwise; for -o, the file's extension
          .jsonl/.csv/.json/.txt picks it), csv, chrome (Chrome trace-event
          JSON for Perfetto UI). jsonl and csv are written while the guest runs,
          in sequence order; table and chrome after the run, from the records
          kept (--max-records). -o FILE, in every format: the records go to a
          temporary file beside FILE (named on stderr when the run starts),
          which replaces FILE when the run ends, whatever the ending; a failed
          write stops the run, leaves FILE as it was and keeps the temporary
          file (named, cut to whole records). A FILE you may not write is
          refused. While records go to stdout the guest's console goes to
          stderr. A summary per location goes to stderr.
        PLATFORM: payload (flowtrace's ELF payloads: no interrupt controller,
          hlt ends a vCPU) or pc (KVM's in-kernel PIC, IOAPIC, LAPIC and PIT:
          interrupts, hlt waits for one; the hlt engine cannot work there).
          Both have the debug console 0xE9, the exit port 0xF4, a 16550A UART
          on COM1 (0x3F8, IRQ 4), i8042, CMOS/RTC, port 0x80 and empty PCI
          ports; ports no device answers read all ones and are listed in the
          summary.
        BOOTING KERNELS: IMAGE may be a Linux bzImage or vmlinux (64-bit boot
          protocol), a PVH kernel (XEN_ELFNOTE_PHYS32_ENTRY), a Multiboot 1 or 2
          kernel; --boot forces one. They run on the pc platform; --append,
          --initrd, --module give the command line and files (as QEMU's
          -append, -initrd). Only vCPU 0 starts; the kernel starts the others.
        SERIAL: none (COM1's output goes to the console, no input; default),
          stdio (also standard input to the guest, a pipe or a terminal in raw
          mode), file:PATH (output to PATH).
        EXIT STATUS: the guest's own (port 0xF4, or 0 when every vCPU halted: on
          the pc platform, halted with interrupts off), 0 when the guest reset
          the machine (i8042 command 0xFE; a triple fault on the pc platform),
          64 bad input, 69 KVM unavailable, 70 guest fault, host failure or
          internal error, 74 the records, the console or a message could not be
          written, 124 timeout, 130 SIGINT (Ctrl-C), 143 SIGTERM, 129 SIGHUP (a
          second signal stops at once). Records taken before a fault, a timeout
          or a signal are still written; -o FILE is replaced only when the run
          ends (an existing file stays as it was after a failure).
        """
    )

    /// The guest, --boot, --append, --initrd, --module, --symbol-file (shared with inspect, graph).
    @OptionGroup var imageOptions: ImageOptions
    var guest: String { imageOptions.guest }
    var boot: BootOption { imageOptions.boot }
    var append: String? { imageOptions.append }
    var initrd: String? { imageOptions.initrd }
    var modules: [String] { imageOptions.modules }
    var symbolFile: String? { imageOptions.symbolFile }

    @Option(name: .customLong("device"), help: ArgumentHelp("A QEMU test device, with QEMU's semantics (repeatable): isa-debug-exit[,iobase=N][,iosize=N] (a write of V ends the guest with status (V << 1) | 1; defaults iobase=0x501, iosize=2; at 0xf4 it replaces flowtrace's exit port), pc-testdev (ports 0xe0-0xeb and 0x2000-0x2017, MMIO 0xff000000-0xff00ffff; see the README).", valueName: "spec"))
    var deviceSpecs: [String] = []

    @Option(parsing: .unconditional, help: "Number of vCPUs. Payloads: each starts at the entry with its index in rdi; kernels: vCPU 0 starts, the kernel starts the others.")
    var vcpus: Int = 1

    @Option(help: "Guest RAM: bytes or a K/M/G suffix, a multiple of 2M (default 64M for payloads, 512M for kernels; kernels up to 64G).")
    var memory: String?

    @Option(parsing: .unconditional, help: "Stop the guest after this many seconds (exit status 124).")
    var timeout: Double?

    @Option(help: "Breakpoint engine: auto picks the fastest that works here for the probe count.")
    var engine: EngineOption = .auto

    @Option(help: "Platform: payload, pc, or auto (what the image needs: payload for flowtrace's ELF payloads); see PLATFORM.")
    var platform: PlatformOption = .auto

    @Option(help: ArgumentHelp("The serial port COM1: none, stdio or file:PATH; see SERIAL.", valueName: "mode"))
    var serial: String = "none"

    @Option(name: .customLong("vcpu"), help: ArgumentHelp("Trace only this vCPU, or any.", valueName: "id|any"))
    var vcpuSelection: String = "any"

    @Option(parsing: .unconditional, help: "Take at most this many records, then stop tracing (0: no limit).")
    var hits: Int64 = 0

    @Option(name: .customLong("max-records"), parsing: .unconditional, help: "Keep at most this many records in memory; beyond it the oldest are evicted (0: no limit; default 1000000, or 10000 for jsonl and csv, which are written while the guest runs and lose nothing to it).")
    var maxRecords: Int?

    @Option(name: .customLong("probe"), help: ArgumentHelp("A probe (repeatable); see PROBE SPECS.", valueName: "spec"))
    var probeSpecs: [String] = []

    @Option(name: .customLong("flow"), help: ArgumentHelp("Trace every basic block of a function (repeatable); see FLOW.", valueName: "function[:items]"))
    var flowSpecs: [String] = []

    @Option(name: .customLong("flow-entry"), help: ArgumentHelp("With --flow: the items at entry blocks instead.", valueName: "items"))
    var flowEntry: String?

    @Option(name: .customLong("flow-exit"), help: ArgumentHelp("With --flow: the items after exit blocks instead.", valueName: "items"))
    var flowExit: String?

    @Flag(name: .customLong("split-calls"), help: "With --flow: also start a block after every call.")
    var splitCalls = false

    @Option(help: ArgumentHelp("Items collected at every probe, comma-separated.", valueName: "items"))
    var common: String?

    @Option(name: .customLong("filter"), help: ArgumentHelp("Select records (repeatable); see FILTERS.", valueName: "filter"))
    var filterSpecs: [String] = []

    @Option(help: "How several filters combine.")
    var match: FilterCombination = .all

    @Flag(help: "Write the records the filters do not select instead.")
    var reverse = false

    @Flag(name: .customLong("exit-counts"), help: "Print how many exits of each kind the run took (and the busiest I/O ports).")
    var exitCounts = false

    @Option(help: "Report format: table, jsonl, csv or chrome for records; table or json for --count-by and --hist.")
    var format: OutputFormat?

    @Option(name: .customLong("count-by"), help: ArgumentHelp("Count the hits at each location per value of ITEM, instead of writing records (repeatable); see AGGREGATIONS.", valueName: "item"))
    var countBy: [String] = []

    @Option(name: .customLong("hist"), help: ArgumentHelp("A power-of-two histogram of ITEM's values at each location (repeatable); see AGGREGATIONS.", valueName: "item"))
    var hist: [String] = []

    @Option(name: .customLong("hist-linear"), help: ArgumentHelp("A histogram of ITEM's values in STEP-wide buckets from MIN to MAX (repeatable).", valueName: "item:min:max:step"))
    var histLinear: [String] = []

    @Option(parsing: .unconditional, help: "How many values --count-by shows per location, most hits first (0: all).")
    var top: Int = 20

    @Option(name: .short, help: ArgumentHelp("Write the records to this file instead of stdout.", valueName: "file"))
    var output: String?

    func run() throws {
        // Ctrl-C first: before the machine exists it ends the command at once (nothing was
        // traced); once the guest runs it stops every vCPU and what the run took is reported.
        let interruption = Interruption()
        defer { interruption.cancel() }
        if let t = timeout, !(t > 0 && t <= 1e9) {
            throw fail("--timeout \(t): must be a positive number of seconds, at most 1e9", status: ExitStatus.usage)
        }
        if let m = maxRecords, m < 0 { throw fail("--max-records \(m): must be 0 (no limit) or more", status: ExitStatus.usage) }
        if vcpus < 1 { throw fail("--vcpus \(vcpus): must be at least 1", status: ExitStatus.usage) }
        if hits < 0 { throw fail("--hits \(hits): must be 0 (no limit) or more", status: ExitStatus.usage) }
        // The image is checked first so a bad file is reported as such even without KVM.
        let kernel: KernelImage
        let bootProtocol: BootProtocol
        do {
            kernel = try KernelImage(path: guest)
            bootProtocol = try kernel.resolve(boot.request)
        } catch { throw fail(error.description, status: ExitStatus.usage) }
        if bootProtocol == .payload {
            if let first = imageOptions.bootFileOptions.first {
                throw fail("\(first): \(guest) is booted as a flowtrace payload, which takes no command line, initrd or modules; give a kernel, or --boot linux|pvh|multiboot|multiboot2", status: ExitStatus.usage)
            }
        }
        let memorySize: UInt64
        do {
            memorySize = try memory.map(parseMemorySize) ?? (bootProtocol == .payload ? MachineConfiguration.defaultMemorySize : MachineConfiguration.defaultKernelMemorySize)
        } catch { throw fail(error.description, status: ExitStatus.usage) }
        // A Linux kernel: its vmlinux (a bzImage's decompressed payload) with its symbols.
        var view: LinuxKernelView?
        if bootProtocol != .payload, kernel.isLinux || symbolFile != nil {
            do { view = try kernel.linuxView(symbolFile: symbolFile) } catch { throw fail(error.description, status: ExitStatus.usage) }
            if let symbolFile, view?.symbols.source == .symtab {
                printError("flowtrace: --symbol-file \(symbolFile) not used: \(guest) has its own .symtab")
            }
        } else if let symbolFile {
            throw fail("--symbol-file \(symbolFile): \(guest) is a flowtrace payload; its symbols come from its own .symtab", status: ExitStatus.usage)
        }
        // Payloads: their ELF file; kernels: the vmlinux view, the ELF (a Multiboot or PVH
        // kernel), or nothing to check probes against.
        let image = view?.image ?? kernel.elf ?? ELFImage(path: guest, entry: 0, segments: [])
        let symbols = Symbolizer(image: image)
        let patching = bootProtocol == .linux ? view?.image.map { LinuxCodePatching(vmlinux: $0, symbols: symbols) } : nil
        // A bzImage's protected-mode code as loaded (physical addresses: its 64-bit entry at
        // +0x200, the decompressor), where probes may go besides the vmlinux's code.
        var loadedCode: [Range<UInt64>] = []
        if bootProtocol == .linux, let h = kernel.linux, kernel.bytes.count > h.kernelOffset {
            loadedCode = [KernelLayout.kernelLoad ..< KernelLayout.kernelLoad + UInt64(kernel.bytes.count - h.kernelOffset)]
        }
        let plan = try TracePlan(command: self, image: image, symbols: symbols, checkCode: bootProtocol == .payload || view?.vmlinux != nil,
                                 patching: patching, loadedCode: loadedCode)
        // Symbols are link addresses: a randomized kernel would run elsewhere.
        var commandLine = append ?? ""
        var notes: [String] = []
        if bootProtocol == .linux, view != nil, !commandLine.split(separator: " ").contains("nokaslr") {
            commandLine += commandLine.isEmpty ? "nokaslr" : " nokaslr"
            notes.append("flowtrace: added nokaslr to the kernel command line: probes and symbols use the kernel's link addresses")
        }
        for n in notes { printError(n) }
        let serialMode = try SerialMode(parsing: serial)
        let devices = try deviceSpecs.map(parseDevice)
        if case let .file(path) = serialMode {
            do { try ByteSink.checkWritable(path) } catch { throw fail("--serial file:\(path): \(error.description)", status: ExitStatus.usage) }
            if let o = plan.output, o == path { throw fail("--serial file:\(path): the same file as -o", status: ExitStatus.usage) }
        }
        for w in plan.warnings { printError(w) }

        let host: KVMHost
        do { host = try KVMHost(path: kvmDevicePath) } catch { throw fail(error.description, status: ExitStatus.unavailable) }
        // The serial file is opened (truncated) only once everything else checked out.
        let serialFile = SerialFile()
        let destination: SerialDestination = if case .file = serialMode { .sink(SerialSink { serialFile.write($0) }) } else { .console }
        let machine: Machine
        do {
            let files = BootFiles(commandLine: commandLine, initrd: initrd, modules: modules.map(BootModule.init(option:)))
            var configuration = MachineConfiguration(vcpuCount: vcpus, memorySize: memorySize, engine: engine.request,
                                                     platform: platform.request, serial: destination,
                                                     boot: .boot(bootProtocol), files: files)
            if view != nil { configuration.symbols = image.symbols }
            configuration.devices = devices
            machine = try Machine(kernel: kernel, configuration: configuration, host: host)
        } catch {
            if case .kvm = error { throw fail(error.description, status: ExitStatus.unavailable) }
            throw fail(error.description, status: ExitStatus.usage)
        }
        if let fault = faultInjection { try inject(fault, into: machine) }
        if let area = machine.movedBootArea {
            let low = machine.image.segments.filter { $0.physicalAddress < KernelLayout.kernelLoad }.map(\.physicalRange)
            let span = "\(hex(low.map(\.lowerBound).min() ?? 0))-\(hex(low.map(\.upperBound).max() ?? 0))"
            printError("flowtrace: note: \((guest as NSString).lastPathComponent) loads below 1 MiB (\(span)), where flowtrace keeps its boot structures: its GDT, boot information and boot stack are at \(hex(area.range.lowerBound))-\(hex(area.range.upperBound)) instead, reserved in the memory map")
        }
        // Software probes wait until the kernel has done its boot-time patching.
        if patching != nil, let gate = symbols.address(of: "rest_init"), let view {
            machine.deferSoftwareProbes(until: ProbeGate(name: "rest_init", address: gate) { view.imageByte(at: $0) })
        }
        let tracer = try plan.arm(on: machine, engine: engine.request)
        if tracer != nil, engine == .auto, let chosen = machine.engine, chosen.engine == .step {
            // The slowest engine, picked silently until now: say what it costs and what is faster.
            let n = plan.probes.count
            let hwCapacity = BreakpointEngine.hw.capacity ?? 4
            let faster = n > hwCapacity && machine.engineSupport.works(.hw)
                ? "probe at most \(hwCapacity) locations and --engine hw takes them (one exit per hit)"
                : "a host with VMX/SVM runs int3 there, one exit per hit"
            printError("flowtrace: warning: --engine auto picked step for \(n) probe location\(n == 1 ? "" : "s"): it single-steps every instruction the guest runs (an exit each, many times slower than the guest; \(chosen.reason)); faster: \(faster)")
        }
        if let tracer, let patching, let initMemory = patching.initMemory, let e = machine.engine?.engine, e == .int3 || e == .hlt,
           let p = plan.probes.first(where: { initMemory.contains($0.address) }) {
            try? tracer.module.disable()
            throw fail("probe \(p.location) (\(hex(p.address))) is in the kernel's init memory, which it frees and reuses once booted: the \(e) engine's trap byte would be left there; use --engine hw", status: ExitStatus.usage)
        }
        if case let .file(path) = serialMode {
            do { try serialFile.open(path) } catch { throw fail("--serial file:\(path): \(error.description)", status: ExitStatus.usage) }
        }
        let input = serialMode == .stdio ? try SerialInput(uart: machine.uart) : nil
        defer { input?.stop() }

        // The records' destination, opened before the guest starts (see RecordOutput).
        var output: RecordOutput?
        if tracer != nil {
            do { output = try RecordOutput(path: plan.output, what: plan.aggregations.isEmpty ? "records" : "results") } catch {
                try? tracer?.module.disable()
                throw fail("-o \(error.message)", status: ExitStatus.usage)
            }
        }
        if let o = output, let t = o.temporary, plan.streams {
            printError("flowtrace: the records go to \(t) while the guest runs (tail -f shows them); it replaces \(o.destination) when the run ends")
        }
        if bootProtocol != .payload, KVMFlavor.current() == .pvm {
            // Once, just before the guest runs: what a user would otherwise find out after minutes.
            printError("flowtrace: warning: this host's KVM is PVM (kvm_pvm): a kernel's CPL0 code is emulated, about 1 µs per instruction, so \((guest as NSString).lastPathComponent) runs far slower than on VMX/SVM (a stock Linux kernel does not boot in useful time) and int3 probes do not work; use --engine hw (up to 4 probes) and --timeout, or a host with VMX/SVM")
        }
        interruption.stops(machine, partial: output?.temporary)
        standardOutput.onFailure { interruption.stopForOutputFailure($0) }
        // A progress line on a terminal that also shows the records as they stream would
        // cut through them: then there is none.
        let recordsOnStderrTerminal = plan.output == nil && plan.streams && standardOutput.shareTerminal
        let progress = recordsOnStderrTerminal ? nil : tracer.map { ProgressLine.tracing($0.module) } ?? ProgressLine.running(machine)
        let consoleToStderr = tracer != nil && plan.output == nil
        var result: RunResult
        let origin = monotonicNanoseconds()
        let title = (guest as NSString).lastPathComponent
        var stream: RecordStreamWriter?
        if let tracer, let output {
            stream = try plan.startStream(tracer, sink: output.sink, symbols: symbols, timeOrigin: origin, title: title) {
                interruption.stopForOutputFailure($0)
            }
        }
        /// The records, whatever the ending: the stream's rest, or the whole report; then the
        /// output closed (-o FILE replaced, or left as it was after a failure).
        func writeRecords(_ tracer: Tracer, _ output: RecordOutput) -> (written: Int, error: String?, outcome: String) {
            if tracer.module.state == .enabled {
                do { try tracer.module.disable() } catch { printError("flowtrace: warning: \(error.description)") }
            }
            let (written, failure): (Int, String?)
            if let stream {
                (written, failure) = stream.finish()
            } else if !plan.aggregations.isEmpty {
                (written, failure) = plan.writeAggregations(tracer, to: output.sink, symbols: symbols)
            } else {
                (written, failure) = plan.writeReport(tracer, to: output.sink, symbols: symbols, timeOrigin: origin, title: title)
            }
            let (error, outcome) = output.close(written: written, failure: failure, counted: stream != nil)
            return (written, error, outcome)
        }
        let consoleWhat = "the guest's console"
        do {
            result = try machine.run(timeout: timeout.map { .milliseconds(Int64($0 * 1000)) }) { line in
                standardOutput.line(line.text, to: consoleToStderr ? .stderr : .stdout, what: consoleWhat)
            }
            // No debugger to hand a halt to: report it and go on (within the same --timeout).
            while case let .halted(stop) = result.ending {
                printError("flowtrace: halt on vCPU \(stop.vcpu) at \(stop.location); resuming")
                result = try machine.resume()
            }
        } catch {
            progress?.finish()
            // The records taken so far are still written.
            if let tracer, let output {
                let w = writeRecords(tracer, output)
                printError("flowtrace: \(w.outcome) before the failure")
                if let e = w.error { printError("flowtrace: error: \(e)") }
            }
            // Nothing the user typed gets here: a bug, or the host refusing something.
            if error.isInternal { throw fail("internal error (a bug of flowtrace, please report it): \(error.description)", status: ExitStatus.software) }
            throw fail("host failure: \(error.description)", status: ExitStatus.software)
        }
        progress?.finish()
        input?.stop()
        let serialFailure = serialFile.close()

        // Records first, whatever the ending, then the summary, then the status.
        var writeFailure: String?
        var outcome = ""
        var written = 0
        if let tracer, let output { (written, writeFailure, outcome) = writeRecords(tracer, output) }
        let name = (guest as NSString).lastPathComponent
        let elapsed = Double(result.elapsed.components.seconds) + Double(result.elapsed.components.attoseconds) / 1e18
        let seconds = String(format: "%.3f s", elapsed)
        let cpus = "\(vcpus) vCPU\(vcpus == 1 ? "" : "s")"
        if let tracer { printError(plan.summary(tracer, written: written, outcome: outcome, elapsed: elapsed, stepOvers: machine.stepOvers)) }
        for n in notes { printError(n) }
        if tracer != nil, machine.probesWaitingForGate > 0 {
            printError("flowtrace: \(machine.probesWaitingForGate) software probe\(machine.probesWaitingForGate == 1 ? "" : "s") never armed: the kernel never reached rest_init, where they wait for its boot-time code patching to end")
        }
        for l in machine.lostProbes { printError("flowtrace: probe \(l)") }
        if exitCounts { printError("flowtrace: \(result.exits.summary(ports: 6))") }
        if let writeFailure { printError("flowtrace: error: \(writeFailure)") }
        if let serialFailure { printError("flowtrace: error: --serial: \(serialFailure)") }
        let unknown = machine.unknownAccesses
        if !unknown.isEmpty {
            let ports = unknown.filter { $0.space == .port }.count, mmio = unknown.count - ports
            let what = [ports > 0 ? "\(ports) port\(ports == 1 ? "" : "s")" : nil, mmio > 0 ? "\(mmio) MMIO address\(mmio == 1 ? "" : "es")" : nil]
                .compactMap { $0 }.joined(separator: " and ")
            printError("flowtrace: the guest touched \(what) no device answers (reads gave all ones, writes went nowhere):")
            for a in unknown { printError("  " + describe(a, symbols: symbols)) }
        }
        // A failed write (records, serial file, console, messages) is exit 74 whatever the ending.
        let ioFailed = writeFailure != nil || serialFailure != nil
        switch result.ending {
        case let .reset(why):
            printError("flowtrace: \(name): guest reset (\(why)) after \(seconds) (\(cpus))")
        case .allHalted:
            printError("flowtrace: \(name): every vCPU halted with interrupts off after \(seconds) (\(cpus)); nothing can wake the guest (a kernel without ACPI powers off so), so the run ended")
        case let .exited(status):
            printError("flowtrace: \(name): guest exited with status \(status) after \(seconds) (\(cpus))")
            if !ioFailed, status != 0 { throw ExitCode(Int32(truncatingIfNeeded: status & 0xFF == 0 ? 1 : status & 0xFF)) }
        case let .fault(f):
            printError("flowtrace: \(name): \(f.description) after \(seconds)")
            if let hint = f.hint { printError("flowtrace: \(hint)") }
            printError(f.registerDump)
            if !ioFailed { throw ExitCode(ExitStatus.guestFault) }
        case .timedOut:
            printError("flowtrace: \(name): timed out after \(seconds) (--timeout \(timeout ?? 0)); every vCPU was stopped")
            for p in machine.positions() { printError("  \(p.description)") }
            if !ioFailed { throw ExitCode(ExitStatus.timeout) }
        case .halted:
            break
        case .stopped:
            switch interruption.cause {
            case let .signal(sig)?:
                let what = sig == SIGINT ? "interrupted" : "stopped by \(signalName(sig))"
                printError("flowtrace: \(name): \(what) after \(seconds); every vCPU was stopped")
                if !ioFailed { throw ExitCode(ExitStatus.signalled(sig)) }
            case .outputFailed?:
                printError("flowtrace: \(name): stopped after \(seconds) because a write failed (said above, or on the other stream); every vCPU was stopped")
                throw ExitCode(ExitStatus.ioError)
            case nil:
                printError("flowtrace: \(name): stopped after \(seconds); every vCPU was stopped")
                if !ioFailed { throw ExitCode(ExitStatus.interrupted) }
            }
        }
        if ioFailed { throw ExitCode(ExitStatus.ioError) }
    }
}

/// An unknown access for the summary, its rip symbolized.
func describe(_ a: UnknownAccesses.Access, symbols: Symbolizer) -> String {
    let what = a.space == .port ? "port \(hex(a.address))" : "MMIO \(hex(a.address))"
    let at = symbols.describe(a.rip)
    let rip = at.hasPrefix("0x") ? hex(a.rip) : "\(hex(a.rip)) (\(at))"
    return "\(what): first \(a.isWrite ? "write" : "read") (\(a.size) byte\(a.size == 1 ? "" : "s")) on vCPU \(a.vcpu) at \(rip), \(a.count) access\(a.count == 1 ? "" : "es")"
}

/// The serial port's output file: opened once the run is about to start, written by vCPU
/// threads (a line at a time reaches the file), closed at the end.
final class SerialFile: Sendable {
    private let sink = Locked<ByteSink?>(nil)
    func open(_ path: String) throws(SystemError) {
        let s = try ByteSink(overwriting: path)
        sink.withLock { $0 = s }
    }
    func write(_ byte: UInt8) {
        sink.withLock { s in
            s?.write(byte: byte)
            if byte == 0x0A { s?.flush() }
        }
    }
    /// Writes the rest out; the error, if writing failed.
    func close() -> String? {
        guard let s = sink.withLock({ s -> ByteSink? in defer { s = nil }; return s }) else { return nil }
        do { try s.commit() } catch { return error.description }
        return nil
    }
}

/// Standard input fed to the guest's UART (`--serial stdio`): a pump thread hands what it
/// reads to the receiver, waiting while the FIFO is full; a terminal is put in raw mode.
final class SerialInput: Sendable {
    private let pump: InputPump
    private let uart: UART16550
    private let stopped: Locked<Bool>
    private let terminal: RawTerminal?

    init(uart: UART16550) throws(ExitCode) {
        self.uart = uart
        let stopped = Locked(false)
        self.stopped = stopped
        terminal = RawTerminal(fd: 0)
        do {
            pump = try InputPump(fd: 0) { bytes in
                var rest = bytes[...]
                while !rest.isEmpty {
                    rest = rest.dropFirst(uart.receive(rest))
                    if rest.isEmpty || !uart.waitForRoom(orUntil: { stopped.withLock { $0 } }) { return }
                }
            }
        } catch {
            terminal?.restore()
            throw fail("--serial stdio: \(error.description)", status: ExitStatus.software)
        }
    }

    /// Stops the pump and restores the terminal; once (later calls do nothing).
    func stop() {
        guard stopped.withLock({ s -> Bool in defer { s = true }; return !s }) else { return }
        uart.wake()
        pump.stop()
        terminal?.restore()
    }
}

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

func formatRate(_ r: Double) -> String {
    if r >= 1e6 { return String(format: "%.2fM", r / 1e6) }
    if r >= 1e3 { return String(format: "%.1fk", r / 1e3) }
    return String(format: "%.0f", r)
}

/// Why flowtrace stopped a run itself (the machine's ending is then `.stopped`).
enum StopCause: Sendable, Equatable {
    /// SIGINT, SIGTERM or SIGHUP.
    case signal(Int32)
    /// Writing the records, the console or a message failed.
    case outputFailed(String)

    var exitStatus: Int32 {
        switch self {
        case let .signal(s): ExitStatus.signalled(s)
        case .outputFailed: ExitStatus.ioError
        }
    }
}

/// The signals that end `flowtrace run` in order: SIGINT (Ctrl-C), SIGTERM (what `timeout`,
/// systemd and docker send) and SIGHUP (a closed terminal). Installed first thing, so none
/// is lost to the default action. While nothing runs yet the command exits at once (128 +
/// the signal); once the guest runs, the first one stops every vCPU and the run ends as
/// usual (every record taken written, the summary). A second one means "stop now": the
/// command exits at once, leaving -o FILE as it was (what was written is in the named
/// temporary file).
final class Interruption: Sendable {
    static let signals: [Int32] = [SIGINT, SIGTERM, SIGHUP]
    private struct State {
        var machine: Machine?
        var cause: StopCause?
        var signals = 0
        /// Said when a second signal ends the command at once: where the records are.
        var partial: String?
    }
    private let state = Locked(State())
    /// Dispatch sources are not Sendable: these are only touched under their lock.
    private let sources: Locked<[any DispatchSourceSignal]>

    init() {
        let state = self.state
        // A parent may have started flowtrace with these blocked (the mask is inherited, as
        // from a thread of a test runner): unblocked here, on the main thread, before any
        // thread of the run exists, so every thread that takes signals inherits that.
        var unblock = sigset_t()
        sigemptyset(&unblock)
        for sig in Self.signals { sigaddset(&unblock, sig) }
        pthread_sigmask(SIG_UNBLOCK, &unblock, nil)
        var sources: [any DispatchSourceSignal] = []
        for sig in Self.signals {
            signal(sig, SIG_IGN)
            let source = DispatchSource.makeSignalSource(signal: sig, queue: .global())
            source.setEventHandler { Interruption.received(sig, state) }
            source.resume()
            sources.append(source)
        }
        self.sources = Locked(sources)
    }

    private static func received(_ sig: Int32, _ state: Locked<State>) {
        let (machine, count, partial) = state.withLock { s -> (Machine?, Int, String?) in
            s.signals += 1
            if s.cause == nil { s.cause = .signal(sig) }
            return (s.machine, s.signals, s.partial)
        }
        let name = signalName(sig)
        guard let machine else {
            printError("flowtrace: \(name) before the guest ran; nothing was traced")
            exit(ExitStatus.signalled(sig))
        }
        guard count == 1 else {
            // Not through the output lock: the thread holding it may be what is stuck.
            let line = "flowtrace: second signal (\(name)): stopping now" + (partial.map { "; the records written so far are in \($0)" } ?? "") + "\n"
            do throws(SystemError) { try writeAll(STDERR_FILENO, Array(line.utf8)) } catch {}
            _exit(ExitStatus.signalled(sig))
        }
        machine.stop()
    }

    /// From now on a signal stops `m`; `partial` names where the records are written.
    func stops(_ m: Machine, partial: String?) { state.withLock { $0.machine = m; $0.partial = partial } }

    /// Stops the run because output failed (the first cause is kept).
    func stopForOutputFailure(_ message: String) {
        let machine = state.withLock { s -> Machine? in
            if s.cause == nil { s.cause = .outputFailed(message) }
            return s.machine
        }
        machine?.stop()
    }

    /// What stopped the run, if flowtrace did.
    var cause: StopCause? { state.withLock { $0.cause } }

    func cancel() { sources.withLock { for s in $0 { s.cancel() } } }
}

func signalName(_ sig: Int32) -> String {
    switch sig {
    case SIGINT: "SIGINT"
    case SIGTERM: "SIGTERM"
    case SIGHUP: "SIGHUP"
    default: "signal \(sig)"
    }
}

/// `FLOWTRACE_FAULT` (see docs/reliability.md): a host call to fail on purpose.
private var faultInjection: String? { ProcessInfo.processInfo.environment["FLOWTRACE_FAULT"] }

private func inject(_ text: String, into machine: Machine) throws(ExitCode) {
    let spec: FaultSpec
    do { spec = try FaultSpec(parsing: text) } catch { throw fail(error.description, status: ExitStatus.usage) }
    guard spec.vcpu < machine.vcpus.count else {
        throw fail("FLOWTRACE_FAULT '\(text)': the guest has vCPUs 0 to \(machine.vcpus.count - 1)", status: ExitStatus.usage)
    }
    if spec.call == .memoryWrite {
        machine.memory.faults.fail(.memoryWrite, onCall: spec.nth, errno: spec.errno)
    } else {
        machine.vcpus[spec.vcpu].faults.fail(spec.call, onCall: spec.nth, errno: spec.errno)
    }
}

/// `--device isa-debug-exit[,iobase=N][,iosize=N]` (QEMU's names and defaults).
func parseDevice(_ text: String) throws(ExitCode) -> DeviceRequest {
    let parts = text.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }
    if parts.first == "pc-testdev" {
        guard parts.count == 1 else { throw fail("--device '\(text)': pc-testdev has no properties", status: ExitStatus.usage) }
        return .pcTestdev
    }
    guard let name = parts.first, name == "isa-debug-exit" else {
        throw fail("--device '\(text)': unknown device '\(parts.first ?? "")' (devices: isa-debug-exit[,iobase=N][,iosize=N], pc-testdev)", status: ExitStatus.usage)
    }
    var base = ISADebugExit.defaultBase, size = ISADebugExit.defaultSize
    for p in parts.dropFirst() {
        let kv = p.split(separator: "=", maxSplits: 1).map(String.init)
        guard kv.count == 2, let n = parseNumber(kv[1]) else {
            throw fail("--device '\(text)': '\(p)' is not NAME=NUMBER (iobase=0xf4, iosize=4)", status: ExitStatus.usage)
        }
        switch kv[0] {
        case "iobase":
            guard n <= 0xFFFF else { throw fail("--device '\(text)': iobase \(kv[1]) is beyond the 16-bit port space", status: ExitStatus.usage) }
            base = UInt16(n)
        case "iosize":
            guard n >= 1, n <= 4 else { throw fail("--device '\(text)': iosize \(kv[1]) must be 1 to 4", status: ExitStatus.usage) }
            size = UInt16(n)
        default:
            throw fail("--device '\(text)': isa-debug-exit has no property '\(kv[0])' (iobase, iosize)", status: ExitStatus.usage)
        }
    }
    guard UInt32(base) + UInt32(size) <= 0x10000 else { throw fail("--device '\(text)': ports past 0xffff", status: ExitStatus.usage) }
    return .isaDebugExit(base: base, size: size)
}
