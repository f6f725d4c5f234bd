import Locking
#if canImport(Glibc)
import Glibc
#endif

/// A module's records: fixed-size slots in chunks, optionally bounded with O(1) eviction
/// of the oldest record, guarded by a spin lock.
///
/// Slots live in chunks of `chunkSlots` so growth never copies records. Bounded stores are
/// rings: once `capacity` records are kept, each new record overwrites the oldest.
final class RecordStore: @unchecked Sendable {
    // SAFETY: every mutable member is read and written only while `lock` is held. That lock
    // is what keeps accesses exclusive, so the per-access dynamic exclusivity checks (which
    // cost more than the rest of an append) are switched off with @exclusivity(unchecked).
    private let lock = SpinLock()
    @exclusivity(unchecked) private var chunks: [UnsafeMutableRawPointer] = []
    @exclusivity(unchecked) private(set) var slotSize: Int
    /// 0 = unbounded.
    @exclusivity(unchecked) private var capacity: Int = 0
    /// Physical index of the oldest record (non-zero only once a bounded ring has wrapped).
    @exclusivity(unchecked) private var head = 0
    @exclusivity(unchecked) private var count = 0
    @exclusivity(unchecked) private var nextSequence: UInt64 = 0
    @exclusivity(unchecked) private var takenTotal: UInt64 = 0
    @exclusivity(unchecked) private var evictedTotal: UInt64 = 0
    /// Per location: records taken and evicted.
    @exclusivity(unchecked) private var takenAt: [UInt64] = []
    @exclusivity(unchecked) private var evictedAt: [UInt64] = []

    static let chunkShift = 12
    static let chunkSlots = 1 << chunkShift

    init(slotSize: Int) {
        self.slotSize = slotSize
    }

    deinit { for c in chunks { free(c) } }

    @inline(__always)
    private func slot(_ physical: Int) -> UnsafeMutableRawPointer {
        chunks[physical >> Self.chunkShift] + (physical & (Self.chunkSlots - 1)) * slotSize
    }

    /// Copies a collected record into the store, stamping sequence number and time under
    /// the lock so the store stays in sequence order. Returns its sequence number.
    @inline(__always)
    func append(_ record: UnsafeMutableRawPointer, location: Int, vcpu: Int) -> UInt64 {
        lock.lock()
        defer { lock.unlock() }
        let seq = nextSequence
        nextSequence &+= 1
        record.storeBytes(of: seq, toByteOffset: RecordHeader.sequence, as: UInt64.self)
        record.storeBytes(of: monotonicNanoseconds(), toByteOffset: RecordHeader.timestamp, as: UInt64.self)
        record.storeBytes(of: UInt32(truncatingIfNeeded: location), toByteOffset: RecordHeader.location, as: UInt32.self)
        record.storeBytes(of: UInt32(truncatingIfNeeded: vcpu), toByteOffset: RecordHeader.vcpu, as: UInt32.self)
        let physical: Int
        if capacity > 0 && count == capacity {
            physical = head
            let old = Int(slot(physical).load(fromByteOffset: RecordHeader.location, as: UInt32.self))
            evictedAt[old] &+= 1
            evictedTotal &+= 1
            head += 1
            if head == capacity { head = 0 }
        } else {
            physical = count
            if physical >> Self.chunkShift == chunks.count { growChunk() }
            count += 1
        }
        slot(physical).copyMemory(from: record, byteCount: slotSize)
        takenAt[location] &+= 1
        takenTotal &+= 1
        return seq
    }

    private func growChunk() {
        guard let c = malloc(Self.chunkSlots * slotSize) else { fatalError("out of memory for trace records") }
        chunks.append(c)
    }

    /// Makes room for per-location counters of `locations` locations.
    func ensureLocations(_ locations: Int) {
        lock.withLock {
            if takenAt.count < locations {
                takenAt += Array(repeating: 0, count: locations - takenAt.count)
                evictedAt += Array(repeating: 0, count: locations - evictedAt.count)
            }
        }
    }

    /// Changes slot size and bound, keeping the newest records that fit (older ones are
    /// counted as evicted). Called while no hits are in flight (module not enabled).
    func reconfigure(slotSize newSize: Int, capacity newCapacity: Int) {
        lock.withLock {
            let keep = newCapacity > 0 ? min(count, newCapacity) : count
            if newSize == slotSize && keep == count && head == 0 {
                capacity = newCapacity
                return
            }
            let oldSize = slotSize
            let old = (0..<count).map { slot(($0 + head) % max(capacity, count)) }
            let oldChunks = chunks
            chunks = []
            slotSize = newSize
            for r in old[..<(count - keep)] {
                let l = Int(r.load(fromByteOffset: RecordHeader.location, as: UInt32.self))
                evictedAt[l] &+= 1
                evictedTotal &+= 1
            }
            for (i, r) in old[(count - keep)...].enumerated() {
                if i >> Self.chunkShift == chunks.count { growChunk() }
                let s = slot(i)
                s.initializeMemory(as: UInt8.self, repeating: 0, count: newSize)
                s.copyMemory(from: r, byteCount: min(oldSize, newSize))
            }
            for c in oldChunks { free(c) }
            head = 0
            count = keep
            capacity = newCapacity
        }
    }

    /// Drops every record (counters of taken and evicted records stay).
    func removeAll() {
        lock.withLock {
            for c in chunks { free(c) }
            chunks = []
            head = 0
            count = 0
        }
    }

    /// A contiguous copy of every kept record, oldest first, taken under the lock so a
    /// concurrent hit can neither tear it nor overflow it (the reference sized its copy
    /// outside the lock: defect 5).
    func snapshot() -> RecordBuffer {
        lock.withLock {
            let buffer = RecordBuffer(count: count, slotSize: slotSize)
            var done = 0
            // At most two runs: from head to the end of the ring, then from 0.
            let ringEnd = capacity > 0 && count == capacity ? capacity : count
            var physical = head
            while done < count {
                let run = min(count - done, ringEnd - physical, Self.chunkSlots - (physical & (Self.chunkSlots - 1)))
                (buffer.base + done * slotSize).copyMemory(from: slot(physical), byteCount: run * slotSize)
                done += run
                physical += run
                if physical == ringEnd { physical = 0 }
            }
            return buffer
        }
    }

    struct Totals {
        var kept: Int
        var taken: UInt64
        var evicted: UInt64
        var takenAt: [UInt64]
        var evictedAt: [UInt64]
    }

    var totals: Totals {
        lock.withLock { Totals(kept: count, taken: takenTotal, evicted: evictedTotal, takenAt: takenAt, evictedAt: evictedAt) }
    }
}

/// An immutable run of record slots, oldest first.
final class RecordBuffer: @unchecked Sendable {
    // SAFETY: filled once by `RecordStore.snapshot()` before it is shared, then only read.
    let base: UnsafeMutableRawPointer
    let count: Int
    let slotSize: Int

    init(count: Int, slotSize: Int) {
        self.count = count
        self.slotSize = slotSize
        base = malloc(max(1, count * slotSize))!
    }

    deinit { free(base) }

    @inline(__always)
    func slot(_ i: Int) -> UnsafeRawPointer { UnsafeRawPointer(base + i * slotSize) }
}

/// CLOCK_MONOTONIC in nanoseconds (vDSO, no system call).
@inline(__always)
func monotonicNanoseconds() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return UInt64(ts.tv_sec) &* 1_000_000_000 &+ UInt64(ts.tv_nsec)
}
