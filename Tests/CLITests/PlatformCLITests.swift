import Foundation
import KVM
import Machine
import Testing
import TestSupport

@Suite("flowtrace run --platform and --serial", .serialized, .enabled(if: KVMHost.isUsable(), kvmSkipReason), .timeLimit(.minutes(3)))
struct PlatformCLITests {
    /// The handler's probe: one record per tick, rdi = the tick number; the guest's own
    /// count on COM1 agrees; the run exits with the guest's status.
    @Test func timerGuestTracedOnThePC() throws {
        let out = try temporaryFile([], name: "timer.jsonl")
        let r = try flowtrace("run", Guests.path("timer"), "--platform", "pc", "--probe", "timer_tick:rdi", "-o", out, "--timeout", "30")
        #expect(r.status == 0x54)
        #expect(r.stdout == "timer: 20 ticks, sum 210\n")
        let lines = try String(contentsOfFile: out, encoding: .utf8).split(separator: "\n")
        #expect(lines.count == 20)
        for (i, l) in lines.enumerated() { #expect(l.contains("\"values\":{\"rdi\":\"0x\(String(i + 1, radix: 16))\"}"), "\(l)") }
        #expect(r.stderr.contains("timer.elf: guest exited with status 84 after "))
    }

    @Test func serialStdioFeedsTheGuest() throws {
        let r = try run(Guests.flowtrace, ["run", Guests.path("echo"), "--platform", "pc", "--serial", "stdio", "--timeout", "30"],
                        input: Data("hello from stdin\nmore\n".utf8))
        #expect(r.status == 0x45)
        #expect(r.stdout == "echo: ready\necho: 16 bytes: hello from stdin\n")
    }

    /// Input that never completes the guest's line: the timeout ends the run, the pump
    /// thread stops with it (no hang), the status says timeout.
    @Test func serialStdioStopsWithTheRun() throws {
        let r = try run(Guests.flowtrace, ["run", Guests.path("echo"), "--platform", "pc", "--serial", "stdio", "--timeout", "1"],
                        input: Data("no newline".utf8))
        #expect(r.status == 124)
        #expect(r.stdout == "echo: ready\n")
    }

    @Test func serialFileGetsTheRawBytes() throws {
        let path = try temporaryFile(Array("old contents".utf8), name: "serial.txt")
        let r = try flowtrace("run", Guests.path("com1"), "--serial", "file:\(path)")
        #expect(r.status == 0)
        #expect(r.stdout == "")
        #expect(try String(contentsOfFile: path, encoding: .utf8) == "hello on COM1\r\nsecond line\r\n")
    }

    @Test func badSerialAndPlatformOptions() throws {
        expectOneLineError(try flowtrace("run", Guests.path("com1"), "--serial", "tty"), "--serial 'tty': expected none, stdio or file:PATH")
        expectOneLineError(try flowtrace("run", Guests.path("com1"), "--serial", "file:/nonexistent-dir/x"), "--serial file:/nonexistent-dir/x: cannot write")
        let p = try flowtrace("run", Guests.path("com1"), "--platform", "isa")
        #expect(p.status == 64)
        #expect(p.stderr.contains("isa"))
        expectOneLineError(try flowtrace("run", Guests.path("fib"), "--platform", "pc", "--engine", "hlt", "--probe", "fib"),
                           "--engine hlt: does not work on the pc platform")
    }

    @Test func resetEndsTheRunWithStatusZero() throws {
        let r = try flowtrace("run", Guests.path("reset"))
        #expect(r.status == 0)
        #expect(r.stdout == "reset: rebooting through the i8042\n")
        #expect(r.stderr.hasPrefix("flowtrace: reset.elf: guest reset (i8042) after "))
        let t = try flowtrace("run", Guests.path("fault"), "--platform", "pc")
        #expect(t.status == 0)
        #expect(t.stderr.contains("fault.elf: guest reset (triple fault) after "))
    }

    @Test func summaryListsUnknownDevices() throws {
        let r = try flowtrace("run", Guests.path("unknown"), "--platform", "pc")
        #expect(r.status == 0x55)
        let lines = r.stderr.split(separator: "\n").map(String.init)
        #expect(lines.first == "flowtrace: the guest touched 3 ports and 1 MMIO address no device answers (reads gave all ones, writes went nowhere):")
        #expect(lines.count == 6)
        let expected = ["port 0x201: first read (1 byte) on vCPU 0 at ", "port 0x2f8: first write (1 byte) on vCPU 0 at ",
                        "port 0x2fd: first read (1 byte) on vCPU 0 at ", "MMIO 0xfed00000: first read (4 bytes) on vCPU 0 at "]
        for (l, e) in zip(lines.dropFirst(), expected) {
            #expect(l.hasPrefix("  " + e), "\(l)")
            #expect(l.contains("(guest_main+0x"), "\(l)")
        }
        #expect(lines[3].hasSuffix(", 2 accesses"))
    }

    /// doctor's platform table agrees with the self-test less each platform's restrictions.
    @Test func doctorShowsEnginesPerPlatform() throws {
        let r = try flowtrace("doctor")
        let support = EngineSelfTest.support(host: try KVMHost())
        for p in Platform.allCases {
            let engines = BreakpointEngine.allCases.filter(support.restricted(to: p).works).map(\.rawValue).joined(separator: ", ")
            #expect(r.stdout.split(separator: "\n").contains { $0.hasPrefix("  \(p.rawValue)") && $0.contains(" \(engines.isEmpty ? "none" : engines) ") })
        }
        #expect(r.stdout.contains("KVM_CAP_IRQCHIP"))
        #expect(r.stdout.contains("pc, 1 location"))
    }
}
