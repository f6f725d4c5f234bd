import ELF
import FlowGraph
import FlowTrace
import Foundation
import KVM
import Locking
import Synchronization

/// How to build a machine.
public struct MachineConfiguration: Sendable, Equatable {
    /// Number of vCPUs (each runs on its own OS thread).
    public var vcpuCount: Int
    /// Guest RAM in bytes (a multiple of 2 MiB).
    public var memorySize: UInt64
    /// The breakpoint engine probes use.
    public var engine: EngineRequest

    public static let defaultMemorySize: UInt64 = 64 << 20

    public init(vcpuCount: Int = 1, memorySize: UInt64 = MachineConfiguration.defaultMemorySize, engine: EngineRequest = .auto) {
        self.vcpuCount = vcpuCount
        self.memorySize = memorySize
        self.engine = engine
    }
}

/// Where a machine stopped for a halt entry.
public struct HaltStop: Sendable, Equatable {
    public var vcpu: Int
    /// The probe location's address.
    public var address: UInt64
    public var timing: ProbeTiming
    /// `rip` when stopped: `address` before execution, the next instruction after.
    public var rip: UInt64
    /// `rip` as `symbol+0xoff`.
    public var location: String

    public init(vcpu: Int, address: UInt64, timing: ProbeTiming, rip: UInt64, location: String) {
        self.vcpu = vcpu; self.address = address; self.timing = timing; self.rip = rip; self.location = location
    }
}

/// How a run ended.
public enum RunEnding: Sendable, Equatable, CustomStringConvertible {
    /// The guest wrote `status` to port 0xF4, or every vCPU halted (status 0).
    case exited(status: UInt32)
    /// A vCPU stopped on something the guest did not ask for.
    case fault(GuestFault)
    /// The run went past its time limit and every vCPU was stopped.
    case timedOut(Duration)
    /// `Machine.stop()` ended the run (e.g. on SIGINT).
    case stopped
    /// A probe's halt entry stopped every vCPU; inspect, then `Machine.resume()`.
    case halted(HaltStop)

    public var description: String {
        switch self {
        case let .exited(s): "guest exited with status \(s)"
        case let .fault(f): f.description
        case let .timedOut(d): "timed out after \(d.formatted(.units(allowed: [.seconds, .milliseconds])))"
        case .stopped: "stopped"
        case let .halted(h): "halted on vCPU \(h.vcpu) at \(h.location) (\(h.timing) execution)"
        }
    }
}

/// The outcome of `Machine.run`.
public struct RunResult: Sendable {
    public var ending: RunEnding
    /// Every console line so far, in the order they completed.
    public var console: [ConsoleLine]
    /// Wall time from starting the first vCPU until this result.
    public var elapsed: Duration
}

/// A runnable guest: a VM with its RAM, a loaded ELF image and its vCPUs; the target trace
/// modules arm their probes on.
///
/// Each vCPU runs its `KVM_RUN` loop on its own OS thread. Ports: bytes written to 0xE9 are
/// console output; a 32-bit write to 0xF4 ends the guest with that status; `hlt` ends the
/// vCPU that executes it, and the guest ends with status 0 when all have. No in-kernel
/// irqchip is created, so guests run with interrupts off and `hlt` always exits to us.
public final class Machine: TraceTarget {
    public let image: ELFImage
    public let configuration: MachineConfiguration
    public let layout: BootLayout
    public let symbolizer: Symbolizer
    public let vm: VirtualMachine
    public let memory: GuestMemory
    public let vcpus: [VCPU]
    /// Which engines work on this host (the per-process self-test).
    public let engineSupport: EngineSupport

    public static let consolePort: UInt16 = 0xE9
    public static let exitPort: UInt16 = 0xF4

    private let events = ConditionLock(Events())
    private let stopRequested = Atomic<Bool>(false)
    private let started = Atomic<Bool>(false)
    private let breakpoints = Locked(Breakpoints())
    private let pendingDisarms = Locked<[TraceModule]>([])
    private let hasPendingDisarms = Atomic<Bool>(false)
    private let outOfLineSteps = Atomic<UInt64>(0)
    private let inPlaceSteps = Atomic<UInt64>(0)
    /// Per vCPU: the step engine was just armed; check the current rip for a before-hit.
    private let ripChecks: Locked<[Bool]>
    private let rendezvous: Rendezvous
    private let snapshots: [VCPUSnapshot]
    private let consoleBox = Locked<Console?>(nil)
    private let clock = ContinuousClock()
    private let startTime = Locked<ContinuousClock.Instant?>(nil)
    /// The run's time limit: when it ends (on the monotonic clock) and the limit given.
    private let limit = Locked<(deadline: ContinuousClock.Instant, timeout: Duration)?>(nil)
    /// The runner threads, joined when the run ends.
    private let threads = Locked<[JoinableThread]>([])
    /// Tests only: called on a vCPU's thread (with its id) right after it began an
    /// out-of-line step, before it runs the copy; lets a test place a disarm exactly there.
    let outOfLineStepBegun = Locked<(@Sendable (Int) -> Void)?>(nil)
    private let hasStepHook = Atomic<Bool>(false)

