import Devices
import Locking
import Testing
import TestSupport

/// The guest drives every device register as it likes: random accesses of every size to
/// every port of the machine's device map never trap, and the UART keeps its invariants.
@Suite struct DeviceFuzzTests {
    @Test func randomAccessesToEveryDevice() throws {
        let lines = Locked<Int>(0)
        let console = Console(vcpuCount: 2) { _ in lines.withLock { $0 += 1 } }
        let irq = LineRecorder()
        let uart = UART16550(output: .console(console), interrupts: irq)
        let i8042 = I8042()
        let bus = try PortBus([
            (0xE9...0xE9, DebugConsole(console: console)), (0xF4...0xF4, ExitPort()), (uart.ports, uart),
            (0x60...0x60, i8042), (0x64...0x64, i8042), (CMOS.ports, CMOS(memorySize: 64 << 20)),
            (0x80...0x80, PostPort()), (PCIConfigPorts.ports, PCIConfigPorts()), (0x61...0x61, SystemControlPort()),
        ])
        let ports = bus.registrations.flatMap { Array($0.ports) }
        var rng = SplitMix64(state: 13)
        var resets = 0, exits = 0
        for step in 0..<200_000 {
            let port = ports[Int(rng.next() % UInt64(ports.count))]
            let size = [1, 2, 4][Int(rng.next() % 3)]
            let context = IOContext(vcpu: Int(rng.next() % 2))
            let device = try #require(bus.device(at: port))
            if rng.next() % 2 == 0 {
                let v = device.read(port: port, size: size, context: context)
                #expect(size == 4 || v < 1 << (8 * UInt32(size)) || v | 0xFF == UInt32.max || port == 0xCF8, "port \(port) size \(size)")
            } else {
                switch device.write(port: port, size: size, value: UInt32(truncatingIfNeeded: rng.next()), context: context) {
                case .reset?: resets += 1
                case .exit?: exits += 1
                case nil: break
                }
            }
            if step % 97 == 0 { _ = uart.receive(rng.bytes(Int(rng.next() % 20))) }
            // UART invariants, whatever was written: the transmitter is always empty, IIR
            // bits 4-5 are zero, and the line is up only with OUT2 set outside loopback.
            let lsr = uart.read(port: 0x3FD, size: 1, context: context)
            #expect(lsr & 0x60 == 0x60)
            #expect(uart.read(port: 0x3FA, size: 1, context: context) & 0x30 == 0)
            let mcr = uart.read(port: 0x3FC, size: 1, context: context)
            if irq.current { #expect(mcr & 0x18 == 0x08) }
        }
        #expect(resets > 0 && exits > 0)
        console.flush()
    }
}
