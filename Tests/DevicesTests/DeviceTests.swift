import Devices
import Locking
import Testing

private let ctx = IOContext(vcpu: 0)

@Suite struct DeviceTests {
    @Test func busLooksUpAndRejectsOverlaps() throws {
        let pci = PCIConfigPorts(), post = PostPort()
        let bus = try PortBus([(PCIConfigPorts.ports, pci), (0x80...0x80, post)])
        #expect(bus.device(at: 0xCFC) === pci)
        #expect(bus.device(at: 0x80) === post)
        #expect(bus.device(at: 0x81) == nil)
        #expect(throws: BusConflict.self) { try PortBus([(0x80...0x80, post), (0x7F...0x81, PostPort())]) }
        let e = #expect(throws: BusConflict.self) { try PortBus([(0x60...0x60, I8042()), (0x60...0x60, PostPort())]) }
        #expect(e?.description == "port 0x60 is claimed by both i8042 keyboard controller and POST port")
    }

    @Test func i8042IsIdleAndResets() {
        let k = I8042()
        #expect(k.read(port: 0x64, size: 1, context: ctx) == 0x04)
        #expect(k.read(port: 0x60, size: 1, context: ctx) == 0)
        #expect(k.write(port: 0x64, size: 1, value: 0xAA, context: ctx) == nil)
        #expect(k.write(port: 0x60, size: 1, value: 0xFE, context: ctx) == nil)   // data, not a command
        #expect(k.write(port: 0x64, size: 1, value: 0xFE, context: ctx) == .reset("i8042"))
    }

    /// Linux's pci_check_type1: write 0x80000000 to 0xCF8 and read it back; then every
    /// vendor id reads 0xFFFF (no device).
    @Test func pciMechanismOneWithNoDevices() {
        let p = PCIConfigPorts()
        _ = p.write(port: 0xCF8, size: 4, value: 0x8000_0000, context: ctx)
        #expect(p.read(port: 0xCF8, size: 4, context: ctx) == 0x8000_0000)
        _ = p.write(port: 0xCF8, size: 4, value: 0x8000_0800, context: ctx)   // bus 0, device 1, function 0
        #expect(p.read(port: 0xCFC, size: 2, context: ctx) == 0xFFFF)
        #expect(p.read(port: 0xCFC, size: 4, context: ctx) == 0xFFFF_FFFF)
        #expect(p.read(port: 0xCFE, size: 1, context: ctx) == 0xFF)
    }

    @Test func exitAndDebugPorts() {
        let lines = Locked<[ConsoleLine]>([])
        let console = Console(vcpuCount: 2) { l in lines.withLock { $0.append(l) } }
        let d = DebugConsole(console: console)
        #expect(d.read(port: 0xE9, size: 1, context: ctx) == 0xE9)
        for c in "hi\n".utf8 { _ = d.write(port: 0xE9, size: 1, value: UInt32(c), context: IOContext(vcpu: 1)) }
        #expect(lines.withLock { $0 } == [ConsoleLine(vcpu: 1, text: "hi")])
        let x = ExitPort()
        #expect(x.write(port: 0xF4, size: 4, value: 42, context: ctx) == .exit(status: 42))
        #expect(x.write(port: 0xF4, size: 1, value: 42, context: ctx) == nil)
    }

    /// The RTC in BCD and binary, 24- and 12-hour, from a fixed clock; memory bytes.
    @Test func cmosClockAndMemory() {
        let t = CMOS.Time(second: 59, minute: 7, hour: 23, day: 1, month: 12, year: 2026, weekday: 2)
        let c = CMOS(memorySize: 64 << 20, clock: { t })
        func r(_ i: UInt8) -> UInt8 {
            _ = c.write(port: 0x70, size: 1, value: UInt32(i) | 0x80, context: ctx)   // NMI-disable bit set, as Linux does
            return UInt8(c.read(port: 0x71, size: 1, context: ctx))
        }
        func w(_ i: UInt8, _ v: UInt8) {
            _ = c.write(port: 0x70, size: 1, value: UInt32(i), context: ctx)
            _ = c.write(port: 0x71, size: 1, value: UInt32(v), context: ctx)
        }
        #expect([r(0), r(2), r(4), r(6), r(7), r(8), r(9), r(0x32)] == [0x59, 0x07, 0x23, 0x03, 0x01, 0x12, 0x26, 0x20])
        #expect(r(0x0A) & 0x80 == 0 && r(0x0B) == 0x02 && r(0x0D) == 0x80)
        w(0x0B, 0x06)   // binary, 24-hour
        #expect([r(0), r(2), r(4), r(9)] == [59, 7, 23, 26])
        w(0x0B, 0x04)   // binary, 12-hour: 23:00 is 11 PM
        #expect(r(4) == 0x80 | 11)
        // Extended memory in KiB above 1 MiB (63 MiB), 64 KiB units above 16 MiB (768).
        #expect(UInt16(r(0x17)) | UInt16(r(0x18)) << 8 == 63 * 1024)
        #expect(UInt16(r(0x34)) | UInt16(r(0x35)) << 8 == 768)
        // Plain RAM elsewhere; the clock ignores writes.
        w(0x40, 0x5A)
        #expect(r(0x40) == 0x5A)
        w(0, 0x11)
        #expect(r(0) == 59)
    }

