import Locking

/// The ports and MMIO addresses the guest touched where no device answers, each once with
/// the first access: what the guest expected to find.
public final class UnknownAccesses: Sendable {
    public enum Space: Sendable, Hashable, Comparable { case port, mmio }

    public struct Access: Sendable, Equatable {
        public var space: Space
        public var address: UInt64
        /// Direction of the first access.
        public var isWrite: Bool
        public var size: Int
        public var vcpu: Int
        /// rip of the instruction that made the first access.
        public var rip: UInt64
        /// Accesses of any direction so far.
        public var count: UInt64

        public var description: String {
            let what = space == .port ? "port 0x\(String(address, radix: 16))" : "MMIO 0x\(String(address, radix: 16))"
            return "\(what): first \(isWrite ? "write" : "read") (\(size) byte\(size == 1 ? "" : "s")) on vCPU \(vcpu) at rip 0x\(String(rip, radix: 16)), \(count) access\(count == 1 ? "" : "es")"
        }
    }

    private struct Key: Hashable { var space: Space; var address: UInt64 }
    private let table = Locked<[Key: Access]>([:])

    public init() {}

    /// Notes an access; `rip` is asked only for the first one at an address.
    public func note(_ space: Space, address: UInt64, isWrite: Bool, size: Int, vcpu: Int, rip: () -> UInt64) {
        let key = Key(space: space, address: address)
        let counted = table.withLock { t -> Bool in
            guard t[key] != nil else { return false }
            t[key]?.count += 1
            return true
        }
        if counted { return }
        let r = rip()
        table.withLock { t in
            if t[key] != nil { t[key]?.count += 1 } else {
                t[key] = Access(space: space, address: address, isWrite: isWrite, size: size, vcpu: vcpu, rip: r, count: 1)
            }
        }
    }

    /// Every unknown address so far, ports first, each space by address.
    public var all: [Access] {
        table.withLock { Array($0.values) }.sorted { ($0.space, $0.address) < ($1.space, $1.address) }
    }
}
