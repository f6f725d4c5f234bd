import Locking
#if canImport(Glibc)
import Glibc
#endif

/// A module's records: fixed-size slots in chunks, optionally bounded with O(1) eviction
/// of the oldest record, guarded by a spin lock.
///
/// Slots live in chunks of `chunkSlots` so growth never copies records. Bounded stores are
/// rings: once `capacity` records are kept, each new record overwrites the oldest.
///
/// A store that cannot get memory for a new chunk stops taking records: each record it
/// cannot keep is counted as lost, and the records it has stay intact.
final class RecordStore: @unchecked Sendable {
    // SAFETY: every mutable member is read and written only while `lock` is held. That lock
    // is what keeps accesses exclusive, so the per-access dynamic exclusivity checks (which
    // cost more than the rest of an append) are switched off with @exclusivity(unchecked).
    // Each chunk is `chunkSlots * slotSize` bytes from `allocator`, freed with free(3).
    typealias Chunk = UnsafeMutableRawPointer
    private let lock = SpinLock()
    private let allocator: @Sendable (Int) -> Chunk?
    @exclusivity(unchecked) private var chunks: [Chunk] = []
    @exclusivity(unchecked) private(set) var slotSize: Int
    /// 0 = unbounded.
    @exclusivity(unchecked) private var capacity: Int = 0
    /// Physical index of the oldest record (non-zero only once a bounded ring has wrapped).
    @exclusivity(unchecked) private var head = 0
    // SAFETY: the counters below, like the fields above, are touched only under `lock`.
    @exclusivity(unchecked) private var count = 0
    @exclusivity(unchecked) private var nextSequence: UInt64 = 0
    @exclusivity(unchecked) private var takenTotal: UInt64 = 0
    @exclusivity(unchecked) private var evictedTotal: UInt64 = 0
    @exclusivity(unchecked) private var lostTotal: UInt64 = 0
    /// A chunk could not be allocated: no more records are taken.
    @exclusivity(unchecked) private var exhausted = false
    /// Per location: records taken and evicted.
    @exclusivity(unchecked) private var takenAt: [UInt64] = []
    @exclusivity(unchecked) private var evictedAt: [UInt64] = []
    @exclusivity(unchecked) private var lostAt: [UInt64] = []

    static let chunkShift = 12
    static let chunkSlots = 1 << chunkShift

    /// malloc(3); nil when the system has no memory to give.
    static let systemAllocator: @Sendable (Int) -> Chunk? = { bytes in
        // SAFETY: a fresh allocation owned by the store until free(3) in deinit/removeAll.
        malloc(bytes)
    }

    init(slotSize: Int, allocator: @escaping @Sendable (Int) -> Chunk? = RecordStore.systemAllocator) {
        self.slotSize = slotSize
        self.allocator = allocator
    }

    deinit { for c in chunks { free(c) } }

    @inline(__always)
    private func slot(_ physical: Int) -> UnsafeMutableRawPointer {
        chunks[physical >> Self.chunkShift] + (physical & (Self.chunkSlots - 1)) * slotSize
    }