    @Test func unknownAccessesKeepTheFirst() {
        let u = UnknownAccesses()
        var asked = 0
        u.note(.port, address: 0x3FD, isWrite: false, size: 1, vcpu: 0, rip: { asked += 1; return 0x1000 })
        u.note(.port, address: 0x3FD, isWrite: true, size: 1, vcpu: 1, rip: { asked += 1; return 0x2000 })
        u.note(.mmio, address: 0xFED0_0000, isWrite: false, size: 4, vcpu: 0, rip: { 0x3000 })
        u.note(.port, address: 0x21, isWrite: true, size: 1, vcpu: 0, rip: { 0x4000 })
        #expect(asked == 1)
        #expect(u.all.map(\.description) == [
            "port 0x21: first write (1 byte) on vCPU 0 at rip 0x4000, 1 access",
            "port 0x3fd: first read (1 byte) on vCPU 0 at rip 0x1000, 2 accesses",
            "MMIO 0xfed00000: first read (4 bytes) on vCPU 0 at rip 0x3000, 1 access",
        ])
    }

    @Test func serialLinesAreOneStream() {
        let lines = Locked<[ConsoleLine]>([])
        let console = Console(vcpuCount: 2) { l in lines.withLock { $0.append(l) } }
        for c in "ab".utf8 { console.writeSerial(byte: c, from: 0) }
        for c in "c\r\n".utf8 { console.writeSerial(byte: c, from: 1) }
        console.writeSerial(byte: UInt8(ascii: "z"), from: 0)
        console.flush()
        #expect(lines.withLock { $0 } == [ConsoleLine(vcpu: 1, text: "abc", source: .serial), ConsoleLine(vcpu: 0, text: "z", source: .serial)])
    }

    @Test func systemControlPortB() {
        let p = SystemControlPort()
        let a = p.read(port: 0x61, size: 1, context: ctx), b = p.read(port: 0x61, size: 1, context: ctx)
        #expect((a ^ b) & 0x10 == 0x10)   // refresh toggles
        _ = p.write(port: 0x61, size: 1, value: 0x03, context: ctx)
        #expect(p.read(port: 0x61, size: 1, context: ctx) & 0x23 == 0x23)
    }
}

@Suite("isa-debug-exit")
struct ISADebugExitTests {
    /// Every port of the device, every width: reads 0, a write of V is an exit with (V << 1) | 1.
    @Test func everyPortAndWidth() {
        let d = ISADebugExit(base: 0x501, size: 2)
        #expect(d.ports == 0x501...0x502)
        for port: UInt16 in [0x501, 0x502] {
            for (size, value) in [(1, UInt32(0x10)), (2, 0x1234), (4, 0x8000_0001)] {
                #expect(d.read(port: port, size: size, context: IOContext(vcpu: 0)) == 0)
                #expect(d.write(port: port, size: size, value: value, context: IOContext(vcpu: 0)) == .exit(status: value << 1 | 1))
            }
        }
        #expect(ISADebugExit().ports == 0x501...0x502)
        #expect(ISADebugExit(base: 0xF4, size: 4).ports == 0xF4...0xF7)
    }
}

@Suite("pc-testdev")
struct PCTestDeviceTests {
    final class Recorded: InterruptLines, @unchecked Sendable {
        // SAFETY: the test calls the device from one thread only.
        var levels: [(UInt32, Bool)] = []
        func set(irq: UInt32, level: Bool) { levels.append((irq, level)) }
    }

    /// The data register at every width and offset through both windows, the flush and
    /// line ports, the memory window (QEMU's semantics).
    @Test func everyRegister() {
        let lines = Recorded()
        let d = PCTestDevice(interrupts: lines)
        _ = d.write(port: 0xE0, size: 4, value: 0x1122_3344, context: ctx)
        #expect(d.read(port: 0xE0, size: 4, context: ctx) == 0x1122_3344)
        #expect((0..<4).map { d.read(port: 0xE0 + UInt16($0), size: 1, context: ctx) } == [0x44, 0x33, 0x22, 0x11])
        #expect(d.read(port: 0xE9, size: 2, context: ctx) == 0x2233)
        _ = d.write(port: 0xEB, size: 1, value: 0xAB, context: ctx)
        _ = d.write(port: 0xE1, size: 2, value: 0xCDEF, context: ctx)
        #expect(d.read(port: 0xE8, size: 4, context: ctx) == 0xABCD_EF44)
        #expect(d.read(port: 0xE4, size: 4, context: ctx) == 0)
        #expect(d.write(port: 0xE4, size: 4, value: 0x1000, context: ctx) == nil)
        for irq in [0, 5, 23] {
            _ = d.write(port: 0x2000 + UInt16(irq), size: 1, value: 1, context: ctx)
            _ = d.write(port: 0x2000 + UInt16(irq), size: 1, value: 0, context: ctx)
            #expect(d.read(port: 0x2000 + UInt16(irq), size: 1, context: ctx) == 0)
        }
        #expect(lines.levels.map(\.0) == [0, 0, 5, 5, 23, 23] && lines.levels.map(\.1) == [true, false, true, false, true, false])
        _ = d.write(offset: 0x10, size: 8, value: 0x0102_0304_0506_0708, context: ctx)
        #expect(d.read(offset: 0x14, size: 4, context: ctx) == 0x0102_0304)
        #expect(d.read(offset: 0x10, size: 1, context: ctx) == 0x08)
        _ = d.write(offset: 0xFFFE, size: 2, value: 0x1234, context: ctx)
        #expect(d.read(offset: 0xFFFE, size: 2, context: ctx) == 0x1234)
        #expect(d.memoryRange == 0xFF00_0000 ..< 0xFF01_0000)
        #expect(!d.portRanges.contains { $0.contains(0xE9) })
    }
}