    /// Tests only: sets `outOfLineStepBegun`.
    func onOutOfLineStepBegun(_ hook: @escaping @Sendable (Int) -> Void) {
        outOfLineStepBegun.withLock { $0 = hook }
        hasStepHook.store(true, ordering: .releasing)
    }

    /// Tests only: whether a vCPU or the controller holds or is taking the rendezvous.
    var rendezvousIsHeld: Bool { rendezvous.isHeld }

    /// Tests only: vCPU threads still in their loop.
    var runningVCPUs: Int { events.withLock { $0.running } }

    /// This machine's number in the process: its vCPU threads are named `vcpuN-mSERIAL`.
    let serial = Machine.machines.add(1, ordering: .relaxed).newValue
    private static let machines = Atomic<Int>(0)

    private struct Events {
        var ending: RunEnding?
        var halt: HaltStop?
        /// vCPU threads still in their loop.
        var running = 0
        /// vCPUs that ended with the guest's own hlt.
        var halted = 0
    }

    /// Loads `image` into a new VM. Errors name the offending file or value.
    public init(image: ELFImage, configuration: MachineConfiguration = .init(), host: KVMHost? = nil) throws(MachineError) {
        let kvmHost: KVMHost
        if let host { kvmHost = host } else {
            do throws(KVMError) { kvmHost = try KVMHost() } catch { throw .kvm(error) }
        }
        let host = kvmHost
        let n = configuration.vcpuCount
        let maximum: Int
        do throws(KVMError) { maximum = try host.maxVCPUs() } catch { throw .kvm(error) }
        guard n >= 1, n <= maximum else { throw MachineError.vcpuCount(n, maximum: maximum) }
        let layout = try BootLayout(memorySize: configuration.memorySize, vcpuCount: n)
        try layout.check(image)
        let support = EngineSelfTest.support(host: host)
        if case let .engine(e) = configuration.engine, case let .unavailable(why) = support.status(e) {
            throw MachineError.engineUnavailable(e, reason: why, working: BreakpointEngine.allCases.filter { support.works($0) }.map(\.rawValue))
        }
        do throws(KVMError) {
            let vm = try host.makeVirtualMachine()
            let memory = try GuestMemory(size: configuration.memorySize)
            try layout.writeTables(into: memory)
            for seg in image.segments {
                try memory.write(physical: seg.virtualAddress, bytes: seg.data)
                try memory.fill(physical: seg.virtualAddress + seg.fileSize, count: Int(seg.memorySize - seg.fileSize))
            }
            try vm.map(memory)

            // VMX/SVM hosts refuse long mode unless the guest's CPUID says it has it.
            let cpuid = try host.supportedCPUID()
            var vcpus: [VCPU] = []
            for i in 0..<n {
                let v = try vm.makeVCPU(id: i)
                try v.setCPUID(cpuid)
                try v.setSpecialRegisters(layout.specialRegisters(from: v.specialRegisters()))
                var regs = Registers()
                regs.rip = image.entry
                regs.rsp = layout.stackTop(for: i)
                regs.rdi = UInt64(i)
                regs.rsi = UInt64(n)
                try v.setRegisters(regs)
                try v.setFPU(FPUState())
                vcpus.append(v)
            }
            self.image = image
            self.configuration = configuration
            self.layout = layout
            self.symbolizer = Symbolizer(image: image)
            self.vm = vm
            self.memory = memory
            self.vcpus = vcpus
            self.engineSupport = support
            snapshots = vcpus.map { VCPUSnapshot(vcpu: $0, memory: memory) }
            ripChecks = Locked(Array(repeating: false, count: n))
            let kickable = vcpus
            rendezvous = Rendezvous(vcpus: n) { kickable[$0].kick() }
        } catch {
            throw .kvm(error)
        }
    }

    /// Loads the ELF file at `path` and builds a machine for it.
    public convenience init(path: String, configuration: MachineConfiguration = .init(), host: KVMHost? = nil) throws(MachineError) {
        let image: ELFImage
        do { image = try ELFImage(path: path) } catch { throw MachineError.image(error) }
        try self.init(image: image, configuration: configuration, host: host)
    }

    /// Reads guest-virtual memory through the boot page tables.
    public func read(virtual address: UInt64, count: Int) throws(KVMError) -> [UInt8] {
        try memory.read(virtual: address, count: count, cr3: layout.cr3)
    }

    /// Guest-virtual memory as the guest's code is without probes: the original bytes where
    /// the patching engines put a trap byte.
    public func readCode(virtual address: UInt64, count: Int) throws(KVMError) -> [UInt8] {
        // Under the lock that patching holds, so bytes and patch table agree.
        try breakpoints.withLock { (b: inout Breakpoints) throws(KVMError) -> [UInt8] in
            var bytes = try memory.read(virtual: address, count: count, cr3: layout.cr3)
            for k in bytes.indices {
                if let original = b.patches.original(at: address &+ UInt64(k)) { bytes[k] = original }
            }
            return bytes
        }
    }

