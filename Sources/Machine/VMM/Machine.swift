import Devices
import ELF
import FlowTrace
import Foundation
import FlowGraph
import KVM
import Locking
import Synchronization

/// The armed breakpoints as one immutable value: replaced whole while every vCPU is
/// parked (arming, disarming), read by vCPU threads at exits without a lock.
final class BreakpointTable: Sendable {
    let value: Breakpoints
    init(_ value: Breakpoints) { self.value = value }
}

/// A runnable guest: a VM with its RAM, devices and vCPUs, booted from an image; the target
/// trace modules arm their probes on. A thin façade over the parts (see the README's
/// folder map): `Boot` made its memory and vCPU state, `Platform` its irqchip, CPUID and
/// devices, `VMM` runs one thread per vCPU and turns exits into outcomes, `Debug` arms the
/// breakpoint engines and steps over probed instructions.
///
/// Ports on both platforms: bytes written to 0xE9 are console output; a 32-bit write to
/// 0xF4 ends the guest with that status; COM1 (0x3F8) is a 16550A UART; 0x64 command 0xFE
/// resets. On the payload platform there is no interrupt controller and `hlt` ends the
/// vCPU that executes it (the guest ends with status 0 when all have); on the pc platform
/// KVM's irqchip and PIT deliver interrupts and `hlt` waits for one inside KVM.
public final class Machine: TraceTarget {
    /// What was loaded: the payload's ELF file, a kernel ELF, or a bzImage's protected-mode
    /// code (segments at physical addresses, no symbols).
    public let image: ELFImage
    /// The protocol the guest was booted with.
    public let bootProtocol: BootProtocol
    public let configuration: MachineConfiguration
    public let layout: BootLayout
    public let platform: Platform
    public let symbolizer: Symbolizer
    /// Where flowtrace put its GDT, boot information and boot stack when the kernel loads
    /// below 1 MiB, where they usually are (nil: the usual place, 0x1000-0x30000).
    public let movedBootArea: KernelBootArea?
    public let vm: VirtualMachine
    public let memory: GuestMemory
    public let vcpus: [VCPU]
    /// Which engines work on this host and platform (the per-process self-test, then the
    /// platform's restrictions).
    public let engineSupport: EngineSupport
    /// Whether the host can block interrupts during single steps (`KVM_GUESTDBG_BLOCKIRQ`).
    public let blocksInterruptsWhileStepping: Bool
    /// How step-overs keep interrupts out here (see `StepInterruptBlocking`).
    public var stepInterruptBlocking: String {
        switch stepOver.interrupts {
        case .blockIRQ: "KVM_GUESTDBG_BLOCKIRQ"
        case .interruptShadow: "an STI interrupt shadow"
        case .none: "nothing"
        }
    }

    public static let consolePort: UInt16 = DebugConsole.port
    public static let exitPort: UInt16 = ExitPort.port

    let devices: PlatformDevices
    let exits: ExitHandler
    let console: Console
    private let consoleSink = Locked<(@Sendable (ConsoleLine) -> Void)?>(nil)

