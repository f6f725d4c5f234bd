import Glibc
import Locking

/// The CMOS RAM and real-time clock (index port 0x70, data port 0x71), MC146818-style.
///
/// The clock reads the host's time (UTC, as a PC keeps it for Linux), in BCD or binary and
/// 24- or 12-hour form as register B says (BCD, 24-hour after reset). Update-in-progress
/// never reads set, there are no alarms or periodic interrupts (register C reads 0), and
/// register D says the battery is good. The memory-size bytes firmware leaves for a
/// loader are filled in from the guest's RAM. Every other byte is plain RAM (128 bytes;
/// bit 7 of the index, NMI disable, is not part of it).
public final class CMOS: PortDevice {
    public static let ports: ClosedRange<UInt16> = 0x70...0x71
    public let name = "CMOS/RTC"

    /// A moment of the clock, broken down (UTC).
    public struct Time: Sendable, Equatable {
        public var second, minute, hour: Int
        /// 1...31, 1...12, and the full year (2026).
        public var day, month, year: Int
        /// 0 = Sunday.
        public var weekday: Int
        public init(second: Int, minute: Int, hour: Int, day: Int, month: Int, year: Int, weekday: Int) {
            self.second = second; self.minute = minute; self.hour = hour
            self.day = day; self.month = month; self.year = year; self.weekday = weekday
        }

        /// The host's time now.
        public static func hostNow() -> Time {
            var t = time(nil)
            var b = tm()
            gmtime_r(&t, &b)
            return Time(second: Int(b.tm_sec), minute: Int(b.tm_min), hour: Int(b.tm_hour), day: Int(b.tm_mday),
                        month: Int(b.tm_mon) + 1, year: Int(b.tm_year) + 1900, weekday: Int(b.tm_wday))
        }
    }

    private struct State {
        var index: UInt8 = 0
        var ram = [UInt8](repeating: 0, count: 128)
    }
    private let state: Locked<State>
    private let clock: @Sendable () -> Time

    public static let registerA: UInt8 = 0x0A, registerB: UInt8 = 0x0B, registerC: UInt8 = 0x0C, registerD: UInt8 = 0x0D

    /// `memorySize`: the guest's RAM in bytes below 4 GiB, `highMemory` above it.
    public init(memorySize: UInt64, highMemory: UInt64 = 0, clock: @escaping @Sendable () -> Time = { Time.hostNow() }) {
        var s = State()
        s.ram[Int(Self.registerA)] = 0x26        // 32.768 kHz time base, 1024 Hz rate; UIP clear
        s.ram[Int(Self.registerB)] = 0x02        // 24-hour, BCD, no interrupts
        s.ram[Int(Self.registerD)] = 0x80        // valid RAM and time (battery good)
        // Base memory (KiB), extended memory 1M..65M (KiB), memory 16M..4G and above 4G (64 KiB units).
        func put16(_ at: Int, _ v: UInt64) { s.ram[at] = UInt8(truncatingIfNeeded: v); s.ram[at + 1] = UInt8(truncatingIfNeeded: v >> 8) }
        put16(0x15, 640)
        let extended = min(memorySize > 1 << 20 ? (memorySize - (1 << 20)) >> 10 : 0, 0xFFFF)
        put16(0x17, extended)
        put16(0x30, extended)
        let above16M = min(memorySize > 16 << 20 ? (memorySize - (16 << 20)) >> 16 : 0, 0xFFFF)
        put16(0x34, above16M)
        let high = highMemory >> 16
        s.ram[0x5B] = UInt8(truncatingIfNeeded: high)
        s.ram[0x5C] = UInt8(truncatingIfNeeded: high >> 8)
        s.ram[0x5D] = UInt8(truncatingIfNeeded: high >> 16)
        state = Locked(s)
        self.clock = clock
    }

    public func read(port: UInt16, size: Int, context: IOContext) -> UInt32 {
        if port == 0x70 { return 0xFF }   // the index port is write-only
        let (index, b) = state.withLock { ($0.index, $0.ram[Int(Self.registerB)]) }
        if let value = clockRegister(index, registerB: b) { return UInt32(value) }
        return state.withLock { s in
            if index == Self.registerC { return 0 }   // no interrupt flags
            return UInt32(s.ram[Int(index)])
        }
    }

    public func write(port: UInt16, size: Int, value: UInt32, context: IOContext) -> DeviceEvent? {
        let byte = UInt8(truncatingIfNeeded: value)
        state.withLock { s in
            if port == 0x70 {
                s.index = byte & 0x7F
                return
            }
            switch s.index {
            case 0x00, 0x02, 0x04, 0x06, 0x07, 0x08, 0x09, 0x32, Self.registerC, Self.registerD:
                break   // the clock follows the host; C and D are read-only
            case Self.registerA:
                s.ram[Int(Self.registerA)] = byte & 0x7F   // UIP is read-only
            default:
                s.ram[Int(s.index)] = byte
            }
        }
        return nil
    }

    /// The clock's value at `index` in the format register B selects; nil for other bytes.
    private func clockRegister(_ index: UInt8, registerB b: UInt8) -> UInt8? {
        let binary = b & 0x04 != 0, twentyFour = b & 0x02 != 0
        func encode(_ v: Int) -> UInt8 { binary ? UInt8(v) : UInt8((v / 10) << 4 | v % 10) }
        let t: Time
        switch index {
        case 0x00, 0x02, 0x04, 0x06, 0x07, 0x08, 0x09, 0x32: t = clock()
        default: return nil
        }
        switch index {
        case 0x00: return encode(t.second)
        case 0x02: return encode(t.minute)
        case 0x04:
            if twentyFour { return encode(t.hour) }
            let h12 = t.hour % 12 == 0 ? 12 : t.hour % 12
            return encode(h12) | (t.hour >= 12 ? 0x80 : 0)
        case 0x06: return encode(t.weekday + 1)
        case 0x07: return encode(t.day)
        case 0x08: return encode(t.month)
        case 0x09: return encode(t.year % 100)
        default: return encode(t.year / 100)
        }
    }
}
