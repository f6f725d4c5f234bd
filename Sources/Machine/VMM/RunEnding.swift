import Devices
import ELF
import FlowTrace

/// How to build a machine.
public struct MachineConfiguration: Sendable, Equatable {
    /// Number of vCPUs (each runs on its own OS thread).
    public var vcpuCount: Int
    /// Guest RAM in bytes (a multiple of 2 MiB).
    public var memorySize: UInt64
    /// The breakpoint engine probes use.
    public var engine: EngineRequest
    /// The platform around the guest (auto: what the image's boot protocol needs).
    public var platform: PlatformRequest
    /// Where the serial port's (COM1) output goes.
    public var serial: SerialDestination
    /// How a step over a probed instruction keeps interrupts out (the pc platform).
    public var stepInterrupts: StepInterruptBlocking
    /// The boot protocol (auto: what the image is).
    public var boot: BootRequest
    /// Command line, initrd and modules of a kernel boot.
    public var files: BootFiles
    /// Symbols for describing guest addresses when the image has none of its own (a
    /// kernel's, from `KernelImage.linuxView`).
    public var symbols: [Symbol] = []
    /// Devices beyond the platform's own (QEMU's test devices), on both platforms.
    public var devices: [DeviceRequest] = []

    public static let defaultMemorySize: UInt64 = 64 << 20
    /// What the CLI gives a kernel when `--memory` is not given.
    public static let defaultKernelMemorySize: UInt64 = 512 << 20

    public init(vcpuCount: Int = 1, memorySize: UInt64 = MachineConfiguration.defaultMemorySize, engine: EngineRequest = .auto,
                platform: PlatformRequest = .auto, serial: SerialDestination = .console,
                stepInterrupts: StepInterruptBlocking = .auto, boot: BootRequest = .auto, files: BootFiles = .init()) {
        self.vcpuCount = vcpuCount
        self.memorySize = memorySize
        self.engine = engine
        self.platform = platform
        self.serial = serial
        self.stepInterrupts = stepInterrupts
        self.boot = boot
        self.files = files
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
    /// The guest wrote `status` to port 0xF4, or (payload platform) every vCPU halted
    /// (status 0).
    case exited(status: UInt32)
    /// The guest reset the machine: `why` is "i8042" (command 0xFE on port 0x64) or
    /// "triple fault" (`KVM_EXIT_SHUTDOWN` on the pc platform). How kernels reboot.
    case reset(String)
    /// Every vCPU is halted with interrupts off, or waits for a start-up IPI, on the pc
    /// platform: nothing can wake the guest (a kernel that powers off without ACPI ends so).
    case allHalted
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
        case let .reset(why): "guest reset (\(why))"
        case .allHalted: "every vCPU halted with interrupts off"
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
    /// Every console line so far (debug port and serial), in the order they completed.
    public var console: [ConsoleLine]
    /// Wall time from starting the first vCPU until this result.
    public var elapsed: Duration
    /// The exits every vCPU took (complete for a final ending; a halt reports those of
    /// vCPU threads that left their loop).
    public var exits = ExitTally()
}

/// How a single step over a probed instruction keeps interrupts from being taken in the
/// middle of it, on a platform with interrupts.
public enum StepInterruptBlocking: Sendable, Equatable {
    /// `KVM_GUESTDBG_BLOCKIRQ` where the host offers it, else `interruptShadow`.
    case auto
    /// The fallback: an STI interrupt shadow set for the stepped instruction
    /// (`KVM_SET_VCPU_EVENTS`), when interrupts are on; the CPU then takes none until it
    /// retired. Chosen by `auto` where BLOCKIRQ is missing; selectable to test it.
    case interruptShadow
    /// Nothing: an interrupt may land in a step-over (its after-hit then names the
    /// handler). Only to show what the others prevent.
    case none
}

/// What a machine's step-overs do about interrupts (resolved from `StepInterruptBlocking`).
enum StepInterruptMode: Sendable, Equatable {
    case blockIRQ, interruptShadow, none
}

/// A device the guest asks for by QEMU's name (`--device`).
public enum DeviceRequest: Sendable, Equatable {
    /// QEMU's `isa-debug-exit` at `base` (`size` ports); it replaces flowtrace's exit port
    /// when it covers 0xF4.
    case isaDebugExit(base: UInt16, size: UInt16)
    /// QEMU's `pc-testdev`: ports 0xE0-0xEB and 0x2000-0x2017, MMIO 0xFF000000-0xFF00FFFF.
    case pcTestdev
}