    let events = ConditionLock(Events())
    let stopRequested = Atomic<Bool>(false)
    private let started = Atomic<Bool>(false)
    /// The breakpoint table vCPU threads read; replaced only while every vCPU is parked.
    let table = QuiescentBox(BreakpointTable(Breakpoints()))
    /// The same table for other threads, and the lock arming holds while it patches guest
    /// bytes, so `readCode` sees bytes and patches that agree.
    let published = Locked(BreakpointTable(Breakpoints()))
    let pendingDisarms = Locked<[TraceModule]>([])
    /// Software probes wait for this (see `deferSoftwareProbes`).
    let probeGate = Locked<ProbeGate?>(nil)
    /// Set once a vCPU reached the gate: later arming patches at once.
    let gatePassed = Atomic<Bool>(false)
    /// Probes that were lost, and why (the guest rewrote their code, or they could not be
    /// armed at the gate).
    let lost = Locked<[LostProbe]>([])
    let hasPendingDisarms = Atomic<Bool>(false)
    /// Per vCPU: the step engine was just armed; check the current rip for a before-hit.
    let ripChecks: Locked<[Bool]>
    let rendezvous: Rendezvous
    /// The exits of vCPU threads that left their loop.
    let exitTally = Locked(ExitTally())
    /// Per vCPU, updated at every exit on its thread: the exits so far and rip at the last
    /// one (for a live progress display; the tally above is merged only at the end).
    final class LiveExits: Sendable {
        let exits = Atomic<UInt64>(0)
        let rip = Atomic<UInt64>(0)
    }
    let live: [LiveExits]
    /// Whether the guest can never run again (pc platform; see `HaltCensus`).
    let census: HaltCensus
    let snapshots: [VCPUSnapshot]
    private let clock = ContinuousClock()
    private let startTime = Locked<ContinuousClock.Instant?>(nil)
    /// The run's time limit: when it ends (on the monotonic clock) and the limit given.
    private let limit = Locked<(deadline: ContinuousClock.Instant, timeout: Duration)?>(nil)
    /// The runner threads, joined when the run ends.
    private let threads = Locked<[JoinableThread]>([])
    /// Stepping over probed instructions (the Debug part).
    let stepOver: StepOver

    /// Tests only: `hook` is called on a vCPU's thread (with its id) right after it began an
    /// out-of-line step, before it runs the copy; lets a test place a disarm exactly there.
    func onOutOfLineStepBegun(_ hook: @escaping @Sendable (Int) -> Void) {
        stepOver.begun.withLock { $0 = hook }
        stepOver.hasHook.store(true, ordering: .releasing)
    }

    /// Tests only: whether a vCPU or the controller holds or is taking the rendezvous.
    var rendezvousIsHeld: Bool { rendezvous.isHeld }

    /// Tests only: vCPU threads still in their loop.
    var runningVCPUs: Int { events.withLock { $0.running } }

    /// This machine's number in the process: its vCPU threads are named `vcpuN-mSERIAL`.
    let serial = Machine.machines.add(1, ordering: .relaxed).newValue
    private static let machines = Atomic<Int>(0)

    struct Events {
        var ending: RunEnding?
        var halt: HaltStop?
        /// vCPU threads still in their loop.
        var running = 0
        /// vCPUs that ended with the guest's own hlt.
        var halted = 0
    }

    /// The serial port on COM1: `receive` feeds it input (`--serial stdio`).
    public var uart: UART16550 { devices.uart }

    /// Ports and MMIO addresses the guest touched where no device answers, each with its
    /// first access.
    public var unknownAccesses: [UnknownAccesses.Access] { devices.unknown.all }

    /// Boots the payload `image` in a new VM. Errors name the offending file or value.
    public convenience init(image: ELFImage, configuration: MachineConfiguration = .init(), host: KVMHost? = nil) throws(MachineError) {
        try self.init(boot: { () throws(MachineError) in
            .payload(try PayloadBoot(image: image, memorySize: configuration.memorySize, vcpuCount: configuration.vcpuCount))
        }, configuration: configuration, host: host)
    }

    /// Boots `kernel` with the protocol `configuration.boot` resolves to. Errors name the
    /// offending file or value.
    public convenience init(kernel: KernelImage, configuration: MachineConfiguration = .init(), host: KVMHost? = nil) throws(MachineError) {
        let p = try kernel.resolve(configuration.boot)
        if p == .payload {
            guard let elf = kernel.elf else { throw MachineError.notBootable(path: kernel.path, found: kernel.kind) }
            try self.init(image: elf, configuration: configuration, host: host)
            return
        }
        if case .platform(.payload) = configuration.platform {
            throw MachineError.unbootable(path: kernel.path, protocol: p, reason: "kernels need the pc platform (interrupt controller, timer); drop --platform payload")
        }
        try self.init(boot: { () throws(MachineError) in
            .kernel(try KernelBoot(kernel: kernel, protocol: p, files: configuration.files,
                                   memorySize: configuration.memorySize, vcpuCount: configuration.vcpuCount))
        }, configuration: configuration, host: host)
    }

