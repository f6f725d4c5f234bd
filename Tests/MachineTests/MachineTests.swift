import ELF
import KVM
import Machine
import Testing
import TestSupport

let kvmUsable = KVMHost.isUsable()
/// Why the KVM tests are skipped, with the error (and its errno) of opening /dev/kvm.
let kvmSkipReason = Comment(rawValue: "needs a usable /dev/kvm: \(KVMHost.unusableReason() ?? "it is usable")")

/// Boots `guest` and runs it to the end (10 s limit).
func boot(_ guest: String, vcpus: Int = 1, memory: UInt64 = MachineConfiguration.defaultMemorySize) throws -> RunResult {
    let m = try Machine(path: Guests.path(guest), configuration: .init(vcpuCount: vcpus, memorySize: memory))
    return try m.run(timeout: .seconds(10))
}

@Suite("guests boot on KVM", .serialized, .enabled(if: kvmUsable, kvmSkipReason), .timeLimit(.minutes(2)))
struct BootTests {
    @Test func counterPrintsItsCallCount() throws {
        let r = try boot("counter")
        #expect(r.ending == .exited(status: 0))
        #expect(r.console == [ConsoleLine(vcpu: 0, text: "counter: 1000 calls, sum 499500")])
    }

    @Test func fibPrintsResultAndCalls() throws {
        let r = try boot("fib")
        #expect(r.ending == .exited(status: 0))
        // fib(15) = 610, entered 2*fib(16)-1 = 1973 times.
        #expect(r.console.map(\.text) == ["fib(15) = 610, calls = 1973"])
    }

    @Test("smp: every vCPU's line arrives whole and the total is right", arguments: [1, 2, 3])
    func smpTotals(_ n: Int) throws {
        let r = try boot("smp", vcpus: n)
        #expect(r.ending == .exited(status: 0))
        for k in 0..<n {
            #expect(r.console.filter { $0.vcpu == k && $0.text.hasPrefix("vcpu") } == [ConsoleLine(vcpu: k, text: "vcpu \(k): \(100 * (k + 1)) units")])
        }
        #expect(r.console.last == ConsoleLine(vcpu: 0, text: "total: \(100 * n * (n + 1) / 2) units on \(n) vcpus"))
        #expect(r.console.count == n + 1)
    }

    @Test func faultReportsTheFaultingInstruction() throws {
        let m = try Machine(path: Guests.path("fault"))
        let r = try m.run(timeout: .seconds(10))
        let faultHere = try #require(m.symbolizer.address(of: "fault_here"))
        guard case let .fault(f) = r.ending else { Issue.record("expected a fault, got \(r.ending)"); return }
        #expect(f.vcpu == 0)
        #expect(f.rip == faultHere)
        #expect(f.location == "fault_here")
        #expect(f.registers?.rip == faultHere)
        #expect([VMExit.shutdown, .internalError(suberror: 1)].contains(f.exit))
        #expect(r.console.map(\.text) == ["fault: executing ud2"])
        #expect(f.description.contains("vCPU 0") && f.description.contains("0x\(String(faultHere, radix: 16))"))
    }

    @Test func exitPortEndsTheGuestWithItsStatus() throws {
        let r = try boot("status")
        #expect(r.ending == .exited(status: 42))
        #expect(r.console.map(\.text) == ["status: exiting with 42"])
    }

    @Test func timeoutStopsEveryVCPU() throws {
        let m = try Machine(path: Guests.path("spin"), configuration: .init(vcpuCount: 2))
        let r = try m.run(timeout: .milliseconds(300))
        #expect(r.ending == .timedOut(.milliseconds(300)))
        // The limit is a lower bound of the run's time (the clock is monotonic).
        #expect(r.elapsed >= .milliseconds(300))
        // Whatever the guest printed came whole and in order.
        #expect(spinConsole(r.console.count) == r.console.map(\.text))
    }

