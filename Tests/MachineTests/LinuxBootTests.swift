import ELF
import FlowTrace
import Foundation
import KVM
import Machine
import Testing
import TestSupport

/// Debian's stock kernel and the initramfs of guests/linux-init, as tools/fetch-linux leaves
/// them in guests/build/linux (tools/test-nested runs it before the nested machine boots).
enum StockKernel {
    static let directory = Guests.root.appendingPathComponent("guests/build/linux")
    static var kernel: String { directory.appendingPathComponent("vmlinuz").path }
    static var initrd: String { directory.appendingPathComponent("initrd.cpio.gz").path }
    static var present: Bool {
        FileManager.default.fileExists(atPath: kernel) && FileManager.default.fileExists(atPath: initrd)
    }

    /// A stock kernel needs VMX/SVM: on PVM (CPL0 emulated, where int3 cannot run either)
    /// it does not boot in useful time.
    static let hardwareVirtualisation = workingEngines.contains(.int3)
    static var available: Bool { present && hardwareVirtualisation }
    static var skipReason: Comment {
        if !present { return "no stock kernel in guests/build/linux: tools/fetch-linux fetches Debian's (tools/test-nested runs the suite)" }
        return "a stock Linux kernel needs VMX/SVM; this host's KVM emulates CPL0 code (PVM: int3 does not trap either), so it would not boot in useful time; tools/test-nested runs the suite in a nested SVM KVM"
    }

    static let commandLine = "console=ttyS0 reboot=k panic=-1 nokaslr quiet"
}

/// What guests/linux-init's /init reported.
struct InitReport {
    let lines: [String]
    init(_ console: [ConsoleLine]) {
        lines = console.filter { $0.source == .serial }.map(\.text).filter { $0.hasPrefix("flowtrace-init: ") }
    }
    var cpus: Int? { lines.first { $0.hasPrefix("flowtrace-init: cpus ") }.flatMap { Int($0.split(separator: " ").last ?? "") } }
    func kallsyms(_ name: String) -> UInt64? {
        lines.first { $0.hasPrefix("flowtrace-init: kallsyms \(name) 0x") }
            .flatMap { UInt64($0.split(separator: " ").last?.dropFirst(2) ?? "", radix: 16) }
    }
    /// The count in its last line: writes before that one.
    var writesBefore: Int? { lines.last.flatMap { Int($0.split(separator: " ")[1]) } }
}

@Suite("a stock Linux kernel", .serialized, .enabled(if: StockKernel.available, StockKernel.skipReason), .timeLimit(.minutes(10)))
struct LinuxBootTests {
    func machine(vcpus: Int, commandLine: String = StockKernel.commandLine) throws -> Machine {
        try Machine(path: StockKernel.kernel, configuration: .init(
            vcpuCount: vcpus, memorySize: 512 << 20, engine: .engine(.hw),
            files: BootFiles(commandLine: commandLine, initrd: StockKernel.initrd)))
    }

    /// The other endings: `reboot=t` resets through a triple fault; halting without ACPI
    /// (/init's reboot(RB_HALT_SYSTEM)) leaves every CPU in cli; hlt, which ends the run as
    /// all-halted instead of at the timeout.
    @Test("reboot=t and a halt end the run", arguments: [("reboot=t", 1), ("flowtrace.end=halt", 2)])
    func otherEndings(_ option: String, _ vcpus: Int) throws {
        let line = StockKernel.commandLine.replacingOccurrences(of: "reboot=k", with: option == "reboot=t" ? option : "reboot=k \(option)")
        let r = try machine(vcpus: vcpus, commandLine: line).run(timeout: .seconds(900))
        #expect(InitReport(r.console).cpus == vcpus)
        #expect(r.ending == (option == "reboot=t" ? .reset("triple fault") : .allHalted), "\(r.ending)")
    }

    /// Debian's kernel to /init and back: /init's lines, the CPU count it saw, the i8042
    /// reset `reboot=k` asks for, and one hit of the 64-bit entry the setup header gives
    /// (the protected-mode code at 1 MiB, +0x200), on vCPU 0 only.
    @Test("boots to /init and reboots", arguments: [1, 2])
    func bootsToInit(_ vcpus: Int) throws {
        let m = try machine(vcpus: vcpus)
        #expect(m.bootProtocol == .linux)
        let header = try #require(KernelImage(path: StockKernel.kernel).linux)
        #expect(header.unsupportedReason == nil)
        let entry: UInt64 = 0x100000 + 0x200
        let module = try TraceModule(target: m)
        try module.addProbe(Probe("entry", entries: [reg("rsi")]), at: entry)
        try module.enable()
        let r = try m.run(timeout: .seconds(900))
        let report = InitReport(r.console)
        #expect(r.ending == .reset("i8042"), "\(r.ending); console: \(r.console.suffix(20).map(\.text))")
        #expect(report.lines.first == "flowtrace-init: up")
        #expect(report.cpus == vcpus)
        let hits = module.report()
        #expect(hits.count == 1)
        #expect(hits.first?.vcpu == 0)
        // rsi: the zero page, in flowtrace's boot information area.
        let rsi = try #require(hits.first.flatMap { u64($0.values[0]) })
        #expect(KernelLayout.bootInfo.contains(rsi))
    }

    /// Addresses /init reads from /proc/kallsyms (nokaslr: the same on every boot), probed
    /// on the next boot with the hw engine before the kernel maps them: ksys_write hits once
    /// per write(2) /init made, each with its length in rdx; the reboot syscall once.
    @Test func probesOnAddressesFromKallsyms() throws {
        let first = try machine(vcpus: 1).run(timeout: .seconds(900))
        let learned = InitReport(first.console)
        #expect(first.ending == .reset("i8042"))
        let write = try #require(learned.kallsyms("ksys_write"), "\(learned.lines)")
        let reboot = try #require(learned.kallsyms("__x64_sys_reboot"))

        let m = try machine(vcpus: 2)
        let module = try TraceModule(target: m)
        try module.addProbe(Probe("write", entries: [reg("rdx")]), at: write)
        try module.addProbe(Probe("reboot", entries: [reg("rdi")]), at: reboot)
        try module.enable()
        let r = try m.run(timeout: .seconds(900))
        let report = InitReport(r.console)
        #expect(r.ending == .reset("i8042"))
        #expect(report.cpus == 2)
        let writes = module.report().filter { $0.address == write }
        let n = try #require(report.writesBefore)
        #expect(writes.count == n + 1)
        // Each of /init's lines is one write: its text and the newline.
        #expect(writes.map { u64($0.values[0]) ?? 0 } == report.lines.map { UInt64($0.utf8.count + 1) })
        #expect(module.report().filter { $0.address == reboot }.count == 1)
    }
}
