import ELF
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

    public static let defaultMemorySize: UInt64 = 64 << 20

    public init(vcpuCount: Int = 1, memorySize: UInt64 = MachineConfiguration.defaultMemorySize) {
        self.vcpuCount = vcpuCount
        self.memorySize = memorySize
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

    public var description: String {
        switch self {
        case let .exited(s): "guest exited with status \(s)"
        case let .fault(f): f.description
        case let .timedOut(d): "timed out after \(d.formatted(.units(allowed: [.seconds, .milliseconds])))"
        case .stopped: "stopped"
        }
    }
}

/// The outcome of `Machine.run`.
public struct RunResult: Sendable {
    public var ending: RunEnding
    /// Every console line, in the order they completed.
    public var console: [ConsoleLine]
    /// Wall time from starting the first vCPU to the last one stopping.
    public var elapsed: Duration
}

/// A runnable guest: a VM with its RAM, a loaded ELF image and its vCPUs.
///
/// Each vCPU runs its `KVM_RUN` loop on its own OS thread. Ports: bytes written to 0xE9 are
/// console output; a 32-bit write to 0xF4 ends the guest with that status; `hlt` ends the
/// vCPU that executes it, and the guest ends with status 0 when all have. No in-kernel
/// irqchip is created, so guests run with interrupts off and `hlt` always exits to us.
public final class Machine: Sendable {
    public let image: ELFImage
    public let configuration: MachineConfiguration
    public let layout: BootLayout
    public let symbolizer: Symbolizer
    public let vm: VirtualMachine
    public let memory: GuestMemory
    public let vcpus: [VCPU]

    public static let consolePort: UInt16 = 0xE9
    public static let exitPort: UInt16 = 0xF4

    private let state = Locked(RunState())
    private let stopRequested = Atomic<Bool>(false)
    private let started = Atomic<Bool>(false)

    private struct RunState {
        var ending: RunEnding?
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
        guard n >= 1, n <= host.maxVCPUs else { throw MachineError.vcpuCount(n, maximum: host.maxVCPUs) }
        let layout = try BootLayout(memorySize: configuration.memorySize, vcpuCount: n)
        try layout.check(image)
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

    // MARK: Running

    /// Runs every vCPU from the entry until the guest ends, faults, `timeout` passes or
    /// `stop()` is called. `console` gets each whole line as it completes, on the writing
    /// vCPU's thread. A machine runs once.
    public func run(timeout: Duration? = nil,
                    console sink: @escaping @Sendable (ConsoleLine) -> Void = { _ in }) throws(MachineError) -> RunResult {
        guard !started.exchange(true, ordering: .acquiringAndReleasing) else { throw MachineError.alreadyRan }
        VCPU.installKickHandler()
        let console = Console(vcpuCount: vcpus.count, sink: sink)
        let done = DispatchSemaphore(value: 0)
        let clock = ContinuousClock()
        let start = clock.now
        for vcpu in vcpus {
            let thread = Thread { [self] in
                vcpu.bindToCurrentThread()
                runLoop(vcpu, console: console)
                done.signal()
            }
            thread.name = "vcpu-\(vcpu.id)"
            thread.start()
        }
        let deadline: DispatchTime = timeout.map { .now() + .nanoseconds(nanoseconds($0)) } ?? .distantFuture
        var remaining = vcpus.count
        while remaining > 0 {
            if done.wait(timeout: deadline) == .timedOut {
                finish(.timedOut(timeout ?? .zero))
                // Kicked threads leave KVM_RUN at once; wait for all of them.
                while remaining > 0 { done.wait(); remaining -= 1 }
                break
            }
            remaining -= 1
        }
        console.flush()
        let ending = state.withLock { $0.ending } ?? .stopped
        return RunResult(ending: ending, console: console.allLines, elapsed: clock.now - start)
    }

    /// Ends a run from any thread: every vCPU leaves `KVM_RUN` and the run returns `.stopped`.
    public func stop() { finish(.stopped) }

    /// Records the first ending and kicks every vCPU out of the guest.
    private func finish(_ ending: RunEnding) {
        state.withLock { if $0.ending == nil { $0.ending = ending } }
        stopRequested.store(true, ordering: .releasing)
        for v in vcpus { v.kick() }
    }

    private func runLoop(_ vcpu: VCPU, console: Console) {
        while !stopRequested.load(ordering: .acquiring) {
            let exit: VMExit
            do { exit = try vcpu.run() } catch {
                fault(vcpu, .other(reason: UInt32(truncatingIfNeeded: -1)), note: error.description)
                return
            }
            switch exit {
            case .interrupted:
                continue
            case let .ioOut(port, size, data):
                if port == Self.consolePort {
                    console.write(data, from: vcpu.id)
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
                let all = state.withLock { s -> Bool in
                    s.halted += 1
                    return s.halted == vcpus.count
                }
                if all { finish(.exited(status: 0)) }
                return
            default:
                fault(vcpu, exit, note: nil)
                return
            }
        }
    }

    private func fault(_ vcpu: VCPU, _ exit: VMExit, note: String?) {
        let regs = try? vcpu.registers()
        let rip = regs?.rip ?? 0
        let f = GuestFault(vcpu: vcpu.id, exit: exit, rip: rip, location: symbolizer.describe(rip), registers: regs)
        finish(.fault(f))
    }
}

private func nanoseconds(_ d: Duration) -> Int {
    let (s, atto) = d.components
    return Int(clamping: s) &* 1_000_000_000 &+ Int(atto / 1_000_000_000)
}
