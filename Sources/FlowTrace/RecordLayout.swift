import Locking


/// Where each entry of one probe puts its value inside a record slot.
///
/// A record slot is `[header][common probe values][probe values]`; each probe part is
/// the entries' value bytes followed by one status byte per entry (0 = collected, else an
/// index into the module's reason table).
final class ProbeLayout: Sendable {
    let entries: [ProbeEntry]
    /// The entries as plain values for the hit path (no reference counting per entry).
    private let ops: [Op]
    private let callbacks: [ProbeCallback]
    /// Offset of each entry's value within this part.
    let offsets: [Int]
    /// Offset of the status bytes within this part.
    let statusOffset: Int
    /// Bytes this part takes.
    let size: Int

    private enum Op {
        case register(X86Register)
        case constantMemory(address: UInt64, size: Int)
        case indirectMemory(MemoryOperand, size: Int)
        case callback(Int)
        case halt
    }

    init(entries: [ProbeEntry]) {
        self.entries = entries
        var offsets: [Int] = [], ops: [Op] = [], callbacks: [ProbeCallback] = []
        var at = 0
        for e in entries {
            offsets.append(at)
            at += e.valueSize
            switch e {
            case let .register(r): ops.append(.register(r))
            case let .constantMemory(a, n): ops.append(.constantMemory(address: a, size: n))
            case let .indirectMemory(op, n): ops.append(.indirectMemory(op, size: n))
            case let .callback(f):
                ops.append(.callback(callbacks.count))
                callbacks.append(f)
            case .halt: ops.append(.halt)
            }
        }
        self.ops = ops
        self.callbacks = callbacks
        self.offsets = offsets
        statusOffset = at
        size = at + entries.count
    }
}

/// Record slot header.
enum RecordHeader {
    static let sequence = 0      // UInt64
    static let timestamp = 8     // UInt64, ns
    static let location = 16     // UInt32
    static let vcpu = 20         // UInt32
    static let size = 24
}

/// The reasons values could not be read, shared by a module's records. A record names a
/// reason by a one-byte index; the table is append-only.
final class ReasonTable: Sendable {
    private let table = Locked<(reasons: [String], index: [String: UInt8])>(([], [:]))
    static let overflowIndex: UInt8 = 255
    static let overflowReason = "unreadable (more distinct read errors than one trace can name)"

    /// The index for `reason`, adding it if new (1 ... 254; 255 once the table is full).
    func index(for reason: String) -> UInt8 {
        table.withLock { t in
            if let i = t.index[reason] { return i }
            guard t.reasons.count < 254 else { return Self.overflowIndex }
            t.reasons.append(reason)
            let i = UInt8(t.reasons.count)
            t.index[reason] = i
            return i
        }
    }

    func reason(_ index: UInt8) -> String {
        if index == Self.overflowIndex { return Self.overflowReason }
        return table.withLock { t in Int(index) <= t.reasons.count ? t.reasons[Int(index) - 1] : "unreadable" }
    }
}

// MARK: Collecting (hot path)

extension ProbeLayout {
    /// Collects every entry into `slot + base`. Returns whether a halt entry asked to stop.
    @inline(__always)
    // SAFETY: `slot` is a record slot of the layout's size (TraceModule's stack slot); every offset below is the layout's own.
    func collect<C: HitContext>(into slot: UnsafeMutableRawPointer, base: Int, context: C, hit: ProbeHit,
                                reasons: ReasonTable) -> Bool {
        var halt = false
        let status = slot + base + statusOffset
        for i in ops.indices {
            let at = slot + base + offsets[i]
            var failure: TraceError?
            switch ops[i] {
            case let .register(r):
                do throws(TraceError) { store(try context.read(r), width: r.width, at: at) } catch { failure = error }
            case let .constantMemory(address, size):
                do throws(TraceError) {
                    // SAFETY: the entry's `size` bytes at `at` lie inside the slot (its layout).
                    var span = MutableRawSpan(_unsafeStart: at, byteCount: size)
                    try context.readMemory(at: address, into: &span)
                } catch { failure = error }
            case let .indirectMemory(op, size):
                do throws(TraceError) {
                    let address = try resolve(op, context: context)
                    at.storeBytes(of: address, as: UInt64.self)
                    // SAFETY: the entry's address and `size` bytes at `at` lie inside the slot.
                    var span = MutableRawSpan(_unsafeStart: at + 8, byteCount: size)
                    try context.readMemory(at: address, into: &span)
                } catch { failure = error }
            case let .callback(k):
                callbacks[k](hit, context)
            case .halt:
                halt = true
            }
            status.storeBytes(of: failure.map { reasons.index(for: $0.description) } ?? 0, toByteOffset: i, as: UInt8.self)
        }
        return halt
    }

