import Locking

/// QEMU's `pc-testdev` (hw/misc/pc-testdev.c), the device KVM's unit tests drive, with
/// QEMU's semantics:
/// - ports 0xE0-0xE3 and 0xE8-0xEB: one 32-bit register; an access of N bytes at port P
///   reads or writes bytes (P & 3) ..< (P & 3) + N of it (QEMU splits 0xE8's accesses into
///   single bytes, which comes to the same);
/// - ports 0xE4-0xE7: "flush page": a 32-bit write of a guest-physical address (QEMU drops
///   its host mapping of that page; there is nothing to drop here), reads 0;
/// - ports 0x2000-0x2017: one byte each for ISA interrupt lines 0-23: writing V drives line
///   (port - 0x2000) to V != 0 (through the IOAPIC on the pc platform), reads 0;
/// - MMIO 0xFF000000-0xFF00FFFF: 64 KiB of memory the host emulates every access to (reads
///   give what was written, little-endian), for tests of instruction emulation on MMIO.
public final class PCTestDevice: PortDevice, MMIODevice {
    public static let dataPorts: ClosedRange<UInt16> = 0xE0...0xE3
    public static let flushPorts: ClosedRange<UInt16> = 0xE4...0xE7
    public static let bytePorts: ClosedRange<UInt16> = 0xE8...0xEB
    public static let irqPorts: ClosedRange<UInt16> = 0x2000...0x2017
    public static let memoryBase: UInt64 = 0xFF00_0000
    public static let memorySize = 0x10000

    public let name = "pc-testdev"
    private let lines: any InterruptLines
    private let data = Locked<UInt32>(0)
    private let memory = Locked<[UInt8]>([UInt8](repeating: 0, count: PCTestDevice.memorySize))

    public init(interrupts: any InterruptLines) { lines = interrupts }

    /// Its ports on the bus. 0xE9, inside the byte window, stays flowtrace's debug console
    /// (every payload prints there); an access starting at 0xE8, 0xEA or 0xEB is the device's.
    public var portRanges: [ClosedRange<UInt16>] { [Self.dataPorts, Self.flushPorts, 0xE8...0xE8, 0xEA...0xEB, Self.irqPorts] }
    public var memoryRange: Range<UInt64> { Self.memoryBase ..< Self.memoryBase + UInt64(Self.memorySize) }

    /// The bits of the data register an access of `size` bytes at `port` covers.
    private static func field(_ port: UInt16, _ size: Int) -> (shift: UInt32, mask: UInt32) {
        let shift = UInt32(port & 3) * 8
        let bits = UInt32(min(size, 4)) * 8
        let width: UInt32 = bits >= 32 ? .max : (1 << bits) - 1
        return (shift, shift >= 32 ? 0 : width << shift)
    }

    public func read(port: UInt16, size: Int, context: IOContext) -> UInt32 {
        if Self.dataPorts.contains(port) || Self.bytePorts.contains(port) {
            let (shift, mask) = Self.field(port, size)
            return data.withLock { ($0 & mask) >> shift }
        }
        return 0
    }

    public func write(port: UInt16, size: Int, value: UInt32, context: IOContext) -> DeviceEvent? {
        if Self.dataPorts.contains(port) || Self.bytePorts.contains(port) {
            let (shift, mask) = Self.field(port, size)
            data.withLock { $0 = $0 & ~mask | (value << shift) & mask }
        } else if Self.irqPorts.contains(port), size == 1 {
            lines.set(irq: UInt32(port - Self.irqPorts.lowerBound), level: value & 0xFF != 0)
        }
        // The flush port: nothing here maps guest pages on the host's behalf.
        return nil
    }

    public func read(offset: UInt64, size: Int, context: IOContext) -> UInt64 {
        memory.withLock { m in
            var v: UInt64 = 0
            for k in 0..<min(size, 8) where Int(offset) + k < m.count { v |= UInt64(m[Int(offset) + k]) << (8 * UInt64(k)) }
            return v
        }
    }

    public func write(offset: UInt64, size: Int, value: UInt64, context: IOContext) -> DeviceEvent? {
        memory.withLock { m in
            for k in 0..<min(size, 8) where Int(offset) + k < m.count { m[Int(offset) + k] = UInt8(truncatingIfNeeded: value >> (8 * UInt64(k))) }
        }
        return nil
    }
}
