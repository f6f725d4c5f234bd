import ELF
import FlowTrace
import Foundation
import KVM
import Machine
import Testing
import TestSupport

/// The engines that can work on the pc platform here (the host's, less hlt).
let pcEngines: [BreakpointEngine] = workingEngines.filter { Platform.pc.restriction($0) == nil }

func pcMachine(_ guest: String, engine: EngineRequest = .auto, vcpus: Int = 1) throws -> Machine {
    try Machine(path: Guests.path(guest), configuration: .init(vcpuCount: vcpus, engine: engine, platform: .platform(.pc)))
}

@Suite("the pc platform: interrupts, timers, serial port, resets", .serialized, .enabled(if: kvmUsable, kvmSkipReason), .timeLimit(.minutes(3)))
struct PlatformTests {
    /// The guest's own count (its console line) is the ground truth: 20 ticks, sum 1..20.
    @Test func picAndPITTimerTicks() throws {
        let m = try pcMachine("timer")
        #expect(m.platform == .pc)
        let r = try m.run(timeout: .seconds(20))
        #expect(r.ending == .exited(status: 0x54))
        #expect(r.console == [ConsoleLine(vcpu: 0, text: "timer: 20 ticks, sum 210", source: .serial)])
    }

    @Test func localAPICTimerThroughItsMMIOPage() throws {
        let r = try pcMachine("apic-timer").run(timeout: .seconds(20))
        #expect(r.ending == .exited(status: 0x41))
        #expect(r.console.map(\.text) == ["apic-timer: 20 ticks, sum 210, spurious 0, apic id 0"])
    }

    /// A probe inside the interrupt handler sees every tick, in order, on every engine the
    /// host offers on this platform; the guest still counts 20.
    @Test("probes in an interrupt handler count exactly", .enabled(if: !pcEngines.isEmpty, "no engine works on the pc platform here"),
          arguments: pcEngines)
    func probesInTheTimerHandler(_ engine: BreakpointEngine) throws {
        for (guest, function) in [("timer", "timer_tick"), ("apic-timer", "apic_tick")] {
            let m = try pcMachine(guest, engine: .engine(engine))
            let module = try TraceModule(target: m)
            let address = try #require(m.symbolizer.address(of: function))
            try module.addProbe(Probe(function, entries: [reg("rdi")]), at: address)
            try module.enable()
            let r = try m.run(timeout: .seconds(60))
            #expect(r.ending == .exited(status: guest == "timer" ? 0x54 : 0x41))
            #expect(r.console.first?.text.hasPrefix("\(guest): 20 ticks, sum 210") == true)
            let ticks = module.report().map { u64($0.values[0]) }
            #expect(ticks == (1...20).map { UInt64($0) }, "\(guest) under \(engine)")
        }
    }