    @Test func stopFromAnotherThread() throws {
        let m = try Machine(path: Guests.path("spin"))
        // Stopped once the guest is known to be running: it printed its 1000-steps line.
        let running = DispatchSemaphore(value: 0)
        Thread { running.wait(); m.stop() }.start()
        let r = try m.run(timeout: .seconds(60)) { line in if line.text == "spin: 1000 steps" { running.signal() } }
        #expect(r.ending == .stopped)
        #expect(r.console.count >= 2 && spinConsole(r.console.count) == r.console.map(\.text))
        let spins = try #require(m.symbolizer.address(of: "spins"))
        #expect(try m.read(virtual: spins, count: 8).reversed().reduce(0) { $0 << 8 | UInt64($1) } >= 1000)
    }

    @Test func aMachineRunsOnce() throws {
        let m = try Machine(path: Guests.path("status"))
        _ = try m.run(timeout: .seconds(10))
        #expect(throws: MachineError.alreadyRan) { try m.run() }
    }

    @Test func guestVirtualReadOfCodeEqualsTheELFBytes() throws {
        let m = try Machine(path: Guests.path("fib"))
        for seg in m.image.segments where seg.fileSize > 0 {
            #expect(try m.read(virtual: seg.virtualAddress, count: Int(seg.fileSize)) == seg.data)
        }
        // bss is zero.
        let calls = try #require(m.image.symbol(named: "fib_calls"))
        #expect(try m.read(virtual: calls.address, count: 8) == [UInt8](repeating: 0, count: 8))
        // After the run, guest memory holds the guest's own count.
        _ = try m.run(timeout: .seconds(10))
        #expect(try m.read(virtual: calls.address, count: 8) == [0xB5, 0x07, 0, 0, 0, 0, 0, 0])  // 1973
    }

    @Test("the loader starts each vCPU at the entry with its index in rdi and its own stack")
    func initialState() throws {
        let m = try Machine(path: Guests.path("fib"), configuration: .init(vcpuCount: 2))
        for v in m.vcpus {
            let r = try v.registers()
            #expect(r.rip == m.image.entry)
            #expect(r.rdi == UInt64(v.id))
            #expect(r.rsi == 2)
            // As after a call: rsp + 8 aligned, the return address the exit stub's.
            #expect(r.rsp == m.layout.stackTop(for: v.id) - 8)
            #expect(try m.memory.read(physical: r.rsp, count: 8) == [0x00, 0x18, 0, 0, 0, 0, 0, 0])
            let s = try v.specialRegisters()
            #expect(s.cr3 == m.layout.cr3)
            #expect(s.efer & 0x500 == 0x500)
            #expect(s.cs.long && s.cs.dpl == 0)
        }
    }

    @Test("single-step walks _start's first instructions (KVM_GUESTDBG_SINGLESTEP)")
    func singleStepFromEntry() throws {
        let m = try Machine(path: Guests.path("fib"))
        let v = m.vcpus[0]
        var dbg = GuestDebug()
        dbg.singleStep = true
        try v.setGuestDebug(dbg)
        var pcs: [UInt64] = []
        for _ in 0..<3 {
            guard case let .debug(exception, pc, _, _) = try v.run() else { Issue.record("expected a debug exit"); return }
            #expect(exception == 1)
            pcs.append(pc)
        }
        // _start: xor ebp,ebp (2 bytes), then call guest_start, then guest_start's first instruction.
        let guestStart = try #require(m.symbolizer.address(of: "guest_start"))
        let second = try instructionAddresses(m.image.path, from: m.image.entry)[1]
        #expect(pcs == [second, guestStart, try instructionAddresses(m.image.path, from: guestStart)[1]])
    }
}

/// The addresses of the instructions objdump shows from `start` on (ground truth for stepping).
private func instructionAddresses(_ path: String, from start: UInt64) throws -> [UInt64] {
    let r = try run("/usr/bin/env", ["objdump", "-d", "--start-address=0x\(String(start, radix: 16))",
                                     "--stop-address=0x\(String(start + 32, radix: 16))", path])
    return objdumpInstructions(r.stdout)
}