    /// `makeBoot` runs once the host and the vCPU count checked out.
    private init(boot makeBoot: () throws(MachineError) -> Boot, configuration: MachineConfiguration, host: KVMHost?) throws(MachineError) {
        let kvmHost: KVMHost
        if let host { kvmHost = host } else {
            do throws(KVMError) { kvmHost = try KVMHost() } catch { throw .kvm(error) }
        }
        let host = kvmHost
        let n = configuration.vcpuCount
        let maximum: Int
        do throws(KVMError) { maximum = try host.maxVCPUs() } catch { throw .kvm(error) }
        guard n >= 1, n <= maximum else { throw MachineError.vcpuCount(n, maximum: maximum) }
        let boot = try makeBoot()
        let platform = configuration.platform.resolve(needed: boot.platform)
        if case .payload = boot, platform == .pc, configuration.memorySize > KernelLayout.pciHoleStart {
            throw MachineError.memorySize(configuration.memorySize, reason: "is too much for a payload on the pc platform: its RAM must end below the device window at \(formatSize(KernelLayout.pciHoleStart))")
        }
        let support = EngineSelfTest.support(host: host).restricted(to: platform)
        if case let .engine(e) = configuration.engine, case let .unavailable(why) = support.status(e) {
            throw MachineError.engineUnavailable(e, reason: why, working: BreakpointEngine.allCases.filter { support.works($0) }.map(\.rawValue))
        }
        let vm: VirtualMachine, memory: GuestMemory
        var vcpus: [VCPU] = []
        do throws(KVMError) {
            blocksInterruptsWhileStepping = try host.blocksInterruptsWhileStepping()
            vm = try host.makeVirtualMachine()
            try PlatformSetup.configure(vm, for: platform)
            memory = try GuestMemory(size: configuration.memorySize, holeStart: platform == .pc ? KernelLayout.pciHoleStart : nil)
            try boot.load(into: memory, platform: platform)
            try vm.map(memory)
            // VMX/SVM hosts refuse long mode unless the guest's CPUID says it has it.
            let cpuid = try host.supportedCPUID().entries
            for i in 0..<n {
                let v = try vm.makeVCPU(id: i)
                try PlatformSetup.configure(v, index: i, count: n, hostCPUID: cpuid, platform: platform)
                try boot.setInitialState(of: v, index: i)
                // With the in-kernel LAPIC, KVM creates application processors waiting for
                // INIT/SIPI; a payload starts every vCPU at its entry, so they start runnable.
                if case .payload = boot, platform == .pc, i > 0 { try v.setMPState(0) }
                vcpus.append(v)
            }
        } catch {
            throw .kvm(error)
        }
        let sink = consoleSink
        let console = Console(vcpuCount: n) { line in sink.withLock { $0 }?(line) }
        let devices = try PlatformDevices(platform: platform, console: console, serial: configuration.serial,
                                          memorySize: configuration.memorySize, vm: vm, extra: configuration.devices)
        self.image = boot.image
        self.bootProtocol = boot.bootProtocol
        self.movedBootArea = boot.movedBootArea
        self.configuration = configuration
        self.layout = boot.layout
        self.platform = platform
        self.symbolizer = Symbolizer(symbols: configuration.symbols.isEmpty ? boot.image.symbols : configuration.symbols)
        self.live = (0..<n).map { _ in LiveExits() }
        self.vm = vm
        self.memory = memory
        self.vcpus = vcpus
        self.engineSupport = support
        self.console = console
        self.devices = devices
        exits = ExitHandler(platform: platform, ports: devices.ports, mmio: devices.mmio, unknown: devices.unknown,
                            interruptLines: devices.interruptLines)
        snapshots = vcpus.map { VCPUSnapshot(vcpu: $0, memory: memory) }
        ripChecks = Locked(Array(repeating: false, count: n))
        census = HaltCensus(vcpus: n)
        let kickable = vcpus
        let rendezvous = Rendezvous(vcpus: n) { kickable[$0].kick() }
        self.rendezvous = rendezvous
        let mode: StepInterruptMode = switch (platform.hasInterruptController, configuration.stepInterrupts) {
        case (false, _), (true, .none): .none
        case (true, .interruptShadow): .interruptShadow
        case (true, .auto): blocksInterruptsWhileStepping ? .blockIRQ : .interruptShadow
        }
        stepOver = StepOver(memory: memory, layout: boot.layout, rendezvous: rendezvous, interrupts: mode)
    }