    /// Copies a collected record into the store, stamping sequence number and time under
    /// the lock so the store stays in sequence order. Returns false when the record was
    /// lost (no memory for it).
    @inline(__always) @discardableResult
    // SAFETY: `record` is a collected slot of `slotSize` bytes; it is copied into a chunk slot under `lock`.
    func append(_ record: UnsafeMutableRawPointer, location: Int, vcpu: Int) -> Bool {
        lock.lock()
        defer { lock.unlock() }
        if !(capacity > 0 && count == capacity), count >> Self.chunkShift == chunks.count, !growChunk() {
            lostAt[location] &+= 1
            lostTotal &+= 1
            return false
        }
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
            count += 1
        }
        slot(physical).copyMemory(from: record, byteCount: slotSize)
        takenAt[location] &+= 1
        takenTotal &+= 1
        return true
    }

    /// Adds a chunk; false (and no more tries) when the allocator has no memory.
    private func growChunk() -> Bool {
        guard !exhausted, let c = allocator(Self.chunkSlots * slotSize) else {
            exhausted = true
            return false
        }
        chunks.append(c)
        return true
    }

    /// Collects the common probe's and the probe's entries into a stack slot and appends it
    /// (or counts it lost). Returns whether either asked to halt.
    @inline(__always)
    func record<C: HitContext>(slotSize: Int, common: ProbeLayout, commonBase: Int, probe: ProbeLayout, probeBase: Int,
                               context: C, hit: ProbeHit, commonHit: ProbeHit, location: Int, vcpu: Int,
                               reasons: ReasonTable) -> Bool {
        // SAFETY: a stack slot of the plan's slot size, used by collect and append only during this call.
        withUnsafeTemporaryAllocation(byteCount: slotSize, alignment: 8) { raw -> Bool in
            let slot = raw.baseAddress.unsafelyUnwrapped
            // The common probe's halt answer is OR-ed with the probe's: either may stop.
            var halt = common.collect(into: slot, base: commonBase, context: context, hit: commonHit, reasons: reasons)
            halt = probe.collect(into: slot, base: probeBase, context: context, hit: hit, reasons: reasons) || halt
            append(slot, location: location, vcpu: vcpu)
            return halt
        }
    }

    /// Makes room for per-location counters of `locations` locations.
    func ensureLocations(_ locations: Int) {
        lock.withLock {
            if takenAt.count < locations {
                takenAt += Array(repeating: 0, count: locations - takenAt.count)
                evictedAt += Array(repeating: 0, count: locations - evictedAt.count)
                lostAt += Array(repeating: 0, count: locations - lostAt.count)
            }
        }
    }

    /// Changes slot size and bound, keeping the newest records that fit (older ones are
    /// counted as evicted). Called while no hits are in flight (module not enabled).
    /// Without memory for the new layout the records stay as they are and the store takes
    /// no more (they count as lost).
    func reconfigure(slotSize newSize: Int, capacity newCapacity: Int) {
        lock.withLock {
            exhausted = false
            let keep = newCapacity > 0 ? min(count, newCapacity) : count
            if newSize == slotSize && keep == count && head == 0 {
                capacity = newCapacity
                return
            }
            let oldSize = slotSize
            let old = (0..<count).map { slot(($0 + head) % max(capacity, count)) }
            var fresh: [Chunk] = []
            for _ in 0 ..< (keep + Self.chunkSlots - 1) >> Self.chunkShift {
                guard let c = allocator(Self.chunkSlots * newSize) else {
                    for f in fresh { free(f) }
                    exhausted = true
                    return
                }
                fresh.append(c)
            }
            let oldChunks = chunks
            chunks = fresh
            slotSize = newSize
            for r in old[..<(count - keep)] {
                let l = Int(r.load(fromByteOffset: RecordHeader.location, as: UInt32.self))
                evictedAt[l] &+= 1
                evictedTotal &+= 1
            }
            for (i, r) in old[(count - keep)...].enumerated() {
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
            exhausted = false
        }
    }

    /// A contiguous copy of every kept record, oldest first, taken under the lock so a
    /// concurrent hit can neither tear it nor overflow it. Without memory for the copy the
    /// buffer is empty and says how many records it misses.
    func snapshot() -> RecordBuffer {
        lock.withLock {
            guard let buffer = RecordBuffer(count: count, slotSize: slotSize, allocator: allocator) else {
                return RecordBuffer(missing: count, slotSize: slotSize)
            }
            var done = 0
            // At most two runs: from head to the end of the ring, then from 0.
            let ringEnd = capacity > 0 && count == capacity ? capacity : count
            var physical = head
            while done < count {
                let run = min(count - done, ringEnd - physical, Self.chunkSlots - (physical & (Self.chunkSlots - 1)))
                // SAFETY: `buffer` holds `count` slots (allocated above); runs stay inside the ring and a chunk.
                (buffer.base.unsafelyUnwrapped + done * slotSize).copyMemory(from: slot(physical), byteCount: run * slotSize)
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
        var lost: UInt64
        var lostAt: [UInt64]
    }

    var totals: Totals {
        lock.withLock {
            Totals(kept: count, taken: takenTotal, evicted: evictedTotal, takenAt: takenAt, evictedAt: evictedAt,
                   lost: lostTotal, lostAt: lostAt)
        }
    }
}

/// An immutable run of record slots, oldest first.
final class RecordBuffer: @unchecked Sendable {
    // SAFETY: filled once by `RecordStore.snapshot()` before it is shared, then only read.
    let base: UnsafeMutableRawPointer?
    let count: Int
    let slotSize: Int
    /// Records of the store this copy could not hold (no memory for it).
    let missing: Int

    init?(count: Int, slotSize: Int, allocator: (Int) -> UnsafeMutableRawPointer?) {
        guard let base = allocator(max(1, count * slotSize)) else { return nil }
        self.base = base
        self.count = count
        self.slotSize = slotSize
        missing = 0
    }

    init(missing: Int, slotSize: Int) {
        base = nil
        count = 0
        self.slotSize = slotSize
        self.missing = missing
    }

    deinit { free(base) }

    @inline(__always)
    func slot(_ i: Int) -> UnsafeRawPointer {
        // SAFETY: i < count, so base is non-nil and the slot lies inside the allocation.
        UnsafeRawPointer(base.unsafelyUnwrapped + i * slotSize)
    }
}

/// CLOCK_MONOTONIC in nanoseconds (vDSO, no system call).
@inline(__always)
func monotonicNanoseconds() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return UInt64(ts.tv_sec) &* 1_000_000_000 &+ UInt64(ts.tv_nsec)
}
