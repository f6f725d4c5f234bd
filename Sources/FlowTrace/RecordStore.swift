import Locking
#if canImport(Glibc)
import Glibc
#endif

/// A module's records: fixed-size slots in chunks, optionally bounded, guarded by a spin
/// lock, optionally streamed to one consumer in sequence order.
///
/// Records have logical positions (their order of arrival) from `base`, the first slot of
/// the first chunk, to `end`. Two windows keep them: the records kept for reports
/// (`keepFrom..<end`: with a `capacity`, the newest `capacity`; each record leaving it
/// counts as evicted) and, while a stream is open, the records not yet handed to it
/// (`streamed..<end`). A chunk is reused for new records once both windows have left it, so
/// memory follows the windows, never the length of the trace, and growth never copies.
///
/// A stream bounds its window (`maxPending` records): a hit that finds it full waits until
/// the consumer has taken some (the vCPU stalls rather than a record being dropped).
///
/// A store that cannot get memory for a new chunk stops taking records: each record it
/// cannot keep is counted as lost, and the records it has stay intact.
final class RecordStore: @unchecked Sendable {
    // SAFETY: every mutable member is read and written only while `lock` is held. That lock
    // is what keeps accesses exclusive, so the per-access dynamic exclusivity checks (which
    // cost more than the rest of an append) are switched off with @exclusivity(unchecked).
    // Each chunk is `chunkSlots * slotSize` bytes from `allocator`, freed with free(3). The
    // stream's consumer reads slots in `streamed..<end` outside `lock`: no append writes
    // there (appends write at `end`) and no chunk holding them is reused or freed before
    // `streamed` passes them, which only the consumer moves; `consumer` keeps
    // `reconfigure` and `removeAll`, which do move records, away from such a read.
    typealias Chunk = UnsafeMutableRawPointer
    private let lock = SpinLock()
    private let consumer = Locked<Void>(())
    private let allocator: @Sendable (Int) -> Chunk?
    @exclusivity(unchecked) private var chunks: [Chunk] = []
    // SAFETY: the fields below, like `chunks`, are touched only under `lock`.
    @exclusivity(unchecked) private(set) var slotSize: Int
    /// 0 = unbounded.
    @exclusivity(unchecked) private var capacity: Int = 0
    /// Logical position of the first slot of `chunks[0]`.
    @exclusivity(unchecked) private var base = 0
    /// Logical position of the next record (SAFETY: under `lock`, as every field here).
    @exclusivity(unchecked) private var end = 0
    /// The oldest record kept for reports.
    @exclusivity(unchecked) private var keepFrom = 0
    /// While a stream is open: the oldest record not yet handed to it.
    @exclusivity(unchecked) private var streaming = false
    @exclusivity(unchecked) private var streamed = 0
    @exclusivity(unchecked) private var maxPending = 0
    /// Producers go over `maxPending` instead of waiting (see `releaseProducers`).
    @exclusivity(unchecked) private var producersReleased = false
    // SAFETY: the counters below, like the fields above, are touched only under `lock`.
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
    /// Where a full stream's producers and its consumer meet (never touched under `lock`).
    private let signal = ConditionLock(StreamSignal())

    struct StreamSignal {
        /// Bumped by the consumer each time it takes records.
        var progress: UInt64 = 0
        /// Bumped by a producer that wants the consumer to come (its window is half full or full).
        var demand: UInt64 = 0
        var open = false
        /// Set by `releaseProducers` (the module disabled, its target stopping): producers no
        /// longer wait for room.
        var released = false
    }

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
    private func slot(_ logical: Int) -> UnsafeMutableRawPointer {
        let i = logical - base
        return chunks[i >> Self.chunkShift] + (i & (Self.chunkSlots - 1)) * slotSize
    }

    /// The oldest record either window still needs.
    @inline(__always)
    private var lowWater: Int { streaming ? min(streamed, keepFrom) : keepFrom }