    /// Loads the payload or kernel at `path` and builds a machine for it.
    public convenience init(path: String, configuration: MachineConfiguration = .init(), host: KVMHost? = nil) throws(MachineError) {
        try self.init(kernel: try KernelImage(path: path), configuration: configuration, host: host)
    }

    /// Reads guest-virtual memory through the boot page tables.
    public func read(virtual address: UInt64, count: Int) throws(KVMError) -> [UInt8] {
        try memory.read(virtual: address, count: count, cr3: layout.cr3)
    }

    /// Guest-virtual memory as the guest's code is without probes: the original bytes where
    /// the patching engines put a trap byte.
    public func readCode(virtual address: UInt64, count: Int) throws(KVMError) -> [UInt8] {
        // Under the lock arming holds while it patches, so bytes and patch table agree.
        try published.withLock { (t: inout BreakpointTable) throws(KVMError) -> [UInt8] in
            var bytes = try memory.read(virtual: address, count: count, cr3: layout.cr3)
            for k in bytes.indices {
                if let original = t.value.patches.original(at: address &+ UInt64(k)) { bytes[k] = original }
            }
            return bytes
        }
    }

    /// The breakpoint table as the vCPU threads see it (they, and a controller holding
    /// the rendezvous, may read it this way).
    var current: Breakpoints { table.current.value }

    /// Replaces the breakpoint table (`updateTable` holds `published` and passes its value):
    /// only while every vCPU is parked.
    func publish(_ b: Breakpoints, into p: inout BreakpointTable) {
        let t = BreakpointTable(b)
        table.replace(t)
        p = t
    }

    /// How the patching engines stepped over probed instructions so far: out of line (the
    /// other vCPUs ran on) or in place (the other vCPUs were held for the step).
    public var stepOvers: (outOfLine: UInt64, inPlace: UInt64) {
        (stepOver.outOfLine.load(ordering: .relaxed), stepOver.inPlace.load(ordering: .relaxed))
    }

    /// While the guest runs, from any thread: the exits every vCPU has taken so far, and
    /// where vCPU 0 was at its last exit (nil before its first, or where the host has no
    /// register sync).
    public var liveProgress: (exits: UInt64, vcpu0: (rip: UInt64, location: String)?) {
        let exits = live.reduce(0) { $0 + $1.exits.load(ordering: .relaxed) }
        let rip = live.first?.rip.load(ordering: .relaxed) ?? 0
        return (exits, rip == 0 ? nil : (rip, symbolizer.describe(rip)))
    }

    /// The engine armed probes use and why it was chosen (nil while none is armed).
    public var engine: (engine: BreakpointEngine, reason: String)? {
        published.withLock { t in t.value.engine.map { ($0, t.value.engineReason) } }
    }

    // MARK: Running

