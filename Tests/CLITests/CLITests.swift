import Foundation
import KVM
import Testing
import TestSupport

private let kvmUsable = KVMHost.isUsable()
/// Why the KVM tests are skipped, with the error (and its errno) of opening /dev/kvm.
let kvmSkipReason = Comment(rawValue: "needs a usable /dev/kvm: \(KVMHost.unusableReason() ?? "it is usable")")

/// Runs the built `flowtrace` with `args`.
func flowtrace(_ args: String..., environment: [String: String]? = nil) throws -> ProcessOutput {
    try run(Guests.flowtrace, args, environment: environment)
}

/// Asserts a one-line error on stderr that contains every one of `parts`, empty stdout, and `status`.
func expectOneLineError(_ r: ProcessOutput, status: Int32 = 64, _ parts: String..., sourceLocation: SourceLocation = #_sourceLocation) {
    #expect(r.status == status, "exit status", sourceLocation: sourceLocation)
    let lines = r.stderr.split(separator: "\n")
    #expect(lines.count == 1, "stderr: \(r.stderr)", sourceLocation: sourceLocation)
    #expect(r.stderr.hasPrefix("flowtrace: error: "), sourceLocation: sourceLocation)
    for p in parts { #expect(r.stderr.contains(p), "missing '\(p)' in: \(r.stderr)", sourceLocation: sourceLocation) }
    #expect(r.stdout.isEmpty, sourceLocation: sourceLocation)
}

@Suite("flowtrace run and inspect", .serialized, .timeLimit(.minutes(2)))
struct CLITests {
    @Test(.enabled(if: kvmUsable, kvmSkipReason))
    func runFibPrintsTheGuestOutputAndExitsZero() throws {
        let r = try flowtrace("run", Guests.path("fib"))
        #expect(r.status == 0)
        #expect(r.stdout == "fib(15) = 610, calls = 1973\n")
        #expect(r.stderr.hasPrefix("flowtrace: fib.elf: guest exited with status 0 after "))
        #expect(r.stderr.split(separator: "\n").count == 1)
    }

    @Test(.enabled(if: kvmUsable, kvmSkipReason))
    func smpOnTwoVCPUs() throws {
        let r = try flowtrace("run", Guests.path("smp"), "--vcpus", "2")
        #expect(r.status == 0)
        let lines = r.stdout.split(separator: "\n").map(String.init)
        #expect(Set(lines) == ["vcpu 0: 100 units", "vcpu 1: 200 units", "total: 300 units on 2 vcpus"])
        #expect(lines.last == "total: 300 units on 2 vcpus")
    }

    @Test(.enabled(if: kvmUsable, kvmSkipReason))
    func guestExitStatusIsPassedOn() throws {
        let r = try flowtrace("run", Guests.path("status"))
        #expect(r.status == 42)
        #expect(r.stderr.contains("guest exited with status 42"))
    }

    @Test(.enabled(if: kvmUsable, kvmSkipReason))
    func faultExits70WithRipAndRegisters() throws {
        let r = try flowtrace("run", Guests.path("fault"))
        #expect(r.status == 70)
        #expect(r.stdout == "fault: executing ud2\n")
        #expect(r.stderr.contains("guest fault on vCPU 0"))
        #expect(r.stderr.contains("(fault_here)"))
        #expect(r.stderr.contains("rip    0x"))
    }

    @Test(.enabled(if: kvmUsable, kvmSkipReason))
    func timeoutExits124() throws {
        // The guest prints its second line after 1000 steps (milliseconds): the limit is
        // far enough that both lines are there, and the run still ends by the limit. Then
        // a line every 5000 steps, in order.
        let r = try flowtrace("run", Guests.path("spin"), "--timeout", "2")
        #expect(r.status == 124)
        let lines = r.stdout.split(separator: "\n").map(String.init)
        #expect(Array(lines.prefix(2)) == ["spin: looping forever", "spin: 1000 steps"])
        #expect(Array(lines.dropFirst(2)) == (0..<max(0, lines.count - 2)).map { "spin: \(($0 + 1) * 5000) steps" })
        #expect(r.stderr.contains("timed out after"))
    }

    @Test func inspectListsEntrySegmentsAndSymbols() throws {
        let r = try flowtrace("inspect", Guests.path("fib"))
        #expect(r.status == 0)
        #expect(r.stdout.contains("entry 0x100000 (_start)"))
        #expect(r.stdout.contains(" function  fib\n"))
        #expect(r.stdout.contains("r-x"))
    }

    // MARK: bad input: one line, names the value, exit 64, no crash

    @Test func notAFile() throws {
        expectOneLineError(try flowtrace("run", "/nonexistent/guest.elf"), "/nonexistent/guest.elf", "no such file")
        expectOneLineError(try flowtrace("inspect", "/tmp"), "/tmp", "not a regular file")
    }

    @Test func notELF() throws {
        let p = try temporaryFile(Array("hello\n".utf8), name: "hello.txt")
        expectOneLineError(try flowtrace("run", p), p, "not a kernel or payload flowtrace can boot (found: no ELF magic, no Linux setup header, no Multiboot header)")
    }

    /// (The file and memory checks of a kernel boot run once KVM is open.)
    @Test(.enabled(if: kvmUsable, kvmSkipReason))
    func kernelsInspectedAndBootOptionsChecked() throws {
        let mb = try flowtrace("inspect", try Guests.kernelPath("multiboot.elf"))
        #expect(mb.status == 0)
        #expect(mb.stdout.contains("ELF32 i386 executable, Multiboot header; boots with the multiboot protocol; e_entry "))
        let bz = try flowtrace("inspect", try Guests.kernelPath("linux.bzimage"))
        #expect(bz.stdout.hasPrefix("\(try Guests.kernelPath("linux.bzimage")): Linux bzImage, boot protocol 2.15; boots with the linux protocol\n"))
        let fib = try Guests.path("fib")
        expectOneLineError(try flowtrace("run", fib, "--append", "quiet"), "--append: \(fib) is booted as a flowtrace payload")
        expectOneLineError(try flowtrace("run", fib, "--boot", "multiboot2"), "--boot multiboot2: \(fib) cannot be booted that way: it needs a Multiboot 2 header")
        expectOneLineError(try flowtrace("run", try Guests.kernelPath("pvh.elf"), "--module", "/nonexistent.bin"), "--module /nonexistent.bin: no such file")
        expectOneLineError(try flowtrace("run", try Guests.kernelPath("pvh.elf"), "--memory", "65G"), "--memory 65G: is above the 64G flowtrace gives a kernel")
    }

    @Test func thirtyTwoBitELFWithoutMultibootHeader() throws {
        // The Multiboot 1 test kernel (ELF32 i386) with its header's magic cleared.
        var b = try [UInt8](Data(contentsOf: URL(fileURLWithPath: Guests.kernelPath("multiboot.elf"))))
        let magic: [UInt8] = [0x02, 0xB0, 0xAD, 0x1B]
        let at = try #require((0 ..< b.count - 4).first { Array(b[$0 ..< $0 + 4]) == magic })
        b.replaceSubrange(at ..< at + 4, with: [0, 0, 0, 0])
        let p = try temporaryFile(b, name: "kernel32.elf")
        expectOneLineError(try flowtrace("run", p), p, "32-bit ELF without a Multiboot header")
    }

    @Test func truncatedELF() throws {
        let b = try [UInt8](Data(contentsOf: URL(fileURLWithPath: Guests.path("fib"))))
        let p = try temporaryFile(Array(b[..<0x1010]), name: "fib-cut.elf")
        expectOneLineError(try flowtrace("run", p), p, "truncated")
    }

    @Test(.enabled(if: kvmUsable, kvmSkipReason))
    func vcpusOutOfRange() throws {
        expectOneLineError(try flowtrace("run", Guests.path("fib"), "--vcpus", "0"), "--vcpus 0", "must be at least 1")
        let max = try KVMHost().maxVCPUs()
        expectOneLineError(try flowtrace("run", Guests.path("fib"), "--vcpus", "\(max + 1)"), "--vcpus \(max + 1)")
    }

    @Test(.enabled(if: kvmUsable, kvmSkipReason))
    func memoryTooSmall() throws {
        expectOneLineError(try flowtrace("run", Guests.path("fib"), "--memory", "1M"), "--memory 1M", "too small")
        let high = try Guests.path("fib-high")
        expectOneLineError(try flowtrace("run", high, "--memory", "2M"), high, "use --memory 6M or more")
        expectOneLineError(try flowtrace("run", Guests.path("fib"), "--memory", "lots"), "--memory 'lots'")
    }

    @Test func kvmMissingSaysHowToFix() throws {
        let env = ProcessInfo.processInfo.environment.merging(["FLOWTRACE_KVM_DEVICE": "/nonexistent/kvm"]) { $1 }
        let r = try flowtrace("run", Guests.path("fib"), environment: env)
        expectOneLineError(r, status: 69, "/nonexistent/kvm does not exist", "load kvm_intel")
    }
}

/// Debian's kernel as tools/fetch-linux leaves it (tools/test-nested fetches it first in CI).
private let stockKernel = Guests.root.appendingPathComponent("guests/build/linux/vmlinuz").path
private let stockKernelPresent = FileManager.default.fileExists(atPath: stockKernel)

@Suite("flowtrace inspect on a stock kernel", .enabled(if: stockKernelPresent, "no stock kernel in guests/build/linux: tools/fetch-linux fetches Debian's"), .timeLimit(.minutes(2)))
struct StockKernelInspectTests {
    /// The version, payload and symbol lines; the symbols from the kernel's own tables.
    @Test func inspectShowsVersionPayloadAndSymbols() throws {
        let r = try flowtrace("inspect", stockKernel)
        #expect(r.status == 0, "\(r.stderr)")
        let lines = r.stdout.split(separator: "\n").map(String.init)
        #expect(lines.first == "\(stockKernel): Linux bzImage, boot protocol 2.15; boots with the linux protocol")
        // The header's kernel_version string: Debian's release in it.
        let release = try String(contentsOfFile: Guests.root.appendingPathComponent("guests/build/linux/version").path, encoding: .utf8)
            .trimmingCharacters(in: .whitespacesAndNewlines).replacingOccurrences(of: "linux-image-", with: "")
        #expect(lines.contains { $0.hasPrefix("version: \(release) ") }, "\(lines)")
        #expect(lines.contains { $0.hasPrefix("payload: ") && $0.contains("decompressed an ELF64 vmlinux") })
        let symbolLine = try #require(lines.first { $0.hasPrefix("symbols: ") })
        #expect(symbolLine.contains("from the kernel's own kallsyms tables"))
        let count = try #require(Int(symbolLine.split(separator: " ")[1]))
        // --symbols '*' lists each one as /proc/kallsyms does, ascending.
        let all = try flowtrace("inspect", stockKernel, "--symbols", "*")
        let listed = all.stdout.split(separator: "\n")
        #expect(listed.count == count)
        let addresses = listed.compactMap { UInt64($0.prefix(16), radix: 16) }
        #expect(addresses.count == count && addresses == addresses.sorted())
        let one = try flowtrace("inspect", stockKernel, "--symbols", "do_one_initcall")
        #expect(one.stdout.split(separator: "\n").contains { $0.hasSuffix(" T do_one_initcall") && $0.hasPrefix("ffffffff8") })
        expectOneLineError(try flowtrace("inspect", stockKernel, "--symbols", "no_such_symbol_anywhere"), "--symbols no_such_symbol_anywhere: no symbol of")
    }

    /// KASLR, the CLI path: without nokaslr flowtrace adds it and says so before the run and
    /// after the summary; with it on the command line nothing is added or said. Either way
    /// the entry probe goes past the ftrace site (+0x5 on Debian's 6.1), with its note. (On a host whose KVM runs
    /// CPL0 code slowly the kernel gets nowhere in 2 s: the run times out, exit 124, with
    /// the records, none, written.)
    @Test(.enabled(if: KVMHost.isUsable(), kvmSkipReason))
    func nokaslrIsAddedOrLeftAndSaid() throws {
        let initrd = Guests.root.appendingPathComponent("guests/build/linux/initrd.cpio.gz").path
        let added = "flowtrace: added nokaslr to the kernel command line: probes and symbols use the kernel's link addresses"
        for (line, adds) in [("console=ttyS0 reboot=k panic=-1", true), ("console=ttyS0 nokaslr reboot=k panic=-1", false)] {
            let out = try temporaryFile([], name: "kernel-\(adds).jsonl")
            let r = try flowtrace("run", stockKernel, "--initrd", initrd, "--append", line, "--probe", "do_one_initcall:rdi",
                                  "--timeout", "2", "-o", out)
            #expect(r.status == 124, "\(r.stderr)")
            let err = r.stderr.split(separator: "\n").map(String.init)
            #expect(err.filter { $0 == added }.count == (adds ? 2 : 0), "\(line): \(r.stderr)")
            if adds { #expect(err.first == added) }
            #expect(err.contains { $0.hasPrefix("flowtrace: note: --probe 'do_one_initcall:rdi' goes at do_one_initcall+0x") && $0.contains("just past the ftrace call site") })
            #expect(err.contains { $0.contains("timed out after") })
        }
    }

    /// A symbol file instead of the tables: the names and addresses it gives; bad ones refused.
    @Test func symbolFiles() throws {
        let map = try temporaryFile(Array("ffffffff81000000 T _text\nffffffff81002460 T do_one_initcall\n".utf8), name: "System.map")
        let r = try flowtrace("inspect", stockKernel, "--symbol-file", map, "--symbols", "do_*")
        #expect(r.stdout == "ffffffff81002460 T do_one_initcall\n")
        let zeros = try temporaryFile(Array("0000000000000000 T _text\n".utf8), name: "kallsyms-unprivileged")
        expectOneLineError(try flowtrace("inspect", stockKernel, "--symbol-file", zeros), "every address is 0")
        expectOneLineError(try flowtrace("run", stockKernel, "--symbol-file", "/nonexistent.map"), "symbol file: /nonexistent.map: no such file")
    }
}