    /// Copies a collected record into the store, stamping sequence number and time under
    /// the lock so the store stays in sequence order. Returns false when the record was
    /// lost (no memory for it).
    @inline(__always) @discardableResult
    // SAFETY: `record` is a collected slot of `slotSize` bytes; it is copied into a chunk slot under `lock`.
    func append(_ record: UnsafeMutableRawPointer, location: Int, vcpu: Int) -> Bool {
        lock.lock()
        var poke = false
        if streaming {
            // A full window waits for the consumer; the record that fills half of it calls it.
            while streaming, !producersReleased, end - streamed >= maxPending {
                lock.unlock()
                waitForStreamRoom()
                lock.lock()
            }
            poke = streaming && end - streamed == maxPending >> 1
        }
        defer {
            lock.unlock()
            if poke { signal.withLock { $0.demand &+= 1 } }
        }
        let evicting = capacity > 0 && end - keepFrom == capacity
        // Read before `makeRoom`, which may reuse the chunk that holds it.
        let evictedLocation = evicting ? Int(slot(keepFrom).load(fromByteOffset: RecordHeader.location, as: UInt32.self)) : 0
        if end - base == chunks.count << Self.chunkShift, !makeRoom(evicting: evicting) {
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
        if evicting {
            evictedAt[evictedLocation] &+= 1
            evictedTotal &+= 1
            keepFrom += 1
        }
        slot(end).copyMemory(from: record, byteCount: slotSize)
        end += 1
        takenAt[location] &+= 1
        takenTotal &+= 1
        return true
    }

    /// A slot for the record at `end` when every chunk is full: the oldest chunk once
    /// neither window needs it (counting the record `evicting` is about to evict), else a
    /// new one; false (and no more tries) when the allocator has no memory.
    private func makeRoom(evicting: Bool) -> Bool {
        let keptFrom = keepFrom + (evicting ? 1 : 0)
        let low = streaming ? min(streamed, keptFrom) : keptFrom
        if low - base >= Self.chunkSlots {
            chunks.append(chunks.removeFirst())
            base += Self.chunkSlots
            return true
        }
        guard !exhausted, let c = allocator(Self.chunkSlots * slotSize) else {
            exhausted = true
            return false
        }
        chunks.append(c)
        return true
    }

    /// Frees the chunks before `lowWater`.
    private func releaseUnneeded() {
        while !chunks.isEmpty, lowWater - base >= Self.chunkSlots {
            free(chunks.removeFirst())
            base += Self.chunkSlots
        }
        if lowWater == end {
            for c in chunks { free(c) }
            chunks = []
            base = end
        }
    }

    /// Called by a producer (outside `lock`) whose stream window is full: wakes the
    /// consumer and waits until it has taken records (or the stream closed).
    @inline(never)
    private func waitForStreamRoom() {
        let seen = signal.withLock { s -> UInt64 in
            s.demand &+= 1
            return s.progress
        }
        let full = lock.withLock { streaming && !producersReleased && end - streamed >= maxPending }
        if full { signal.wait(until: { $0.progress != seen || !$0.open || $0.released }) }
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
    /// counted as evicted) and every record the stream has not taken yet. Called while no
    /// hits are in flight (module not enabled). Without memory for the new layout the
    /// records stay as they are and the store takes no more (they count as lost).
    func reconfigure(slotSize newSize: Int, capacity newCapacity: Int) {
        consumer.withLock { _ in
            lock.withLock {
                exhausted = false
                let newKeepFrom = newCapacity > 0 ? max(keepFrom, end - newCapacity) : keepFrom
                if newKeepFrom > keepFrom {
                    for r in keepFrom..<newKeepFrom {
                        let l = Int(slot(r).load(fromByteOffset: RecordHeader.location, as: UInt32.self))
                        evictedAt[l] &+= 1
                        evictedTotal &+= 1
                    }
                }
                keepFrom = newKeepFrom
                capacity = newCapacity
                guard newSize != slotSize else {
                    releaseUnneeded()
                    return
                }
                let low = lowWater
                var fresh: [Chunk] = []
                for _ in 0 ..< (end - low + Self.chunkSlots - 1) >> Self.chunkShift {
                    guard let c = allocator(Self.chunkSlots * newSize) else {
                        for f in fresh { free(f) }
                        exhausted = true
                        releaseUnneeded()
                        return
                    }
                    fresh.append(c)
                }
                for r in low..<end {
                    let i = r - low
                    let s = fresh[i >> Self.chunkShift] + (i & (Self.chunkSlots - 1)) * newSize
                    s.initializeMemory(as: UInt8.self, repeating: 0, count: newSize)
                    s.copyMemory(from: slot(r), byteCount: min(slotSize, newSize))
                }
                for c in chunks { free(c) }
                chunks = fresh
                base = low
                slotSize = newSize
            }
        }
    }

    /// Drops every record kept for reports (counters of taken and evicted records stay;
    /// records an open stream has not taken yet are still handed to it).
    func removeAll() {
        consumer.withLock { _ in
            lock.withLock {
                keepFrom = end
                releaseUnneeded()
                exhausted = false
            }
        }
    }

    /// A contiguous copy of every kept record, oldest first, taken under the lock so a
    /// concurrent hit can neither tear it nor overflow it. Without memory for the copy the
    /// buffer is empty and says how many records it misses.
    func snapshot() -> RecordBuffer {
        lock.withLock {
            copy(keepFrom..<end)
        }
    }

    /// `range` (logical positions, all in the store) copied into a new buffer.
    private func copy(_ range: Range<Int>) -> RecordBuffer {
        Self.copy(runs(range), count: range.count, slotSize: slotSize, allocator: allocator)
    }

    /// Where the slots of `range` lie: one run of consecutive slots per chunk.
    // SAFETY: the pointers are into chunks; the caller holds `lock`, and reads them while no
    // chunk holding `range` can be reused (under `lock`, or the stream's window).
    private func runs(_ range: Range<Int>) -> [(UnsafeMutableRawPointer, Int)] {
        var runs: [(UnsafeMutableRawPointer, Int)] = []
        var r = range.lowerBound
        while r < range.upperBound {
            let run = min(range.upperBound - r, Self.chunkSlots - ((r - base) & (Self.chunkSlots - 1)))
            runs.append((slot(r), run))
            r += run
        }
        return runs
    }

    /// The slots of `runs` (`count` in all) copied into a new buffer, or one that says it
    /// misses them (no memory).
    // SAFETY: each run is `n` slots of `slotSize` bytes inside a chunk (see `runs`); the
    // buffer holds `count` slots.
    private static func copy(_ runs: [(UnsafeMutableRawPointer, Int)], count: Int, slotSize: Int,
                             allocator: (Int) -> Chunk?) -> RecordBuffer {
        guard let buffer = RecordBuffer(count: count, slotSize: slotSize, allocator: allocator) else {
            return RecordBuffer(missing: count, slotSize: slotSize)
        }
        var done = 0
        for (p, n) in runs {
            (buffer.base.unsafelyUnwrapped + done * slotSize).copyMemory(from: p, byteCount: n * slotSize)
            done += n
        }
        return buffer
    }

    // MARK: Stream

    /// Opens the stream: from now on every record is kept until `takeStreamed` has handed it
    /// out, at most `maxPendingBytes` of them (at least one chunk) waiting at a time.
    func openStream(maxPendingBytes: Int) {
        lock.withLock {
            streaming = true
            producersReleased = false
            streamed = end
            maxPending = max(Self.chunkSlots, maxPendingBytes / max(1, slotSize)) & ~(Self.chunkSlots - 1)
        }
        signal.withLock { $0.open = true; $0.released = false }
    }

    /// From now on a producer that finds the stream's window full goes on instead of
    /// waiting (the window grows; nothing is dropped), and one waiting now wakes. For the
    /// end of tracing: a consumer that disables the module or stops its target is then not
    /// waited for by a hit it would itself have to drain. `openStream` bounds it again.
    func releaseProducers() {
        lock.withLock { producersReleased = true }
        signal.withLock { $0.released = true }
    }

    /// Closes the stream: records it has not taken are no longer kept for it, and a
    /// producer waiting for room goes on.
    func closeStream() {
        lock.withLock {
            streaming = false
            releaseUnneeded()
        }
        signal.withLock { $0.open = false }
    }

    /// The records the stream has not taken yet, oldest first, at most `limit` of them,
    /// copied out; they count as taken by the stream. Empty when there are none (or no
    /// stream is open). With `wait`, waits up to that long for a producer's call (a window
    /// half full) when there are fewer than `limit`.
    func takeStreamed(limit: Int, wait: Duration?) -> RecordBuffer {
        if let wait {
            let seen = signal.withLock { $0.demand }
            let short = lock.withLock { streaming && end - streamed < limit }
            if short { signal.wait(until: { $0.demand != seen || !$0.open }, timeout: wait) }
        }
        let buffer: RecordBuffer = consumer.withLock { _ in
            let (from, count, size): (Int, Int, Int) = lock.withLock {
                guard streaming else { return (0, 0, slotSize) }
                return (streamed, min(limit, end - streamed), slotSize)
            }
            guard count > 0 else { return RecordBuffer(missing: 0, slotSize: size) }
            // Outside `lock`: appends go on meanwhile (see SAFETY above).
            let b = copyUnlocked(from: from, count: count)
            lock.withLock { streamed = from + count }
            return b
        }
        if buffer.count > 0 || buffer.missing > 0 { signal.withLock { $0.progress &+= 1 } }
        return buffer
    }

    /// `copy` for the stream's window without holding `lock` over the copy: the chunk list
    /// is read under it, the slots after it.
    private func copyUnlocked(from: Int, count: Int) -> RecordBuffer {
        // SAFETY: the chunk pointers are read under `lock`; the slots they point at are read
        // after it, which the class's SAFETY paragraph allows for `streamed..<end`.
        let (slots, size) = lock.withLock { () -> ([(UnsafeMutableRawPointer, Int)], Int) in (runs(from..<from + count), slotSize) }
        return Self.copy(slots, count: count, slotSize: size, allocator: allocator)
    }

    struct Totals {
        var kept: Int
        var taken: UInt64
        var evicted: UInt64
        var takenAt: [UInt64]
        var evictedAt: [UInt64]
        var lost: UInt64
        var lostAt: [UInt64]
        /// Records an open stream has not taken yet.
        var pending: Int
        /// Slots allocated (memory held, in records).
        var slots: Int
    }

    var totals: Totals {
        lock.withLock {
            Totals(kept: end - keepFrom, taken: takenTotal, evicted: evictedTotal, takenAt: takenAt, evictedAt: evictedAt,
                   lost: lostTotal, lostAt: lostAt, pending: streaming ? end - streamed : 0,
                   slots: chunks.count << Self.chunkShift)
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