    /// Runs every vCPU from the entry until the guest ends, faults, halts at a probe,
    /// `timeout` passes or `stop()` is called. `console` gets each whole line as it
    /// completes (debug port and serial), on the writing vCPU's thread. A machine runs once; after a `.halted`
    /// ending, `resume` goes on.
    /// The vCPU threads are joined before a final ending is returned (not after `.halted`:
    /// they wait parked for `resume` or `stop`). Kicks use `VCPU.kickSignal`, a real-time
    /// signal no handler of the program's owns (see `VCPU.installKickHandler`).
    public func run(timeout: Duration? = nil,
                    console sink: @escaping @Sendable (ConsoleLine) -> Void = { _ in }) throws(MachineError) -> RunResult {
        guard !started.exchange(true, ordering: .acquiringAndReleasing) else { throw MachineError.alreadyRan }
        do throws(KVMError) { try VCPU.installKickHandler() } catch { throw .kvm(error) }
        consoleSink.withLock { $0 = sink }
        let now = clock.now
        startTime.withLock { $0 = now }
        if let timeout { limit.withLock { $0 = (now + timeout, timeout) } }
        events.withLock { $0.running = vcpus.count }
        for vcpu in vcpus {
            do throws(ThreadError) {
                let thread = try JoinableThread { [self] in
                    Thread.current.name = "vcpu\(vcpu.id)-m\(serial)"
                    vcpu.bindToCurrentThread()
                    runLoop(vcpu)
                    events.withLock { $0.running -= 1 }
                }
                threads.withLock { $0.append(thread) }
            } catch {
                // The threads started so far see the stop; the others never ran.
                events.withLock { $0.running -= vcpus.count - vcpu.id }
                finish(.stopped)
                events.wait(until: { $0.running == 0 })
                joinThreads()
                throw .thread(error.description)
            }
        }
        return waitForEnding()
    }

    /// Goes on after a `.halted` ending: releases every vCPU and waits for the next ending.
    /// `timeout` replaces the run's time limit, counted from now; without it the limit
    /// `run` was given still holds (time spent halted counts).
    public func resume(timeout: Duration? = nil) throws(MachineError) -> RunResult {
        let halted = events.withLock { e -> Bool in
            guard e.halt != nil, rendezvous.isHeldByController else { return false }
            e.halt = nil
            return true
        }
        guard halted else { throw MachineError.notRunning }
        if let timeout { limit.withLock { $0 = (clock.now + timeout, timeout) } }
        rendezvous.release()
        return waitForEnding()
    }

    /// How often the pc platform checks for a guest that can never run again.
    static let censusPeriod: Duration = .seconds(1)

    private func waitForEnding() -> RunResult {
        let limit = self.limit.withLock { $0 }
        var timedOut = false
        while true {
            // In slices on the pc platform: between them, a census of halted vCPUs.
            let remaining = limit.map { $0.deadline - clock.now }
            let slice = platform == .pc ? min(remaining ?? Self.censusPeriod, Self.censusPeriod) : remaining
            if events.wait(until: { $0.running == 0 || $0.halt != nil }, timeout: slice) { break }
            if let limit, clock.now >= limit.deadline { timedOut = true; break }
            if platform == .pc, census.guestCanNeverRun(kick: { for v in vcpus { v.kick() } }, patience: .milliseconds(500)) {
                finish(.allHalted)
                events.wait(until: { $0.running == 0 })
                break
            }
        }
        let stop = events.withLock { $0.halt }
        if timedOut {
            finish(.timedOut(limit?.timeout ?? .zero))
            events.wait(until: { $0.running == 0 })
        }
        let elapsed = clock.now - (startTime.withLock { $0 } ?? clock.now)
        if let stop, !timedOut {
            return RunResult(ending: .halted(stop), console: console.allLines, elapsed: elapsed)
        }
        joinThreads()
        console.flush()
        let ending = events.withLock { $0.ending } ?? .stopped
        return RunResult(ending: ending, console: console.allLines, elapsed: elapsed, exits: exitTally.withLock { $0 })
    }

    /// Waits for every runner thread to end (each has left its loop or is about to).
    private func joinThreads() {
        let all = threads.withLock { t in
            defer { t.removeAll() }
            return t
        }
        for t in all { t.join() }
    }

    /// Ends a run from any thread: every vCPU leaves `KVM_RUN` and the run returns `.stopped`.
    public func stop() { finish(.stopped) }

