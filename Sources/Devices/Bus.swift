/// What a device asks of the run when the guest touches it.
public enum DeviceEvent: Sendable, Equatable {
    /// End the guest with this exit status (the exit port).
    case exit(status: UInt32)
    /// The guest reset the machine (`why`: "i8042", ...).
    case reset(String)
}

/// Which vCPU made an access; devices that assemble output per writer use it.
public struct IOContext: Sendable {
    public var vcpu: Int
    public init(vcpu: Int) { self.vcpu = vcpu }
}

/// A device on the port-I/O bus, registered on one or more port ranges; `port` is the
/// port accessed, `size` 1, 2 or 4 bytes. Called on vCPU threads, possibly several
/// at once: a device guards its own state.
public protocol PortDevice: AnyObject, Sendable {
    /// The name the summary and the bus listing use ("16550A UART (COM1)").
    var name: String { get }
    func read(port: UInt16, size: Int, context: IOContext) -> UInt32
    func write(port: UInt16, size: Int, value: UInt32, context: IOContext) -> DeviceEvent?
}

/// A device on the MMIO bus, registered on an address range.
public protocol MMIODevice: AnyObject, Sendable {
    var name: String { get }
    func read(offset: UInt64, size: Int, context: IOContext) -> UInt64
    func write(offset: UInt64, size: Int, value: UInt64, context: IOContext) -> DeviceEvent?
}

/// Two registrations claim the same address.
public struct BusConflict: Error, Sendable, CustomStringConvertible {
    public var description: String
}

/// The port-I/O bus: each device on a range of ports, looked up in constant time (a
/// 64 Ki-entry table of device indices), immutable once built, so vCPU threads read it
/// without a lock. Ports no device claims are `nil` here: the caller answers them (all
/// ones) and notes them for the summary.
public final class PortBus: Sendable {
    public struct Registration: Sendable {
        public var ports: ClosedRange<UInt16>
        public var device: any PortDevice
    }
    public let registrations: [Registration]
    private let table: [UInt8]

    public init(_ registrations: [(ports: ClosedRange<UInt16>, device: any PortDevice)]) throws(BusConflict) {
        precondition(registrations.count < 255, "at most 254 port devices")
        var table = [UInt8](repeating: 0, count: 1 << 16)
        for (i, r) in registrations.enumerated() {
            for p in r.ports {
                if table[Int(p)] != 0 {
                    let other = registrations[Int(table[Int(p)]) - 1].device.name
                    throw BusConflict(description: "port 0x\(String(p, radix: 16)) is claimed by both \(other) and \(r.device.name)")
                }
                table[Int(p)] = UInt8(i + 1)
            }
        }
        self.registrations = registrations.map { Registration(ports: $0.ports, device: $0.device) }
        self.table = table
    }

    /// The device at `port`.
    @inline(__always)
    public func device(at port: UInt16) -> (any PortDevice)? {
        let i = Int(table[Int(port)])
        return i == 0 ? nil : registrations[i - 1].device
    }
}

/// The MMIO bus: devices on guest-physical ranges outside RAM (few: a linear search).
public final class MMIOBus: Sendable {
    public struct Registration: Sendable {
        public var range: Range<UInt64>
        public var device: any MMIODevice
    }
    public let registrations: [Registration]

    public init(_ registrations: [(range: Range<UInt64>, device: any MMIODevice)]) throws(BusConflict) {
        for (i, a) in registrations.enumerated() {
            for b in registrations[..<i] where a.range.overlaps(b.range) {
                throw BusConflict(description: "MMIO 0x\(String(a.range.lowerBound, radix: 16)) is claimed by both \(b.device.name) and \(a.device.name)")
            }
        }
        self.registrations = registrations.map { Registration(range: $0.range, device: $0.device) }
    }

    public func device(at address: UInt64) -> (device: any MMIODevice, offset: UInt64)? {
        for r in registrations where r.range.contains(address) { return (r.device, address - r.range.lowerBound) }
        return nil
    }
}
