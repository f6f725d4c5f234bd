import KVM

/// How many exits of each kind a run took (`RunResult.exits`): where a boot's time goes.
/// Each vCPU thread counts its own and adds them to the machine's when it leaves its loop.
public struct ExitTally: Sendable, Equatable {
    public enum Kind: Int, Sendable, CaseIterable, CustomStringConvertible {
        case ioOut, ioIn, mmioRead, mmioWrite, hlt, debug, shutdown, interrupted, other
        public var description: String {
            switch self {
            case .ioOut: "io out"
            case .ioIn: "io in"
            case .mmioRead: "mmio read"
            case .mmioWrite: "mmio write"
            case .hlt: "hlt"
            case .debug: "debug"
            case .shutdown: "shutdown"
            case .interrupted: "interrupted"
            case .other: "other"
            }
        }
    }

    /// Exits of each kind, indexed by `Kind.rawValue`.
    public private(set) var counts = [UInt64](repeating: 0, count: Kind.allCases.count)
    /// Port-I/O exits by port and direction (out: true).
    public private(set) var ports: [PortKey: UInt64] = [:]
    /// The guest's own #BPs and #DBs that exited to flowtrace and were delivered back to it
    /// (a kernel's `text_poke_bp` and self-test int3s while traps of ours are in its memory).
    public internal(set) var reinjectedBreakpoints: UInt64 = 0
    public internal(set) var reinjectedDebugs: UInt64 = 0
    /// Of `reinjectedBreakpoints`, those flowtrace delivered itself (`OwnBreakpointDelivery`)
    /// instead of through KVM's injection.
    public internal(set) var breakpointsDelivered: UInt64 = 0

    public struct PortKey: Hashable, Sendable {
        public var port: UInt16
        public var isWrite: Bool
    }

    public init() {}

    public subscript(_ kind: Kind) -> UInt64 { counts[kind.rawValue] }
    public var total: UInt64 { counts.reduce(0, +) }

    mutating func count(_ exit: VMExit) {
        let kind: Kind
        switch exit {
        case let .ioOut(port, _, _, _): kind = .ioOut; ports[PortKey(port: port, isWrite: true), default: 0] += 1
        case let .ioIn(port, _, _): kind = .ioIn; ports[PortKey(port: port, isWrite: false), default: 0] += 1
        case let .mmio(_, isWrite, _, _): kind = isWrite ? .mmioWrite : .mmioRead
        case .hlt: kind = .hlt
        case .debug: kind = .debug
        case .shutdown: kind = .shutdown
        case .interrupted: kind = .interrupted
        default: kind = .other
        }
        counts[kind.rawValue] += 1
    }

    mutating func add(_ other: ExitTally) {
        for i in counts.indices { counts[i] += other.counts[i] }
        for (k, v) in other.ports { ports[k, default: 0] += v }
        reinjectedBreakpoints += other.reinjectedBreakpoints
        reinjectedDebugs += other.reinjectedDebugs
        breakpointsDelivered += other.breakpointsDelivered
    }

    /// "12345 exits: 12000 io out (0x3f8 11000, 0x80 900, ...), 300 io in, ..." (the busiest
    /// ports first, at most `ports` of them).
    public func summary(ports shown: Int = 4) -> String {
        var parts: [String] = []
        for k in Kind.allCases where self[k] > 0 {
            var text = "\(self[k]) \(k)"
            if k == .ioOut || k == .ioIn {
                let busiest = ports.filter { $0.key.isWrite == (k == .ioOut) }.sorted { ($1.value, $0.key.port) < ($0.value, $1.key.port) }
                let listed = busiest.prefix(shown).map { "0x\(String($0.key.port, radix: 16)) \($0.value)" }
                if !listed.isEmpty { text += " (" + listed.joined(separator: ", ") + (busiest.count > shown ? ", ..." : "") + ")" }
            }
            parts.append(text)
        }
        var text = "\(total) exits: " + (parts.isEmpty ? "none" : parts.joined(separator: ", "))
        if reinjectedBreakpoints + reinjectedDebugs > 0 {
            text += "; the guest's own #BP \(reinjectedBreakpoints) (\(breakpointsDelivered) of them by flowtrace's own frame), #DB \(reinjectedDebugs) delivered back to it"
        }
        return text
    }
}