    /// Records the first ending and gets every vCPU out of the guest.
    func finish(_ ending: RunEnding) {
        events.withLock { e in
            if e.ending == nil { e.ending = ending }
        }
        stopRequested.store(true, ordering: .releasing)
        // A hit blocked on a full record stream must get back to its vCPU's loop to see the
        // stop. Any thread may stop a run: the table is read under its lock (`current` is
        // for vCPU threads), the modules called after it.
        let modules = published.withLock { t in t.value.owners.values.flatMap { $0.map(\.module) } }
        for m in modules { m.releaseStreamWaiters() }
        for v in vcpus { v.kick() }
        // A machine stopped at a halt has every vCPU parked: let them see the stop.
        if rendezvous.isHeldByController { rendezvous.release() }
    }

    /// A host call failed on `vcpu`'s thread: the run ends, naming the call and what it was for.
    /// Conditions of the guest's own memory (an unmapped stack, a page outside RAM) are the
    /// guest's fault, not the host's.
    func hostFailure(_ vcpu: VCPU, _ error: KVMError, while doing: String) {
        finish(vcpu, error.isGuestCondition ? .guestMemory(error, while: doing) : .host(error, while: doing))
    }

    /// Ends the run with a fault of `vcpu` (the registers, when readable, go into the dump).
    func finish(_ vcpu: VCPU, _ cause: GuestFault.Cause) {
        let regs: Registers?
        do { regs = try vcpu.registers() } catch { regs = nil }
        let rip = regs?.rip ?? 0
        var fault = GuestFault(vcpu: vcpu.id, cause: cause, rip: rip, location: symbolizer.describe(rip), registers: regs)
        if case let .exit(e) = cause, regs != nil { (fault.instruction, fault.hint) = faultingInstruction(vcpu, rip: rip, exit: e) }
        finish(.fault(fault))
    }

    /// The instruction at `rip` as the guest's page tables map it, decoded, and a hint for
    /// what flowtrace knows the host cannot run: SSE/AVX at CPL0 on PVM.
    private func faultingInstruction(_ vcpu: VCPU, rip: UInt64, exit: VMExit) -> (String?, String?) {
        let sregs: SpecialRegisters
        do { sregs = try vcpu.specialRegisters() } catch { return (nil, nil) }
        var bytes: [UInt8] = []
        for k in 0..<15 {
            // Byte by byte: the instruction may end where the mapping does.
            guard let b = try? memory.read(virtual: rip &+ UInt64(k), count: 1, paging: sregs.paging) else { break }
            bytes.append(b[0])
        }
        guard !bytes.isEmpty, case let .success(i) = X86Decoder().decode(bytes, at: rip) else { return (nil, nil) }
        let shown = "\(i.text) (\(i.bytes.map { String(format: "%02x", $0) }.joined(separator: " ")))"
        let vector = ["xmm", "ymm", "zmm"].contains { i.text.contains($0) }
            || ["fxsave", "fxrstor", "xsave", "xrstor", "ldmxcsr", "stmxcsr"].contains { i.mnemonic.hasPrefix($0) }
        var hint: String?
        if vector, sregs.cs.dpl == 0 {
            if case .internalError = exit, KVMFlavor.current() == .pvm {
                hint = "an SSE/AVX instruction at CPL0, which this host's KVM (PVM) cannot emulate: build the guest with -mgeneral-regs-only (GCC, Clang) so the compiler uses no vector registers"
            } else if case .shutdown = exit, i.text.contains("xmmword ptr [") {
                hint = "a vector instruction at CPL0 faulted with no IDT to take it (an unaligned 16-byte access?): build the guest with -mgeneral-regs-only, or keep the stack as the ABI aligns it"
            }
        }
        return (shown, hint)
    }

    func vcpuHalted() {
        let all = events.withLock { e -> Bool in
            e.halted += 1
            return e.halted == vcpus.count
        }
        if all { finish(.exited(status: 0)) }
    }
}
