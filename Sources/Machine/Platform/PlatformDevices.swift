import Devices
import KVM
import Locking
import Synchronization

/// Where the serial port's output goes, as a machine is configured.
public enum SerialDestination: Sendable, Equatable {
    /// Into the run's console (`RunResult.console`, the console callback), as serial lines.
    case console
    /// Raw bytes to `sink` (e.g. a file), on the writing vCPU's thread.
    case sink(SerialSink)
    /// Nowhere.
    case discard
}

/// A byte sink for serial output; compared by identity.
public final class SerialSink: Sendable, Equatable {
    let write: @Sendable (UInt8) -> Void
    public init(_ write: @escaping @Sendable (UInt8) -> Void) { self.write = write }
    public static func == (a: SerialSink, b: SerialSink) -> Bool { a === b }
}

/// The pc platform's interrupt lines: `KVM_IRQ_LINE` on the VM. A failed call is kept and
/// ends the run at the vCPU's next exit (devices cannot fail an access).
final class KVMInterruptLines: InterruptLines {
    private let vm: VirtualMachine
    private let failure = Locked<KVMError?>(nil)
    private let failed = Atomic<Bool>(false)
    init(vm: VirtualMachine) { self.vm = vm }

    func set(irq: UInt32, level: Bool) {
        do { try vm.setInterruptLine(irq, level: level) } catch {
            failure.withLock { if $0 == nil { $0 = error } }
            failed.store(true, ordering: .releasing)
        }
    }

    /// The first failure so far (cheap to ask when there is none).
    var firstFailure: KVMError? {
        guard failed.load(ordering: .acquiring) else { return nil }
        return failure.withLock { $0 }
    }
}

/// A machine's devices and buses. Both platforms have the debug console (0xE9), the exit
/// port (0xF4), a 16550A UART on COM1 (0x3F8, IRQ 4), the i8042 (0x60, 0x64), CMOS/RTC
/// (0x70-0x71), the POST port (0x80) and PCI configuration ports without devices
/// (0xCF8-0xCFF). The payload platform also answers port 0x61; on the pc platform KVM's
/// PIT does (with the PIC, IOAPIC, LAPIC and PIT ports and pages, all in the kernel).
final class PlatformDevices: Sendable {
    let ports: PortBus
    let mmio: MMIOBus
    let uart: UART16550
    let unknown = UnknownAccesses()
    let interruptLines: KVMInterruptLines?

    init(platform: Platform, console: Console, serial: SerialDestination, memorySize: UInt64, vm: VirtualMachine?,
         extra: [DeviceRequest] = []) throws(MachineError) {
        let lines = platform.hasInterruptController ? vm.map { KVMInterruptLines(vm: $0) } : nil
        interruptLines = lines
        let output: SerialOutput = switch serial {
        case .console: .console(console)
        case let .sink(s): .sink(s.write)
        case .discard: .discard
        }
        uart = UART16550(output: output, interrupts: lines ?? NoInterruptLines())
        let i8042 = I8042()
        // RAM below 4 GiB: on the pc platform it ends at the device window.
        let lowRAM = platform == .pc ? KernelLayout.pciHoleStart : 4 << 30
        var list: [(ports: ClosedRange<UInt16>, device: any PortDevice)] = [
            (DebugConsole.port...DebugConsole.port, DebugConsole(console: console)),
            (ExitPort.port...ExitPort.port, ExitPort()),
            (uart.ports, uart),
            (I8042.dataPort...I8042.dataPort, i8042),
            (I8042.statusPort...I8042.statusPort, i8042),
            (CMOS.ports, CMOS(memorySize: min(memorySize, lowRAM), highMemory: memorySize - min(memorySize, lowRAM))),
            (PostPort.port...PostPort.port, PostPort()),
            (PCIConfigPorts.ports, PCIConfigPorts()),
        ]
        if platform == .payload { list.append((SystemControlPort.port...SystemControlPort.port, SystemControlPort())) }
        var memoryDevices: [(range: Range<UInt64>, device: any MMIODevice)] = []
        for d in extra {
            switch d {
            case .pcTestdev:
                let device = PCTestDevice(interrupts: lines ?? NoInterruptLines())
                for r in device.portRanges { list.append((r, device)) }
                memoryDevices.append((device.memoryRange, device))
            case let .isaDebugExit(base, size):
                let device = ISADebugExit(base: base, size: size)
                // QEMU's device where flowtrace's exit port is replaces it (payloads for QEMU
                // use iobase=0xf4); any other overlap is a conflict the bus reports.
                if device.ports.contains(ExitPort.port) { list.removeAll { $0.device is ExitPort } }
                list.append((device.ports, device))
            }
        }
        do {
            ports = try PortBus(list)
            mmio = try MMIOBus(memoryDevices)
        } catch {
            // Without extra devices the list is fixed: a conflict is a bug of flowtrace; with
            // them, the message names the ports (MachineError.deviceMap).
            throw extra.isEmpty ? MachineError.deviceMap(error.description) : MachineError.deviceConflict(error.description)
        }
    }
}