    /// How the patching engines stepped over probed instructions so far: out of line (the
    /// other vCPUs ran on) or in place (the other vCPUs were held for the step).
    public var stepOvers: (outOfLine: UInt64, inPlace: UInt64) {
        (outOfLineSteps.load(ordering: .relaxed), inPlaceSteps.load(ordering: .relaxed))
    }

    /// The engine armed probes use and why it was chosen (nil while none is armed).
    public var engine: (engine: BreakpointEngine, reason: String)? {
        breakpoints.withLock { b in b.engine.map { ($0, b.engineReason) } }
    }

    // MARK: Running

    /// Runs every vCPU from the entry until the guest ends, faults, halts at a probe,
    /// `timeout` passes or `stop()` is called. `console` gets each whole line as it
    /// completes, on the writing vCPU's thread. A machine runs once; after a `.halted`
    /// ending, `resume` goes on.
    /// The vCPU threads are joined before a final ending is returned (not after `.halted`:
    /// they wait parked for `resume` or `stop`). Kicks use `VCPU.kickSignal`, a real-time
    /// signal no handler of the program's owns (see `VCPU.installKickHandler`).
    public func run(timeout: Duration? = nil,
                    console sink: @escaping @Sendable (ConsoleLine) -> Void = { _ in }) throws(MachineError) -> RunResult {
        guard !started.exchange(true, ordering: .acquiringAndReleasing) else { throw MachineError.alreadyRan }
        do throws(KVMError) { try VCPU.installKickHandler() } catch { throw .kvm(error) }
        let console = Console(vcpuCount: vcpus.count, sink: sink)
        consoleBox.withLock { $0 = console }
        let now = clock.now
        startTime.withLock { $0 = now }
        if let timeout { limit.withLock { $0 = (now + timeout, timeout) } }
        events.withLock { $0.running = vcpus.count }
        for vcpu in vcpus {
            do throws(ThreadError) {
                let thread = try JoinableThread { [self] in
                    Thread.current.name = "vcpu\(vcpu.id)-m\(serial)"
                    vcpu.bindToCurrentThread()
                    runLoop(vcpu, console: console)
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

    private func waitForEnding() -> RunResult {
        let limit = self.limit.withLock { $0 }
        let timedOut = !events.wait(until: { $0.running == 0 || $0.halt != nil },
                                    timeout: limit.map { $0.deadline - clock.now })
        let stop = events.withLock { $0.halt }
        if timedOut {
            finish(.timedOut(limit?.timeout ?? .zero))
            events.wait(until: { $0.running == 0 })
        }
        let console = consoleBox.withLock { $0 }
        let elapsed = clock.now - (startTime.withLock { $0 } ?? clock.now)
        if let stop, !timedOut {
            return RunResult(ending: .halted(stop), console: console?.allLines ?? [], elapsed: elapsed)
        }
        joinThreads()
        console?.flush()
        let ending = events.withLock { $0.ending } ?? .stopped
        return RunResult(ending: ending, console: console?.allLines ?? [], elapsed: elapsed)
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
    private func finish(_ ending: RunEnding) {
        events.withLock { e in
            if e.ending == nil { e.ending = ending }
        }
        stopRequested.store(true, ordering: .releasing)
        for v in vcpus { v.kick() }
        // A machine stopped at a halt has every vCPU parked: let them see the stop.
        if rendezvous.isHeldByController { rendezvous.release() }
    }

    // MARK: The vCPU loop

    /// What a vCPU is doing about a probe besides running.
    private enum Stepping {
        /// Single-stepping the instruction at `address` (the original byte is back for the
        /// patching engines, the DRs are off for hw); `held`: this vCPU holds the rendezvous.
        case over(address: UInt64, held: Bool)
        /// Single-stepping a copy of the instruction at `address` in the vCPU's slot; the
        /// trap byte stays and the other vCPUs run on.
        case outOfLine(address: UInt64, slot: UInt64, displaced: DisplacedInstruction)
    }

    private func runLoop(_ vcpu: VCPU, console: Console) {
        let id = vcpu.id
        rendezvous.gate(id, starting: true)
        defer { rendezvous.finished(id) }
        var stepping: Stepping?
        var previousRip: UInt64?   // step engine: the instruction just executed
        var reinjected = false
        defer {
            if case let .over(address, held)? = stepping { endStepOver(vcpu, address: address, held: held) }
            if case .outOfLine? = stepping { _ = abandonOutOfLine(vcpu, stepping) }
        }
        while !stopRequested.load(ordering: .acquiring) {
            if stepping == nil, hasPendingDisarms.load(ordering: .acquiring) { processPendingDisarms(from: vcpu) }
            if rendezvous.gate(id), case .outOfLine? = stepping {
                // Whoever held the rendezvous may have set every vCPU's debug state (arming,
                // disarming): this one is in the middle of stepping a copy, which must still
                // end after one instruction, or it would run on past the copy.
                let debug = breakpoints.withLock { $0.stepOverDebug(for: id) }
                do { try vcpu.setGuestDebug(debug) } catch {
                    hostFailure(vcpu, error, while: "re-arming the single step of an out-of-line step-over")
                    return
                }
            }
            if stopRequested.load(ordering: .acquiring) { break }
            if stepping == nil, ripChecks.withLock({ c in defer { c[id] = false }; return c[id] }) {
                // The step engine was just armed: the instruction at rip runs next.
                previousRip = nil
                if let regs = registers(vcpu), case .halt = probeHits(vcpu, at: nil, .before, regs: regs) {
                    haltHere(vcpu, address: regs.rip, .before, rip: regs.rip)
                }
            }
            let exit: VMExit
            do { exit = try vcpu.run() } catch {
                stepping = abandonOutOfLine(vcpu, stepping)
                hostFailure(vcpu, error, while: "running the guest")
                return
            }
            if reinjected {
                reinjected = false
                applyBaseDebug(vcpu)
            }
            switch exit {
            case .interrupted:
                continue
            case let .ioOut(port, size, data):
                if port == Self.consolePort {
                    console.write(data, from: id)
                } else if port == Self.exitPort, size == 4, data.count >= 4 {
                    let status = UInt32(data[0]) | UInt32(data[1]) << 8 | UInt32(data[2]) << 16 | UInt32(data[3]) << 24
                    finish(.exited(status: status))
                    return
                }
                // Other ports (POST codes, probes of absent devices) are ignored.
            case let .ioIn(_, size, count):
                // No devices: reads float high, as on an empty bus.
                vcpu.completeIOIn(Array(repeating: 0xFF, count: size * count))
            case .hlt:
                guard let regs = registers(vcpu) else { return }
                let address = regs.rip &- 1
                let ours = stepping == nil && breakpoints.withLock { $0.engine == .hlt && $0.patches.owns(trapAt: address) }
                if ours {
                    // Our trap: back to the probed instruction, hit, then step over it.
                    var r = regs
                    r.rip = address
                    guard setRegisters(vcpu, r) else { return }
                    if case .halt = probeHits(vcpu, at: address, .before, regs: r) { haltHere(vcpu, address: address, .before, rip: address) }
                    stepping = beginStepOver(vcpu, address: address)
                    continue
                }
                // The guest's own hlt ends this vCPU (after finishing a step-over of it).
                if case let .over(a, held)? = stepping {
                    stepping = nil
                    endStepOver(vcpu, address: a, held: held)
                }
                vcpuHalted()
                return
            case let .debug(exception, pc, dr6, _):
                guard let regs = registers(vcpu) else { return }
                if exception == 1, case let .outOfLine(address, slot, displaced)? = stepping {
                    // A restarted instruction leaves rip on the copy: step again.
                    if regs.rip == slot { continue }
                    stepping = nil
                    var r = regs
                    r.rip = displaced.relocated(rip: regs.rip, slot: slot)
                    if let (pushed, real) = displaced.returnAddresses(slot: slot) {
                        guard fixReturnAddress(vcpu, rsp: r.rsp, from: pushed, to: real) else { return }
                    }
                    guard setRegisters(vcpu, r) else { return }
                    let action = probeHits(vcpu, at: address, .after, regs: r)
                    applyBaseDebug(vcpu)
                    if case .halt = action { haltHere(vcpu, address: address, .after, rip: r.rip) }
                    continue
                }
                if exception == 1, case let .over(address, held)? = stepping {
                    // An instruction that did not retire (a locked one the emulator
                    // restarted, a rep iteration) leaves rip in place: step again.
                    if regs.rip == address { continue }
                    // The single step over a probed instruction is done: after-exec hits.
                    stepping = nil
                    let action = probeHits(vcpu, at: address, .after, regs: regs)
                    let halted = executedHalt(vcpu, at: address, rip: regs.rip)
                    guard endStepOver(vcpu, address: address, held: held), let halted else { return }
                    if case .halt = action { haltHere(vcpu, address: address, .after, rip: regs.rip) }
                    if halted { vcpuHalted(); return }
                    continue
                }
                let engine = breakpoints.withLock { $0.engine }
                if exception == 3 {
                    let ours = engine == .int3 && breakpoints.withLock { $0.patches.owns(trapAt: pc) }
                    if ours, stepping == nil {
                        var r = regs
                        r.rip = pc
                        guard setRegisters(vcpu, r) else { return }
                        if case .halt = probeHits(vcpu, at: pc, .before, regs: r) { haltHere(vcpu, address: pc, .before, rip: pc) }
                        stepping = beginStepOver(vcpu, address: pc)
                    } else {
                        // Not ours: deliver it to the guest as if we were not there.
                        var d = breakpoints.withLock { $0.baseDebug(for: id) }
                        d.injectBreakpoint = true
                        do { try vcpu.setGuestDebug(d) } catch {
                            finish(vcpu, .exitFailed(exit, error, while: "re-injecting the guest's own #BP"))
                            return
                        }
                        reinjected = true
                    }
                    continue
                }
                if exception == 1, engine == .hw, dr6 & 0xF != 0, stepping == nil {
                    if case .halt = probeHits(vcpu, at: pc, .before, regs: regs) { haltHere(vcpu, address: pc, .before, rip: pc) }
                    stepping = beginStepOver(vcpu, address: pc)
                    continue
                }
                if exception == 1, engine == .step {
                    // rip is the next instruction; previousRip the one just executed (if it
                    // retired: a restarted instruction leaves rip in place).
                    if regs.rip == previousRip { continue }
                    if let p = previousRip, case .halt = probeHits(vcpu, at: p, .after, regs: regs) { haltHere(vcpu, address: p, .after, rip: regs.rip) }
                    if let p = previousRip {
                        guard let halted = executedHalt(vcpu, at: p, rip: regs.rip) else { return }
                        if halted { vcpuHalted(); return }
                    }
                    if case .halt = probeHits(vcpu, at: regs.rip, .before, regs: regs) { haltHere(vcpu, address: regs.rip, .before, rip: regs.rip) }
                    previousRip = regs.rip
                    continue
                }
                stepping = abandonOutOfLine(vcpu, stepping)
                finish(vcpu, .exit(exit))
                return
            default:
                stepping = abandonOutOfLine(vcpu, stepping)
                finish(vcpu, .exit(exit))
                return
            }
        }
    }

    /// Whether the instruction at `address` that just retired (rip now `rip`) was the
    /// guest's own `hlt`. Under single-step KVM reports a hlt as a debug exit and the vCPU
    /// does not stop, so the loop must end the vCPU itself. nil: the check failed (the run
    /// ends with the failure).
    private func executedHalt(_ vcpu: VCPU, at address: UInt64, rip: UInt64) -> Bool? {
        guard rip == address &+ 1 else { return false }
        if let original = breakpoints.withLock({ $0.patches.original(at: address) }) { return original == X86Opcode.hlt }
        do {
            let cr3 = try vcpu.specialRegisters().cr3
            return try memory.read(virtual: address, count: 1, cr3: cr3) == [X86Opcode.hlt]
        } catch {
            hostFailure(vcpu, error, while: "reading the instruction at 0x\(String(address, radix: 16)) after a single step")
            return nil
        }
    }

    private func registers(_ vcpu: VCPU) -> Registers? {
        do { return try vcpu.registers() } catch {
            hostFailure(vcpu, error, while: "reading the registers at an exit")
            return nil
        }
    }

    /// false: it failed and the run ends.
    private func setRegisters(_ vcpu: VCPU, _ regs: Registers) -> Bool {
        do { try vcpu.setRegisters(regs); return true } catch {
            hostFailure(vcpu, error, while: "setting the registers at a probe hit")
            return false
        }
    }

    /// Delivers a hit at `address` (nil: `regs.rip`) to every owner with `timing`, with
    /// `regs` as the registers of this exit.
    private func probeHits(_ vcpu: VCPU, at address: UInt64?, _ timing: ProbeTiming, regs: Registers) -> HitAction {
        // The owners array is shared, not filtered into a new one: no allocation per hit.
        guard let owners = breakpoints.withLock({ $0.owners[address ?? regs.rip] }) else { return .continue }
        let snapshot = snapshots[vcpu.id]
        snapshot.reset(regs)
        var action = HitAction.continue
        let context = MachineHitContext(snapshot: snapshot)
        for o in owners where o.timing == timing && o.module.hit(location: o.index, context: context) == .halt {
            action = .halt
        }
        return action
    }

    /// Starts single-stepping the probed instruction at `address`: out of line where the
    /// instruction allows it and the vCPU still runs on the boot page tables (so its slot is
    /// mapped and the loader's), else in place with the other vCPUs held.
    private func beginStepOver(_ vcpu: VCPU, address: UInt64) -> Stepping? {
        let (engine, displaced, stepDebug) = breakpoints.withLock { ($0.engine, $0.displaced[address], $0.stepOverDebug(for: vcpu.id)) }
        if let displaced, engine == .int3 || engine == .hlt, let slot = BootLayout.outOfLineSlot(for: vcpu.id),
           let bytes = displaced.bytes(at: slot) {
            let cr3: UInt64
            do { cr3 = try vcpu.specialRegisters().cr3 } catch {
                hostFailure(vcpu, error, while: "reading cr3 to step over the probe at 0x\(String(address, radix: 16))")
                return nil
            }
            if cr3 == layout.cr3, unchanged(displaced) {
                guard var regs = registers(vcpu) else { return nil }
                do { try memory.write(physical: slot, bytes: bytes) } catch {
                    hostFailure(vcpu, error, while: "writing the out-of-line copy of 0x\(String(address, radix: 16)) at guest-physical 0x\(String(slot, radix: 16))")
                    return nil
                }
                regs.rip = slot
                guard setRegisters(vcpu, regs) else { return nil }
                do {
                    try vcpu.flushRegisters()
                    try vcpu.setGuestDebug(stepDebug)
                } catch {
                    hostFailure(vcpu, error, while: "arming the out-of-line step over 0x\(String(address, radix: 16))")
                    return .outOfLine(address: address, slot: slot, displaced: displaced)
                }
                outOfLineSteps.add(1, ordering: .relaxed)
                if hasStepHook.load(ordering: .acquiring), let hook = outOfLineStepBegun.withLock({ $0 }) { hook(vcpu.id) }
                return .outOfLine(address: address, slot: slot, displaced: displaced)
            }
        }
        // With the trap byte gone, another vCPU could run through the location unseen:
        // hold them all out of the guest for the one step.
        let held = engine == .int3 || engine == .hlt
        if held {
            inPlaceSteps.add(1, ordering: .relaxed)
            rendezvous.acquire(.vcpu(vcpu.id))
        }
        // The physical address was checked when the location was armed. Read after the
        // rendezvous: the others may have changed the engine while this vCPU waited for it.
        let (debug, failed) = breakpoints.withLock { b -> (GuestDebug, KVMError?) in
            var failed: KVMError?
            if let p = b.patches.patches[address] {
                do throws(KVMError) { try memory.write(physical: p.physical, bytes: [p.original]) } catch { failed = error }
            }
            return (b.stepOverDebug(for: vcpu.id), failed)
        }
        if let failed {
            hostFailure(vcpu, failed, while: "restoring the original byte at 0x\(String(address, radix: 16)) to step over it")
            return .over(address: address, held: held)
        }
        // The hit moved rip back onto the instruction: KVM must see it before it arms the step.
        do {
            try vcpu.flushRegisters()
            try vcpu.setGuestDebug(debug)
        } catch {
            hostFailure(vcpu, error, while: "arming the single step over 0x\(String(address, radix: 16))")
        }
        return .over(address: address, held: held)
    }

    /// The instruction at `address` (guest-virtual through `cr3`), planned for out-of-line
    /// stepping; nil when it must be stepped in place or does not decode.
    private func displacedInstruction(at address: UInt64, cr3: UInt64) -> DisplacedInstruction? {
        var bytes: [UInt8] = []
        for count in stride(from: X86Decoder.maxLength, through: 1, by: -1) {
            // Fewer bytes where the instruction ends near the end of RAM.
            if let b = try? memory.read(virtual: address, count: count, cr3: cr3) { bytes = b; break }
        }
        guard case let .success(i) = X86Decoder().decode(bytes, at: address),
              case let .success(d) = DisplacedInstruction.plan(i) else { return nil }
        return d
    }

    /// Whether the guest's bytes after the trap byte are still those of the planned copy
    /// (code the guest rewrote since arming is stepped in place, as it is now). Bytes the
    /// boot page tables no longer map count as rewritten: the in-place step reads them
    /// through the guest's own tables.
    private func unchanged(_ d: DisplacedInstruction) -> Bool {
        guard d.bytes.count > 1 else { return true }
        do {
            let now = try memory.read(virtual: d.address &+ 1, count: d.bytes.count - 1, cr3: layout.cr3)
            return now[...] == d.bytes[1...]
        } catch {
            return false
        }
    }

    /// A call stepped out of line pushed its slot's return address: make it the real one.
    /// false: it failed and the run ends.
    private func fixReturnAddress(_ vcpu: VCPU, rsp: UInt64, from pushed: UInt64, to real: UInt64) -> Bool {
        do {
            let cr3 = try vcpu.specialRegisters().cr3
            let p = try memory.translate(virtual: rsp, cr3: cr3).physical
            if try memory.readUInt64(physical: p) == pushed { try memory.writeUInt64(physical: p, real) }
            return true
        } catch {
            hostFailure(vcpu, error, while: "fixing the return address 0x\(String(real, radix: 16)) of a call stepped out of line")
            return false
        }
    }

    /// Leaves an out-of-line step unfinished (the machine stops, or the copy faulted): rip
    /// goes back from the slot to the instruction, so reports and dumps name the real place.
    /// Returns the stepping state that remains: nil for an out-of-line step, an in-place
    /// step unchanged (its end puts the trap back and releases the other vCPUs).
    private func abandonOutOfLine(_ vcpu: VCPU, _ stepping: Stepping?) -> Stepping? {
        guard case let .outOfLine(address, slot, _)? = stepping else { return stepping }
        if var regs = registers(vcpu), regs.rip >= slot, regs.rip < slot + BootLayout.outOfLineSlotSize {
            regs.rip = regs.rip - slot + address
            _ = setRegisters(vcpu, regs)
        }
        applyBaseDebug(vcpu)
        return nil
    }

    /// Puts the trap back (if the location is still armed) and the vCPU's usual debug state.
    /// The other vCPUs are released whatever fails. false: something failed, the run ends.
    @discardableResult
    private func endStepOver(_ vcpu: VCPU, address: UInt64, held: Bool) -> Bool {
        defer { if held { rendezvous.release() } }
        let (debug, failed) = breakpoints.withLock { b -> (GuestDebug, KVMError?) in
            var failed: KVMError?
            if let p = b.patches.patches[address] {
                do throws(KVMError) { try memory.write(physical: p.physical, bytes: [b.patches.trap]) } catch { failed = error }
            }
            return (b.baseDebug(for: vcpu.id), failed)
        }
        if let failed {
            hostFailure(vcpu, failed, while: "putting the trap byte back at 0x\(String(address, radix: 16)) after stepping over it")
            return false
        }
        do { try vcpu.setGuestDebug(debug) } catch {
            hostFailure(vcpu, error, while: "re-arming the vCPU's breakpoints after stepping over 0x\(String(address, radix: 16))")
            return false
        }
        return true
    }

    private func applyBaseDebug(_ vcpu: VCPU) {
        let d = breakpoints.withLock { $0.baseDebug(for: vcpu.id) }
        do { try vcpu.setGuestDebug(d) } catch { hostFailure(vcpu, error, while: "setting the vCPU's breakpoints") }
    }

    /// Stops the machine at a halt entry's hit and hands it to the caller of run/resume.
    private func haltHere(_ vcpu: VCPU, address: UInt64, _ timing: ProbeTiming, rip known: UInt64?) {
        rendezvous.acquire(.vcpu(vcpu.id))
        let rip = known ?? registers(vcpu)?.rip ?? address
        let stop = HaltStop(vcpu: vcpu.id, address: address, timing: timing, rip: rip, location: symbolizer.describe(rip))
        rendezvous.handOver(from: vcpu.id)
        events.withLock { $0.halt = stop }
        // Wait here (parked) until resume() or stop() releases the rendezvous.
        rendezvous.gate(vcpu.id, starting: true)
    }

    private func vcpuHalted() {
        let all = events.withLock { e -> Bool in
            e.halted += 1
            return e.halted == vcpus.count
        }
        if all { finish(.exited(status: 0)) }
    }

    /// A host call failed on `vcpu`'s thread: the run ends, naming the call and what it was for.
    private func hostFailure(_ vcpu: VCPU, _ error: KVMError, while doing: String) {
        finish(vcpu, .host(error, while: doing))
    }

    /// Ends the run with a fault of `vcpu` (the registers, when readable, go into the dump).
    private func finish(_ vcpu: VCPU, _ cause: GuestFault.Cause) {
        let regs: Registers?
        do { regs = try vcpu.registers() } catch { regs = nil }
        let rip = regs?.rip ?? 0
        finish(.fault(GuestFault(vcpu: vcpu.id, cause: cause, rip: rip, location: symbolizer.describe(rip), registers: regs)))
    }

    // MARK: TraceTarget

    public var vcpuCount: Int { vcpus.count }

    /// Arms `locations` for `module` with the machine's engine, all vCPUs parked meanwhile.
    /// A location whose address is not mapped is an error naming it.
    public func arm(_ module: TraceModule, locations: [ArmedLocation], vcpus selection: VCPUSelection) throws(TraceError) {
        try withControl(from: nil) { () throws(TraceError) in try armParked(module, locations, selection) }
    }

    /// Disarms `module`'s locations, all vCPUs parked meanwhile. Every location and vCPU is
    /// disarmed even when one fails; the error names each failure.
    public func disarm(_ module: TraceModule) throws(TraceError) {
        let failures = withControl(from: nil) { disarmParked(module) }
        if !failures.isEmpty {
            throw TraceError.targetFailure(failures.map { "\($0.error.description) while \($0.doing)" }.joined(separator: "; "))
        }
    }

    /// Called on a vCPU thread: the module is disarmed by that thread before it runs again.
    public func moduleReachedHitLimit(_ module: TraceModule) {
        pendingDisarms.withLock { $0.append(module) }
        hasPendingDisarms.store(true, ordering: .releasing)
    }

    private func processPendingDisarms(from vcpu: VCPU) {
        let modules = pendingDisarms.withLock { p -> [TraceModule] in
            defer { p.removeAll() }
            return p
        }
        hasPendingDisarms.store(false, ordering: .releasing)
        guard !modules.isEmpty else { return }
        let failures = withControl(from: vcpu.id) { modules.flatMap { disarmParked($0) } }
        if let f = failures.first { hostFailure(vcpu, f.error, while: f.doing + " (disarming a module at its hit limit)") }
    }

    /// Runs `body` with every vCPU out of the guest (unless the caller already holds them:
    /// a machine stopped at a halt).
    private func withControl<R, E: Error>(from vcpu: Int?, _ body: () throws(E) -> R) throws(E) -> R {
        let alreadyHeld = vcpu == nil && rendezvous.isHeldByController
        if !alreadyHeld { rendezvous.acquire(vcpu.map { .vcpu($0) } ?? .controller) }
        defer { if !alreadyHeld { rendezvous.release() } }
        return try body()
    }

    private func armParked(_ module: TraceModule, _ locations: [ArmedLocation], _ selection: VCPUSelection) throws(TraceError) {
        let cr3: UInt64
        do { cr3 = try vcpus[0].specialRegisters().cr3 } catch { throw TraceError.targetFailure("\(error.description) while reading cr3 to arm probes") }
        var physical: [(location: ArmedLocation, physical: UInt64)] = []
        for l in locations {
            do throws(KVMError) {
                let p = try memory.translate(virtual: l.address, cr3: cr3).physical
                _ = try memory.read(physical: p, count: 1)
                physical.append((l, p))
            } catch {
                throw TraceError.target("probe at 0x\(String(l.address, radix: 16)) (\(symbolizer.describe(l.address))): \(error.description)")
            }
        }
        let debugs = try breakpoints.withLock { (b: inout Breakpoints) throws(TraceError) -> [GuestDebug] in
            let addresses = Set(b.owners.keys).union(locations.map(\.address))
            if b.engine == nil {
                do throws(MachineError) {
                    let (e, why) = try configuration.engine.resolve(locations: addresses.count, support: engineSupport)
                    b.engine = e
                    b.engineReason = why
                    b.patches = PatchTable(trap: e.trapByte ?? X86Opcode.hlt)
                } catch {
                    throw TraceError.target(error.description)
                }
            } else if let e = b.engine, let cap = e.capacity, addresses.count > cap {
                throw TraceError.target(MachineError.tooManyLocations(e, count: addresses.count, capacity: cap).description)
            }
            for l in locations {
                b.owners[l.address, default: []].append(.init(module: module, index: l.index, timing: l.timing, vcpus: selection))
            }
            // USE_SW_BP goes on every vCPU before the first byte is written.
            let debugs = (0..<vcpus.count).map { b.baseDebug(for: $0) }
            return debugs
        }
        // From here on a failure disarms what was armed, so the module is armed wholly or not at all.
        func undo(_ failure: String) -> TraceError {
            let more = disarmParked(module).map { "; then \($0.error.description) while \($0.doing)" }.joined()
            return TraceError.targetFailure(failure + more)
        }
        for (v, d) in zip(vcpus, debugs) {
            do { try v.setGuestDebug(d) } catch { throw undo("\(error.description) while arming vCPU \(v.id)'s breakpoints") }
        }
        let engine = breakpoints.withLock { $0.engine }
        if engine?.trapByte != nil {
            let failure = breakpoints.withLock { (b: inout Breakpoints) -> String? in
                for (l, p) in physical {
                    do throws(KVMError) {
                        let current = try memory.read(physical: p, count: 1)[0]
                        if let trap = b.patches.insert(l.address, physical: p, current: current) {
                            // Decoded before the trap byte goes in, for out-of-line stepping.
                            if let d = displacedInstruction(at: l.address, cr3: cr3) { b.displaced[l.address] = d }
                            try memory.write(physical: p, bytes: [trap])
                        }
                    } catch {
                        return "\(error.description) while patching the probe at 0x\(String(l.address, radix: 16))"
                    }
                }
                return nil
            }
            if let failure { throw undo(failure) }
        }
        if engine == .step {
            ripChecks.withLock { c in for i in c.indices where selection.contains(i) { c[i] = true } }
        }
    }

    /// Removes `module` everywhere; returns what failed (every location and vCPU is tried).
    private func disarmParked(_ module: TraceModule) -> [(error: KVMError, doing: String)] {
        var failures: [(error: KVMError, doing: String)] = []
        let debugs = breakpoints.withLock { b -> [GuestDebug] in
            for (address, list) in b.owners {
                let kept = list.filter { $0.module !== module }
                if kept.isEmpty {
                    b.owners[address] = nil
                    if let p = b.patches.patches[address] {
                        do throws(KVMError) {
                            let current = try memory.read(physical: p.physical, count: 1)[0]
                            if let original = b.patches.remove(address, current: current) {
                                try memory.write(physical: p.physical, bytes: [original])
                            }
                        } catch {
                            // The byte stays as it is; the table forgets it, so no hit is taken for it.
                            _ = b.patches.remove(address, current: b.patches.trap)
                            failures.append((error, "restoring the original byte of the probe at 0x\(String(address, radix: 16))"))
                        }
                        b.displaced[address] = nil
                    }
                } else {
                    b.owners[address] = kept
                }
            }
            if b.owners.isEmpty { b.engine = nil }
            return (0..<vcpus.count).map { b.baseDebug(for: $0) }
        }
        for (v, d) in zip(vcpus, debugs) {
            do { try v.setGuestDebug(d) } catch { failures.append((error, "disarming vCPU \(v.id)'s breakpoints")) }
        }
        return failures
    }
}