    @inline(__always)
    private func resolve<C: HitContext>(_ op: MemoryOperand, context: C) throws(TraceError) -> UInt64 {
        var a: UInt64
        switch op.base {
        case let .register(r): a = try context.read(r).asUInt64
        case let .constant(c): a = c
        }
        if let index = op.index { a &+= try context.read(index).asUInt64 &* UInt64(op.scale) }
        return a &+ UInt64(bitPattern: op.displacement)
    }

    @inline(__always)
    // SAFETY: `p` is an entry's offset in a slot, with room for the register's width (the layout).
    private func store(_ v: RegisterValue, width: X86Register.Width, at p: UnsafeMutableRawPointer) {
        switch v {
        case let .u8(x): p.storeBytes(of: x, as: UInt8.self)
        case let .u16(x): p.storeBytes(of: x, as: UInt16.self)
        case let .u32(x): p.storeBytes(of: x, as: UInt32.self)
        case let .u64(x): p.storeBytes(of: x, as: UInt64.self)
        case let .u128(x): p.storeBytes(of: x, as: UInt128.self)
        case let .descriptorTable(base, limit):
            p.storeBytes(of: base, as: UInt64.self)
            p.storeBytes(of: limit, toByteOffset: 8, as: UInt16.self)
        }
    }
}

// MARK: Decoding (reports)

extension ProbeLayout {
    /// The values of every entry, decoded from `slot + base`.
    // SAFETY: `slot` is a record of this layout in a snapshot buffer; offsets are the layout's.
    func decode(from slot: UnsafeRawPointer, base: Int, reasons: ReasonTable) -> [ProbeValue] {
        entries.indices.map { decode(entry: $0, from: slot, base: base, reasons: reasons) }
    }

    func decode(entry i: Int, from slot: UnsafeRawPointer, base: Int, reasons: ReasonTable) -> ProbeValue {
        let at = slot + base + offsets[i]
        let status = slot.load(fromByteOffset: base + statusOffset + i, as: UInt8.self)
        switch entries[i] {
        case .callback, .halt: return .none
        default: break
        }
        if status != 0 { return .unreadable(reason: reasons.reason(status)) }
        switch entries[i] {
        case let .register(r):
            return .register(Self.load(width: r.width, from: at))
        case let .constantMemory(address, size):
            // SAFETY: an entry's `size` bytes lie inside the record slot (the layout).
            return .memory(address: address, bytes: [UInt8](UnsafeRawBufferPointer(start: at, count: size)))
        case let .indirectMemory(_, size):
            return .memory(address: at.loadUnaligned(as: UInt64.self),
                           bytes: [UInt8](UnsafeRawBufferPointer(start: at + 8, count: size)))
        case .callback, .halt:
            return .none
        }
    }

    // SAFETY: `p` points at an entry's bytes inside a record slot (unaligned loads).
    static func load(width: X86Register.Width, from p: UnsafeRawPointer) -> RegisterValue {
        switch width {
        case .u8: .u8(p.loadUnaligned(as: UInt8.self))
        case .u16: .u16(p.loadUnaligned(as: UInt16.self))
        case .u32: .u32(p.loadUnaligned(as: UInt32.self))
        case .u64: .u64(p.loadUnaligned(as: UInt64.self))
        case .u128: .u128(p.loadUnaligned(as: UInt128.self))
        case .descriptorTable: .descriptorTable(base: p.loadUnaligned(as: UInt64.self),
                                                limit: p.loadUnaligned(fromByteOffset: 8, as: UInt16.self))
        }
    }
}