@Suite("bad machine configurations", .enabled(if: kvmUsable, kvmSkipReason))
struct BadConfigurationTests {
    @Test func vcpuCountOutOfRange() throws {
        let path = try Guests.path("fib")
        let max = try KVMHost().maxVCPUs()
        #expect(throws: MachineError.vcpuCount(0, maximum: max)) { try Machine(path: path, configuration: .init(vcpuCount: 0)) }
        #expect(throws: MachineError.vcpuCount(max + 1, maximum: max)) {
            try Machine(path: path, configuration: .init(vcpuCount: max + 1))
        }
        #expect(MachineError.vcpuCount(0, maximum: max).description == "--vcpus 0: must be between 1 and \(max) (this host's KVM maximum)")
    }

    @Test func memorySizes() throws {
        let path = try Guests.path("fib")
        #expect(throws: MachineError.memorySize(1 << 20, reason: "is too small: the loader needs at least 2M")) {
            try Machine(path: path, configuration: .init(memorySize: 1 << 20))
        }
        #expect(throws: MachineError.memorySize(3 << 20, reason: "must be a multiple of 2M (RAM is mapped with 2 MiB pages)")) {
            try Machine(path: path, configuration: .init(memorySize: 3 << 20))
        }
        #expect(try boot("fib", memory: 2 << 20).ending == .exited(status: 0))
    }

    /// fib.elf with every segment and the entry moved by `delta`.
    func movedFib(by delta: UInt64) throws -> String {
        var b = try [UInt8](contentsOf: Guests.path("fib"))
        b.put64(b.get64(at: 24) &+ delta, at: 24)
        let phoff = Int(b.get64(at: 32)), phentsize = Int(b.get16(at: 54)), phnum = Int(b.get16(at: 56))
        for i in 0..<phnum {
            let o = phoff + i * phentsize
            b.put64(b.get64(at: o + 16) &+ delta, at: o + 16)
            b.put64(b.get64(at: o + 24) &+ delta, at: o + 24)
        }
        return try temporaryFile(b, name: "fib-moved-\(delta).elf")
    }

    @Test func memoryTooSmallForTheImageSaysHowMuch() throws {
        let path = try Guests.path("fib-high")   // linked at 5 MiB
        #expect(throws: MachineError.memoryTooSmall(path: path, given: 2 << 20, needed: 6 << 20)) {
            try Machine(path: path, configuration: .init(memorySize: 2 << 20))
        }
        let r = try Machine(path: path, configuration: .init(memorySize: 6 << 20)).run(timeout: .seconds(10))
        #expect(r.console.map(\.text) == ["fib(15) = 610, calls = 1973"])
    }

    @Test func segmentOutsideGuestRAM() throws {
        let high = try movedFib(by: 0xFFFF_FFFF_0000_0000)
        #expect { try Machine(path: high) } throws: { e in
            guard case let .segmentOutsideRAM(p, 0, start, _, _) = e as? MachineError else { return false }
            return p == high && start == 0xFFFF_FFFF_0010_0000
        }
        let low = try movedFib(by: UInt64(bitPattern: -0xF_8000))  // 0x8000: on the loader's tables
        #expect { try Machine(path: low) } throws: { e in
            guard case .segmentOutsideRAM(low, 0, 0x8000, _, _) = e as? MachineError else { return false }
            return true
        }
    }

    @Test func memorySizeParsing() throws {
        #expect(try parseMemorySize("64M") == 64 << 20)
        #expect(try parseMemorySize("64MiB") == 64 << 20)
        #expect(try parseMemorySize("1g") == 1 << 30)
        #expect(try parseMemorySize("4096") == 4096)
        #expect(throws: MachineError.invalidMemorySize("lots")) { try parseMemorySize("lots") }
        #expect(throws: MachineError.invalidMemorySize("0")) { try parseMemorySize("0") }
    }
}

extension Array where Element == UInt8 {
    init(contentsOf path: String) throws {
        self = try [UInt8](Data(contentsOf: URL(fileURLWithPath: path)))
    }
}

import Foundation

/// The first `n` lines spin prints: its start, after 1000 steps, then every 5000 steps.
func spinConsole(_ n: Int) -> [String] {
    Array((["spin: looping forever", "spin: 1000 steps"] + (1...max(1, n)).map { "spin: \($0 * 5000) steps" }).prefix(n))
}