    /// Ticks land anywhere while busy_step runs with interrupts on; the step over the
    /// probed instruction keeps them out (BLOCKIRQ, or the interrupt-shadow fallback), so
    /// every after-hit is at the next instruction, and the handler's probe agrees with the
    /// guest's own tick count.
    @Test("step-overs keep interrupts out", .enabled(if: !pcEngines.filter { $0 != .step }.isEmpty, "neither hw nor int3 works here"),
          arguments: pcEngines.filter { $0 != .step }, [StepInterruptBlocking.auto, .interruptShadow])
    func stepOversKeepInterruptsOut(_ engine: BreakpointEngine, _ blocking: StepInterruptBlocking) throws {
        let path = try Guests.path("busy")
        let next = try instructionAfter(try #require(ELFImage(path: path).symbol(named: "busy_step")).address, in: path)
        let m = try Machine(path: path, configuration: .init(engine: .engine(engine), platform: .platform(.pc), stepInterrupts: blocking))
        if blocking == .interruptShadow { #expect(m.stepInterruptBlocking == "an STI interrupt shadow") }
        let module = try TraceModule(target: m)
        let busy = try #require(m.symbolizer.address(of: "busy_step"))
        try module.addProbe(Probe("busy", entries: [reg("rip")]), at: busy, timing: .after)
        try module.addProbe(Probe("tick", entries: [reg("rdi")]), at: try #require(m.symbolizer.address(of: "timer_tick")))
        try module.enable()
        let r = try m.run(timeout: .seconds(120))
        #expect(r.ending == .exited(status: 0x62))
        let line = try #require(r.console.first?.text)
        #expect(line.hasPrefix("busy: 2000 steps, work 1999000, ticks "))
        let ticks = try #require(UInt64(line.split(separator: " ").last ?? ""))
        let report = module.report()
        let afters = report.filter { $0.address == busy }
        #expect(afters.count == 2000)
        #expect(afters.filter { u64($0.values[0]) != next }.count == 0, "after-hits not at the next instruction")
        #expect(report.filter { $0.address != busy }.map { u64($0.values[0]) } == (0..<ticks).map { $0 + 1 })
        #expect(ticks > 0)
    }

    /// A probe on the idle loop's own hlt (in sti's interrupt shadow): flowtrace does the
    /// hlt (rip past it, the vCPU halted in KVM, the shadow over) instead of stepping it,
    /// so each hlt waits for exactly one tick: 20 hits before and after, the guest exact.
    /// (The step engine single-steps the hlt, which on some hosts returns at once: there
    /// the guest's own count and the tick probe are checked, the hlt's hits only seen.)
    @Test("a probe on the idle loop's hlt", .enabled(if: !pcEngines.isEmpty, "no engine works on the pc platform here"), arguments: pcEngines)
    func probeOnTheIdleHlt(_ engine: BreakpointEngine) throws {
        let path = try Guests.path("timer")
        let main = try #require(ELFImage(path: path).symbol(named: "guest_main"))
        let listing = try run("/usr/bin/env", ["objdump", "-d", "--no-show-raw-insn", "--start-address=0x\(String(main.address, radix: 16))",
                                               "--stop-address=0x\(String(main.address + main.size, radix: 16))", path]).stdout
        let hltLine = try #require(listing.split(separator: "\n").first { $0.hasSuffix("\thlt") || $0.contains("\thlt ") })
        let hlt = try #require(UInt64(hltLine.split(separator: ":")[0].trimmingCharacters(in: .whitespaces), radix: 16))
        for timing in [ProbeTiming.before, .after] {
            let m = try pcMachine("timer", engine: .engine(engine))
            let module = try TraceModule(target: m)
            try module.addProbe(Probe("hlt", entries: [reg("rip")]), at: hlt, timing: timing)
            try module.addProbe(Probe("tick", entries: [reg("rdi")]), at: try #require(m.symbolizer.address(of: "timer_tick")))
            try module.enable()
            let r = try m.run(timeout: .seconds(60))
            #expect(r.ending == .exited(status: 0x54), "\(engine) \(timing)")
            #expect(r.console.map(\.text) == ["timer: 20 ticks, sum 210"], "\(engine) \(timing)")
            let report = module.report()
            #expect(report.filter { $0.address != hlt }.map { u64($0.values[0]) } == (1...20).map { UInt64($0) })
            let hlts = report.filter { $0.address == hlt }
            if engine != .step {
                #expect(hlts.count == 20, "\(engine) \(timing)")
                #expect(hlts.allSatisfy { u64($0.values[0]) == (timing == .before ? hlt : hlt + 1) }, "\(engine) \(timing)")
            } else {
                // A stepped hlt may return at once, and an interrupt may come between the
                // steps: the hlt is seen, not counted per tick.
                #expect(!hlts.isEmpty)
            }
        }
    }

    /// The guest's driver finds a 16550A (Linux's checks) and sends its message a byte per
    /// THR-empty interrupt; a probe on the handler agrees with the guest's interrupt count.
    @Test func serialPortProbeAndInterruptDrivenOutput() throws {
        let m = try pcMachine("serial")
        let module = try TraceModule(target: m)
        try module.addProbe(Probe("irq", entries: [reg("rdi")]), at: try #require(m.symbolizer.address(of: "uart_interrupt_hit")))
        try module.enable()
        let r = try m.run(timeout: .seconds(20))
        #expect(r.ending == .exited(status: 0x53))
        let lines = r.console.map(\.text)
        #expect(lines.count == 3)
        #expect(lines.prefix(2) == ["serial: scratch ok, loopback ok, 16550A", "interrupt-driven output on COM1"])
        let message = "interrupt-driven output on COM1\n"
        let interrupts = module.report().count
        #expect(interrupts >= 1)
        #expect(lines.last == "serial: sent \(message.utf8.count) bytes from \(interrupts) interrupts")
        #expect(module.report().map { u64($0.values[0]) } == (1...interrupts).map { UInt64($0) })
        #expect(m.unknownAccesses == [])
    }

    /// Input through the receiver interrupt: bytes given to the UART arrive in order.
    @Test func serialInputThroughReceiveInterrupts() throws {
        let m = try pcMachine("echo")
        let text = Array("typed on the host\n".utf8)
        let uart = m.uart
        // Fed from another thread as --serial stdio does: taken once the driver is ready.
        let feeder = Thread {
            var rest = text[...]
            while !rest.isEmpty {
                rest = rest.dropFirst(uart.receive(rest))
                if !rest.isEmpty { _ = uart.waitForRoom(orUntil: { false }) }
            }
        }
        feeder.start()
        let r = try m.run(timeout: .seconds(20))
        #expect(r.ending == .exited(status: 0x45))
        #expect(r.console.map(\.text) == ["echo: ready", "echo: 17 bytes: typed on the host"])
    }

    @Test func i8042ResetEndsTheRun() throws {
        for platform in Platform.allCases {
            let m = try Machine(path: Guests.path("reset"), configuration: .init(platform: .platform(platform)))
            let r = try m.run(timeout: .seconds(10))
            #expect(r.ending == .reset("i8042"))
            #expect(r.ending.description == "guest reset (i8042)")
            #expect(r.console == [ConsoleLine(vcpu: 0, text: "reset: rebooting through the i8042", source: .serial)])
        }
    }

    /// A triple fault resets a PC; on the payload platform it stays a fault (see BootTests).
    @Test func tripleFaultResetsThePC() throws {
        let r = try pcMachine("fault").run(timeout: .seconds(10))
        #expect(r.ending == .reset("triple fault"))
        #expect(r.console.map(\.text) == ["fault: executing ud2"])
    }

    /// Reads of absent devices give all ones (the guest prints them) and the machine lists
    /// each address once with its first access and the count.
    @Test func unknownPortsAndMMIOAreListed() throws {
        let m = try pcMachine("unknown")
        let r = try m.run(timeout: .seconds(10))
        #expect(r.ending == .exited(status: 0x55))
        #expect(r.console.map(\.text) == ["unknown: com2 255 255, game port 255, hpet 4294967295"])
        let u = m.unknownAccesses
        #expect(u.map(\.address) == [0x201, 0x2F8, 0x2FD, 0xFED0_0000])
        #expect(u.map(\.space) == [.port, .port, .port, .mmio])
        #expect(u.map(\.count) == [1, 1, 2, 1])
        #expect(u.map(\.isWrite) == [false, true, false, false])
        let main = try #require(m.symbolizer.address(of: "guest_main"))
        let size = try #require(m.image.symbol(named: "guest_main")).size
        #expect(u.allSatisfy { $0.rip >= main && $0.rip < main + size && $0.vcpu == 0 })
    }

    /// COM1 output without any set-up prints on both platforms.
    @Test func polledCOM1OutputOnBothPlatforms() throws {
        for platform in Platform.allCases {
            let m = try Machine(path: Guests.path("com1"), configuration: .init(platform: .platform(platform)))
            let r = try m.run(timeout: .seconds(10))
            #expect(r.ending == .exited(status: 0))
            #expect(r.console == [ConsoleLine(vcpu: 0, text: "hello on COM1", source: .serial),
                                  ConsoleLine(vcpu: 0, text: "second line", source: .serial)])
        }
    }

    @Test func serialOutputToASink() throws {
        let bytes = LockedBox<[UInt8]>([])
        let sink = SerialSink { b in bytes.modify { $0.append(b) } }
        let m = try Machine(path: Guests.path("com1"), configuration: .init(serial: .sink(sink)))
        let r = try m.run(timeout: .seconds(10))
        #expect(r.ending == .exited(status: 0))
        #expect(r.console == [])
        #expect(String(decoding: bytes.get(), as: UTF8.self) == "hello on COM1\r\nsecond line\r\n")
    }

    /// hlt never exits with the in-kernel irqchip: the engine is refused there, by name,
    /// and auto never picks it.
    @Test func hltEngineIsUnavailableOnThePC() throws {
        let e = #expect(throws: MachineError.self) { try pcMachine("fib", engine: .engine(.hlt)) }
        #expect(e?.description.hasPrefix("--engine hlt: does not work on the pc platform: KVM's in-kernel irqchip handles hlt itself") == true)
        let m = try pcMachine("fib")
        #expect(m.engineSupport.status(.hlt) == .unavailable(Platform.pc.restriction(.hlt)!))
        if pcEngines.isEmpty {
            #expect(throws: MachineError.self) { try EngineRequest.auto.resolve(locations: 1, support: m.engineSupport) }
        } else {
            let (e, _) = try EngineRequest.auto.resolve(locations: 1, support: m.engineSupport)
            #expect(e != .hlt)
        }
        // The payload platform keeps whatever the host gives it.
        let p = try Machine(path: Guests.path("fib"))
        #expect(p.platform == .payload)
        #expect(p.engineSupport == hostSupport)
    }
}
