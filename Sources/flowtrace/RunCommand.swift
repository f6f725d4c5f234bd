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
          file (named; jsonl/csv cut to whole records). A FILE you may not write is
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


func formatRate(_ r: Double) -> String {
    if r >= 1e6 { return String(format: "%.2fM", r / 1e6) }
    if r >= 1e3 { return String(format: "%.1fk", r / 1e3) }
    return String(format: "%.0f", r)
}
