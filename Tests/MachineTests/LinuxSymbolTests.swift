import ELF
import FlowTrace
import Foundation
import KVM
import LinuxKernel
import Machine
import Testing
import TestSupport

/// What the kernel itself says, as /init reports it (guests/linux-init): symbols sampled from
/// /proc/kallsyms and, for every "calling  FN+0x0/..." line of the log, FN's address.
extension InitReport {
    var sampledSymbols: [KernelSymbol] {
        lines.compactMap { l -> KernelSymbol? in
            let f = l.split(separator: " ")
            guard f.count == 5, f[1] == "sym", let a = UInt64(f[2].dropFirst(2), radix: 16), f[3].count == 1 else { return nil }
            return KernelSymbol(address: a, type: f[3].first!, name: String(f[4]))
        }
    }
    /// nil address: two symbols have the name, so the log cannot say which.
    var initcalls: [(address: UInt64?, name: String)] {
        lines.compactMap { l in
            let f = l.split(separator: " ")
            guard f.count == 4, f[1] == "initcall" else { return nil }
            return (UInt64(f[2].dropFirst(2), radix: 16), String(f[3]))
        }
    }
}

/// Debian's kernel traced by name: symbols from its own kallsyms tables (inside the xz
/// payload), software probes behind the rest_init gate, an entry probe past the ftrace site.
@Suite("a stock Linux kernel by symbol name", .serialized, .enabled(if: StockKernel.available, StockKernel.skipReason), .timeLimit(.minutes(10)))
struct LinuxSymbolTests {
    static func view() throws -> (KernelImage, LinuxKernelView, ELFImage) {
        let kernel = try KernelImage(path: StockKernel.kernel)
        let view = try #require(try kernel.linuxView())
        return (kernel, view, try #require(view.image))
    }

    /// The console around the kernel's first BUG, Oops, WARNING or panic line (15 lines
    /// before, 60 after), else its last 40 lines: what a failure needs to be understood.
    static func kernelTrouble(_ console: [ConsoleLine]) -> String {
        let text = console.map(\.text)
        let lines: ArraySlice<String>
        if let i = text.firstIndex(where: { l in ["BUG:", "Oops", "WARNING:", "Kernel panic", "general protection"].contains { l.contains($0) } }) {
            lines = text[max(0, i - 15)..<min(text.count, i + 60)]
        } else {
            lines = text.suffix(40)
        }
        return "the console there:\n" + lines.joined(separator: "\n")
    }

    /// The symbols flowtrace decodes from the image equal the running kernel's /proc/kallsyms
    /// (every 90th line: over 1,000 functions and data symbols).
    @Test func symbolsEqualProcKallsyms() throws {
        let (_, view, _) = try Self.view()
        #expect(view.symbols.source == .kallsyms(compression: .xz))
        let m = try Machine(path: StockKernel.kernel, configuration: .init(
            vcpuCount: 1, memorySize: 512 << 20, files: BootFiles(commandLine: StockKernel.commandLine + " flowtrace.sample=90", initrd: StockKernel.initrd)))
        let r = try m.run(timeout: .seconds(900))
        #expect(r.ending == .reset("i8042"))
        let sample = InitReport(r.console).sampledSymbols
        #expect(sample.count >= 1000)
        #expect(Set(sample.map(\.type)).isSuperset(of: ["T", "t", "D", "d", "b", "r"]))
        let ours = Set(view.symbols.symbols)
        let missing = sample.filter { !ours.contains($0) }
        #expect(missing.isEmpty, "not as /proc/kallsyms has them: \(missing.prefix(10))")
    }

    /// do_one_initcall by name (placed past its ftrace site) with the int3 engine behind the
    /// gate: one record per "calling" line, rdi = that initcall's address, in order; ksys_write
    /// by name sees /init's writes; the log has no patching complaint.
    @Test func initcallsAndWritesByName() throws {
        let (_, view, image) = try Self.view()
        let symbols = Symbolizer(image: image)
        let patching = LinuxCodePatching(vmlinux: image, symbols: symbols)
        let initcall = try #require(symbols.address(of: "do_one_initcall"))
        guard case let .afterFentry(probeAt, site) = patching.place(initcall) else {
            Issue.record("do_one_initcall has no ftrace site at its entry: \(patching.place(initcall))"); return
        }
        #expect(site == initcall || site == initcall + 4)
        let write = try #require(symbols.address(of: "ksys_write"))
        let writeAt: UInt64 = if case let .afterFentry(a, _) = patching.place(write) { a } else { write }
        let line = StockKernel.commandLine.replacingOccurrences(of: " quiet", with: " loglevel=5") + " initcall_debug log_buf_len=8M flowtrace.initcalls"
        var configuration = MachineConfiguration(vcpuCount: 2, memorySize: 512 << 20, files: BootFiles(commandLine: line, initrd: StockKernel.initrd))
        configuration.symbols = image.symbols
        let m = try Machine(path: StockKernel.kernel, configuration: configuration)
        let gate = try #require(symbols.address(of: "rest_init"))
        m.deferSoftwareProbes(until: ProbeGate(name: "rest_init", address: gate) { view.imageByte(at: $0) })
        let module = try TraceModule(target: m)
        try module.addProbe(Probe("do_one_initcall", entries: [reg("rdi")]), at: probeAt)
        try module.addProbe(Probe("ksys_write", entries: [reg("rdx")]), at: writeAt)
        try module.enable()
        #expect(m.engine?.engine == .int3)
        #expect(m.probesWaitingForGate == 2)
        let r = try m.run(timeout: .seconds(900))
        print("LinuxSymbolTests: initcalls: \(r.exits.summary())")
        #expect(r.ending == .reset("i8042"), "\(r.ending)")
        #expect(m.probesWaitingForGate == 0)
        #expect(m.lostProbes.isEmpty, "\(m.lostProbes)")
        let report = InitReport(r.console)
        // /init ran to its end (a kernel that panics reboots too, with panic=-1).
        #expect(report.writesBefore != nil, "/init never reported: \(Self.kernelTrouble(r.console))")
        let calls = module.report().filter { $0.address == probeAt }.map { u64($0.values[0]) ?? 0 }
        let expected = report.initcalls
        #expect(expected.count > 300)
        #expect(calls.count == expected.count)
        // Each record's rdi is the logged function: its address where the name is unique,
        // and in every case a function of that name by flowtrace's symbols.
        let differences = zip(calls, expected).enumerated().filter { i in
            (i.element.1.address != nil && i.element.0 != i.element.1.address) || symbols.describe(i.element.0) != i.element.1.name
        }
        #expect(differences.isEmpty, "\(differences.count) differ; first: \(differences.prefix(5).map { "\($0.offset): 0x\(String($0.element.0, radix: 16)) (\(symbols.describe($0.element.0))) vs \($0.element.1.name)" })")
        #expect(expected.filter { $0.address != nil }.count > 300)
        let writes = module.report().filter { $0.address == writeAt }.map { u64($0.values[0]) ?? 0 }
        #expect(writes == report.lines.map { UInt64($0.utf8.count + 1) })
        // (Nested TCG makes the kernel warn about its XSAVE sizes, a WARNING in fpu/xstate.c:
        // not a patching complaint.)
        // The kernel's own lines, less initcall_debug's "calling  FN" / "initcall FN returned"
        // (they name functions such as ftrace_sysctl_init, and reach the console whenever
        // something made it verbose).
        let kernelLines = r.console.map(\.text).filter { l in
            !l.hasPrefix("flowtrace-init: ") && !l.contains("] calling  ") && !(l.contains("] initcall ") && l.contains(" returned "))
        }
        let complaints = kernelLines.filter { l in
            ["ftrace", "jump_label", "jump label", "alternative", "static_call", "text_poke", "BUG:", "Oops", "int3"].contains { l.contains($0) }
                || (l.contains("WARNING:") && !l.contains("fpu/xstate.c"))
        }
        #expect(complaints.isEmpty, "\(complaints.prefix(8))")
        if !complaints.isEmpty || report.writesBefore == nil { print("LinuxSymbolTests: " + Self.kernelTrouble(r.console)) }
        // What made the console verbose, if anything did (debug-level lines on a loglevel=5 console).
        if let first = r.console.firstIndex(where: { $0.text.contains("] calling  ") }) {
            let before = r.console[max(0, first - 15)..<first].map(\.text)
            print("LinuxSymbolTests: initcall_debug lines reached the console from line \(first); the 15 lines before:\n" + before.joined(separator: "\n"))
        }
        try module.disable()
        #expect(m.lostProbes.isEmpty)
    }

    /// The kernel patching its own text while traps of ours are in it: /init flips the
    /// `sched_schedstats` static key (a jump-label update through text_poke_bp, which writes
    /// int3s into the scheduler's code while the other CPU runs it) with two processes
    /// ping-ponging a byte meanwhile; every int3 of the kernel's that exits to flowtrace is
    /// delivered back with an exception frame flowtrace builds (OwnBreakpointDelivery; through
    /// KVM's injection roughly one in a few hundred came back with rip past the int3 and no
    /// #BP, and the kernel ran half-patched code). The kernel survives every flip, and the
    /// int3 probe on ksys_write still sees each of /init's writes.
    @Test("the kernel patching its own text under int3", arguments: [1, 2])
    func theKernelsOwnTextPatchingUnderInt3(_ vcpus: Int) throws {
        let (_, view, image) = try Self.view()
        let symbols = Symbolizer(image: image)
        let patching = LinuxCodePatching(vmlinux: image, symbols: symbols)
        let write = try #require(symbols.address(of: "ksys_write"))
        let writeAt: UInt64 = if case let .afterFentry(a, _) = patching.place(write) { a } else { write }
        let flips = 300
        var configuration = MachineConfiguration(vcpuCount: vcpus, memorySize: 512 << 20, files: BootFiles(
            commandLine: StockKernel.commandLine + " flowtrace.toggles=\(flips)", initrd: StockKernel.initrd))
        configuration.symbols = image.symbols
        let m = try Machine(path: StockKernel.kernel, configuration: configuration)
        let gate = try #require(symbols.address(of: "rest_init"))
        m.deferSoftwareProbes(until: ProbeGate(name: "rest_init", address: gate) { view.imageByte(at: $0) })
        let module = try TraceModule(target: m)
        try module.addProbe(Probe("ksys_write", entries: [reg("rdi"), reg("rdx")]), at: writeAt)
        try module.enable()
        #expect(m.engine?.engine == .int3)
        let r = try m.run(timeout: .seconds(900))
        print("LinuxSymbolTests: \(vcpus) vCPUs, \(flips) static-key flips: \(r.exits.summary())")
        #expect(r.ending == .reset("i8042"), "\(r.ending)")
        // The kernel's int3s did exit (its patching ran into traps of ours), each one a
        // kernel-mode int3 flowtrace delivered itself.
        #expect(r.exits.reinjectedBreakpoints > 0)
        #expect(r.exits.breakpointsDelivered == r.exits.reinjectedBreakpoints)
        let report = InitReport(r.console)
        #expect(report.lines.contains("flowtrace-init: toggles \(flips) of \(flips)"), "\(Self.kernelTrouble(r.console))")
        #expect(report.writesBefore != nil, "/init never reported: \(Self.kernelTrouble(r.console))")
        // /init's own writes go to fd 1; the relaying children write to their pipes.
        let writes = module.report().filter { $0.address == writeAt && u64($0.values[0]) == 1 }.map { u64($0.values[1]) ?? 0 }
        #expect(writes == report.lines.map { UInt64($0.utf8.count + 1) })
        let complaints = r.console.map(\.text).filter { l in
            !l.hasPrefix("flowtrace-init: ") && ["jump_label", "jump label", "text_poke", "BUG:", "Oops", "int3", "general protection"].contains { l.contains($0) }
                || (l.contains("WARNING:") && !l.contains("fpu/xstate.c"))
        }
        #expect(complaints.isEmpty, "\(complaints.prefix(8))")
        if !complaints.isEmpty || report.writesBefore == nil { print("LinuxSymbolTests: " + Self.kernelTrouble(r.console)) }
        #expect(m.lostProbes.isEmpty, "\(m.lostProbes)")
        try module.disable()
    }
}
