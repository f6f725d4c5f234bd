import Locking

/// Port 0xE9: each byte written is console output (the Bochs/QEMU debug console); reads
/// return 0xE9, which is how guests detect it.
public final class DebugConsole: PortDevice {
    public static let port: UInt16 = 0xE9
    public let name = "debug console"
    private let console: Console
    public init(console: Console) { self.console = console }
    public func read(port: UInt16, size: Int, context: IOContext) -> UInt32 { 0xE9 }
    public func write(port: UInt16, size: Int, value: UInt32, context: IOContext) -> DeviceEvent? {
        // A wider write sends its bytes low first, as the CPU puts them on the bus.
        var v = value
        for _ in 0..<size {
            console.write(byte: UInt8(truncatingIfNeeded: v), from: context.vcpu)
            v >>= 8
        }
        return nil
    }
}

/// Port 0xF4: a 32-bit write ends the guest with that status. Narrower writes are ignored
/// (some firmware writes POST-like bytes there); reads return all ones.
public final class ExitPort: PortDevice {
    public static let port: UInt16 = 0xF4
    public let name = "exit port"
    public init() {}
    public func read(port: UInt16, size: Int, context: IOContext) -> UInt32 { allOnes(size) }
    public func write(port: UInt16, size: Int, value: UInt32, context: IOContext) -> DeviceEvent? {
        size == 4 ? .exit(status: value) : nil
    }
}

/// Port 0x80, the POST code port: writes ignored (Linux writes it as an I/O delay).
public final class PostPort: PortDevice {
    public static let port: UInt16 = 0x80
    public let name = "POST port"
    public init() {}
    public func read(port: UInt16, size: Int, context: IOContext) -> UInt32 { allOnes(size) }
    public func write(port: UInt16, size: Int, value: UInt32, context: IOContext) -> DeviceEvent? { nil }
}

/// Port 0x61 (system control port B) without a PIT behind it (the payload platform; on the
/// pc platform KVM's in-kernel PIT answers this port). Bits 0-1 (timer 2 gate, speaker
/// data) read back as written; bit 4 (memory refresh) toggles on every read, which delay
/// loops poll; bit 5 (timer 2 output) follows the gate.
public final class SystemControlPort: PortDevice {
    public static let port: UInt16 = 0x61
    public let name = "system control port B"
    private let state = Locked<(control: UInt8, refresh: Bool)>((0, false))
    public init() {}
    public func read(port: UInt16, size: Int, context: IOContext) -> UInt32 {
        state.withLock { s in
            s.refresh.toggle()
            let gate = s.control & 1
            return UInt32(s.control & 0x0F) | (s.refresh ? 0x10 : 0) | UInt32(gate) << 5
        }
    }
    public func write(port: UInt16, size: Int, value: UInt32, context: IOContext) -> DeviceEvent? {
        state.withLock { $0.control = UInt8(truncatingIfNeeded: value) & 0x0F }
        return nil
    }
}

/// PCI configuration mechanism 1 (0xCF8 address, 0xCFC-0xCFF data) with no devices: the
/// address register reads back what was written (how guests detect mechanism 1), every
/// configuration read returns all ones (no device at any bus/device/function), writes are
/// ignored.
public final class PCIConfigPorts: PortDevice {
    public static let ports: ClosedRange<UInt16> = 0xCF8...0xCFF
    public let name = "PCI configuration (no devices)"
    private let address = Locked<UInt32>(0)
    public init() {}
    public func read(port: UInt16, size: Int, context: IOContext) -> UInt32 {
        if port == 0xCF8, size == 4 { return address.withLock { $0 } }
        return allOnes(size)
    }
    public func write(port: UInt16, size: Int, value: UInt32, context: IOContext) -> DeviceEvent? {
        if port == 0xCF8, size == 4 { address.withLock { $0 = value & 0x80FF_FFFC } }
        return nil
    }
}

/// The i8042 keyboard controller, enough for a guest to find it idle and to reset the
/// machine through it: the status port (0x64) reads "ready, no data" (input and output
/// buffers empty, system flag set), the data port (0x60) reads 0; command 0xFE (pulse the
/// reset line) resets the machine. Other commands are accepted and ignored.
public final class I8042: PortDevice {
    public static let dataPort: UInt16 = 0x60, statusPort: UInt16 = 0x64
    public static let resetCommand: UInt8 = 0xFE
    /// Status: bit 2, system flag (self-test passed); output/input buffers (bits 0, 1) empty.
    public static let idleStatus: UInt8 = 0x04
    public let name = "i8042 keyboard controller"
    public init() {}
    public func read(port: UInt16, size: Int, context: IOContext) -> UInt32 {
        port == Self.statusPort ? UInt32(Self.idleStatus) : 0
    }
    public func write(port: UInt16, size: Int, value: UInt32, context: IOContext) -> DeviceEvent? {
        if port == Self.statusPort, UInt8(truncatingIfNeeded: value) == Self.resetCommand { return .reset("i8042") }
        return nil
    }
}

/// What a read of `size` bytes from an empty bus returns: all ones.
@inline(__always)
public func allOnes(_ size: Int) -> UInt32 { size >= 4 ? UInt32.max : (1 << (UInt32(size) * 8)) - 1 }

/// QEMU's `isa-debug-exit` (hw/misc/debugexit.c), for test payloads written against it: a
/// write of V at any width to its ports ends the guest with status `(V << 1) | 1`, as QEMU's
/// process exits; reads return 0. QEMU's defaults: iobase 0x501, iosize 2.
public final class ISADebugExit: PortDevice {
    public static let defaultBase: UInt16 = 0x501
    public static let defaultSize: UInt16 = 2
    public let name = "isa-debug-exit"
    public let ports: ClosedRange<UInt16>
    public init(base: UInt16 = ISADebugExit.defaultBase, size: UInt16 = ISADebugExit.defaultSize) {
        ports = base...(base &+ max(size, 1) &- 1)
    }
    public func read(port: UInt16, size: Int, context: IOContext) -> UInt32 { 0 }
    public func write(port: UInt16, size: Int, value: UInt32, context: IOContext) -> DeviceEvent? {
        .exit(status: value << 1 | 1)
    }
}
