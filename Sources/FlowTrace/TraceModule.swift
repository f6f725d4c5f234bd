import Locking
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// A probe placed at an address in a trace module.
public struct ProbeLocation: Sendable {
    /// Guest-virtual address of the instruction.
    public let address: UInt64
    public let probe: Probe
    public let timing: ProbeTiming
    /// Evaluated at each hit before anything is recorded; nil: every hit counts.
    public let condition: ProbeCondition?
    let layout: ProbeLayout
}

/// Per-location figures of a module.
public struct LocationCounters: Sendable, Equatable {
    public var address: UInt64
    public var timing: ProbeTiming
    /// Hits delivered here while the module was enabled, whether taken or suppressed (by
    /// the vCPU selection or the hit limit).
    public var hits: UInt64
    /// Records taken here (kept + evicted).
    public var taken: UInt64
    /// Records taken here and later evicted by `maxRecords`.
    public var evicted: UInt64
    /// Hits here whose record was lost: the store had no memory for it.
    public var lost: UInt64
    /// Hits here whose condition was false ("filtered at the hit"), read failures included.
    public var filtered: UInt64
    /// Hits here whose condition could not be evaluated (a register or memory read failed),
    /// counted in `filtered` too, and the reason of the latest.
    public var conditionUnreadable: UInt64
    public var conditionUnreadableReason: String?

    public init(address: UInt64, timing: ProbeTiming, hits: UInt64, taken: UInt64, evicted: UInt64, lost: UInt64 = 0,
                filtered: UInt64 = 0, conditionUnreadable: UInt64 = 0, conditionUnreadableReason: String? = nil) {
        self.address = address; self.timing = timing; self.hits = hits; self.taken = taken; self.evicted = evicted
        self.lost = lost; self.filtered = filtered; self.conditionUnreadable = conditionUnreadable
        self.conditionUnreadableReason = conditionUnreadableReason
    }

    /// Records kept here now.
    public var kept: UInt64 { taken - evicted }
    /// Hits here that took no record for another reason than the condition (another vCPU
    /// than the module's, or over the limit).
    public var suppressed: UInt64 { hits &- taken &- lost &- filtered }
}

/// A module's counters.
public struct TraceCounters: Sendable, Equatable {
    /// Every hit delivered to the module.
    public var hitsSeen: UInt64
    /// Records taken (kept + evicted).
    public var recordsTaken: UInt64
    /// Records currently kept.
    public var recordsKept: Int
    /// Records evicted because of `maxRecords`.
    public var evicted: UInt64
    /// Records lost because the store had no memory for them (the run went on).
    public var recordsLost: UInt64
    /// Hits from a vCPU the module does not trace.
    public var suppressedWrongVCPU: UInt64
    /// Hits past the hit limit (delivered while the target was disarming the module).
    public var suppressedOverLimit: UInt64
    /// Hits delivered while the module was not enabled.
    public var suppressedDisabled: UInt64
    /// Hits whose location's condition was false (see `LocationCounters.filtered`).
    public var filteredAtHit: UInt64 = 0
    /// Per location, in the order they were added.
    public var locations: [LocationCounters]

    /// All suppressed hits.
    public var suppressed: UInt64 { suppressedWrongVCPU + suppressedOverLimit + suppressedDisabled }
}

/// A set of probe locations traced on one vCPU or any vCPU, with an optional common probe
/// collected at every location, recording each hit into a bounded store.
///
/// States: `created` (probes can be added) -> `enable` -> `enabled` -> `disable` or the hit
/// limit -> `created` ... ; `targetGone` once the machine it traces no longer exists.
public final class TraceModule: Sendable {
    // The plan (in `planBox`) is the only member not protected by a lock or an atomic. It is
    // replaced only under `control`, by the one control operation in progress (`operation`),
    // while the module is not enabled and after every hit in flight has drained
    // (`inFlight` == 0); hits read it only after a load saw `enabled`, which was stored
    // after the last replacement. `inFlight` and `stateValue` are sequentially consistent on
    // both sides (a hit: increment, then load the state; a control operation: store the
    // state, then load the count), so a drain never misses a hit that saw `enabled`.
    //
    // Locks: `control` guards `plan` and the limits, and nothing is ever called while it is
    // held: not the target, not a callback. The target is an immutable weak reference read
    // without a lock, so the hit path takes no lock of the module at all.

    public enum State: String, Sendable, CustomStringConvertible {
        case created, enabled, targetGone
        public var description: String { rawValue }
    }

    /// The vCPUs this module records.
    public let vcpus: VCPUSelection
    /// Collected at every location, after the location's own probe.
    public let commonProbe: Probe?
    let commonLayout: ProbeLayout

    fileprivate final class Plan: Sendable {
        let locations: [ProbeLocation]
        // The hit path's view of `locations`, one plain array per field.
        let layouts: [ProbeLayout]
        let addresses: [UInt64]
        let timings: [ProbeTiming]
        let hits: [HitCounter]
        /// Every location's condition program, one after the other (plain values: the hit
        /// path reads them without reference counting), and per location its range
        /// (empty: no condition) and what it filtered.
        let conditionCode: [ProbeCondition.Instruction]
        let conditionStart: [Int]
        let conditionEnd: [Int]
        /// Conditions that are range tests (see `ProbeCondition.ranges`) run as such: every
        /// location's tests in one array, its range, and whether all or any must hold.
        let rangeTests: [ProbeCondition.RangeTest]
        let rangeStart: [Int]
        let rangeEnd: [Int]
        let rangeAll: [Bool]
        let filtered: [ConditionCounter]
        let anyCondition: Bool
        /// Computed at each hit taken; states per location, then per aggregation.
        let aggregations: [Aggregation]
        let aggregationStates: [[AggregationState]]
        let commonBase = RecordHeader.size
        let probeBase: Int
        let slotSize: Int

        init(locations: [ProbeLocation], commonLayout: ProbeLayout, aggregations: [Aggregation], carrying old: Plan?) {
            self.locations = locations
            self.aggregations = aggregations
            let keptStates = old?.aggregationStates ?? []
            aggregationStates = locations.indices.map { l in
                aggregations.indices.map { k in
                    l < keptStates.count && k < keptStates[l].count ? keptStates[l][k] : AggregationState(aggregations[k])
                }
            }
            layouts = locations.map(\.layout)
            addresses = locations.map(\.address)
            timings = locations.map(\.timing)
            let kept = old?.hits ?? []
            hits = locations.indices.map { $0 < kept.count ? kept[$0] : HitCounter() }
            var code: [ProbeCondition.Instruction] = [], starts: [Int] = [], ends: [Int] = []
            var tests: [ProbeCondition.RangeTest] = [], testStarts: [Int] = [], testEnds: [Int] = [], all: [Bool] = []
            for l in locations {
                starts.append(code.count)
                testStarts.append(tests.count)
                if let r = l.condition?.ranges {
                    tests += r.tests
                } else {
                    code += l.condition?.program ?? []
                }
                ends.append(code.count)
                testEnds.append(tests.count)
                all.append(l.condition?.ranges?.all ?? true)
            }
            rangeTests = tests
            rangeStart = testStarts
            rangeEnd = testEnds
            rangeAll = all
            conditionCode = code
            conditionStart = starts
            conditionEnd = ends
            let keptFiltered = old?.filtered ?? []
            filtered = locations.indices.map { $0 < keptFiltered.count ? keptFiltered[$0] : ConditionCounter() }
            anyCondition = !code.isEmpty || !tests.isEmpty
            probeBase = RecordHeader.size + commonLayout.size
            let widest = locations.map(\.layout.size).max() ?? 0
            slotSize = (probeBase + widest + 7) & ~7
        }
    }

    private struct Control {
        var hitLimit: UInt64 = 0
        var maxRecords = 0
    }

    /// The machine this module traces; nil once it is gone.
    private weak let target: (any TraceTarget)?
    private let control: Locked<Control>
    /// A control operation (adding probes, enable, disable) is in progress.
    private let operation = Atomic<Bool>(false)
    /// Read by hits without a lock; replaced only with no hit in flight (see above).
    private let planBox: QuiescentBox<Plan>
    private var plan: Plan { planBox.current }
    private let stateValue = Atomic<UInt8>(0)         // 0 created, 1 enabled
    private let limited = Atomic<Bool>(false)
    private let hitsLeft = Atomic<UInt64>(0)
    private let inFlight = Atomic<Int>(0)
    private let suppressedWrongVCPU = Atomic<UInt64>(0)
    private let suppressedOverLimit = Atomic<UInt64>(0)
    private let suppressedDisabled = Atomic<UInt64>(0)
    private let store: RecordStore
    let reasons = ReasonTable()

    /// Creates a module tracing `vcpus` of `target`. Throws for a vCPU the target lacks;
    /// nothing is retained then.
    public convenience init(target: any TraceTarget, vcpus: VCPUSelection = .any, commonProbe: Probe? = nil) throws(TraceError) {
        try self.init(target: target, vcpus: vcpus, commonProbe: commonProbe, allocator: RecordStore.systemAllocator)
    }

    /// `allocator` gets the record store's chunks (tests make it fail).
    init(target: any TraceTarget, vcpus: VCPUSelection, commonProbe: Probe?,
         allocator: @escaping @Sendable (Int) -> RecordStore.Chunk?) throws(TraceError) {
        if case let .only(k) = vcpus, k < 0 || k >= target.vcpuCount {
            throw TraceError.vcpuOutOfRange(k, count: target.vcpuCount)
        }
        self.vcpus = vcpus
        self.commonProbe = commonProbe
        commonLayout = ProbeLayout(entries: commonProbe?.retain() ?? [])
        self.target = target
        control = Locked(Control())
        planBox = QuiescentBox(Plan(locations: [], commonLayout: commonLayout, aggregations: [], carrying: nil))
        store = RecordStore(slotSize: planBox.current.slotSize, allocator: allocator)
    }

    deinit {
        for l in plan.locations { l.probe.release() }
        commonProbe?.release()
    }

    /// The module's state.
    public var state: State {
        if target == nil { return .targetGone }
        return stateValue.load(ordering: .sequentiallyConsistent) == 1 ? .enabled : .created
    }

    /// The probe locations, in the order they were added.
    public var locations: [ProbeLocation] { control.withLock { _ in plan.locations } }

    /// Places `probe` at `address`. Only while `created`; one probe per address. With a
    /// `condition`, a hit there counts only when it is true (see `ProbeCondition`).
    public func addProbe(_ probe: Probe, at address: UInt64, timing: ProbeTiming = .before,
                         condition: ProbeCondition? = nil) throws(TraceError) {
        try addProbes([(probe, address, timing, condition)])
    }

    /// Places several probes at once: all of them, or (on an error) none.
    public func addProbes(_ list: [(probe: Probe, address: UInt64, timing: ProbeTiming)]) throws(TraceError) {
        try addProbes(list.map { ($0.probe, $0.address, $0.timing, nil) })
    }

    /// Places several probes with their conditions at once: all of them, or none.
    public func addProbes(_ list: [(probe: Probe, address: UInt64, timing: ProbeTiming, condition: ProbeCondition?)]) throws(TraceError) {
        try exclusively("add a probe to") { () throws(TraceError) in
            guard target != nil else { throw TraceError.targetGone }
            guard stateValue.load(ordering: .sequentiallyConsistent) == 0 else {
                throw TraceError.invalidState(operation: "add a probe to", state: .enabled)
            }
            var taken = Set(plan.locations.map(\.address))
            for p in list {
                guard taken.insert(p.address).inserted else { throw TraceError.duplicateLocation(p.address) }
            }
            let locations = list.map { p in
                ProbeLocation(address: p.address, probe: p.probe, timing: p.timing, condition: p.condition,
                              layout: ProbeLayout(entries: p.probe.retain()))
            }
            // Hits that saw `enabled` before a self-disable may still read the plan.
            drainHitsInFlight()
            control.withLock { _ in
                planBox.replace(Plan(locations: plan.locations + locations, commonLayout: commonLayout, aggregations: plan.aggregations, carrying: plan))
            }
            store.ensureLocations(plan.locations.count)
        }
    }

    /// Adds an aggregation, computed at every hit the module takes from now on at each of its
    /// locations (see `aggregationResults`). Only while `created`.
    public func addAggregation(_ aggregation: Aggregation) throws(TraceError) {
        try exclusively("add an aggregation to") { () throws(TraceError) in
            guard target != nil else { throw TraceError.targetGone }
            guard stateValue.load(ordering: .sequentiallyConsistent) == 0 else {
                throw TraceError.invalidState(operation: "add an aggregation to", state: .enabled)
            }
            drainHitsInFlight()
            control.withLock { _ in
                planBox.replace(Plan(locations: plan.locations, commonLayout: commonLayout, aggregations: plan.aggregations + [aggregation], carrying: plan))
            }
        }
    }

    /// What each aggregation found, per location: aggregations in the order they were
    /// added, locations in order within each.
    public var aggregationResults: [AggregationResult] {
        control.withLock { _ in
            let p = plan
            return p.aggregations.indices.flatMap { k in
                p.locations.indices.map { l in
                    p.aggregationStates[l][k].result(p.aggregations[k], address: p.locations[l].address, timing: p.locations[l].timing, reasons: reasons)
                }
            }
        }
    }

    /// Arms every location on the target and starts recording.
    /// - Parameters:
    ///   - hitLimit: records to take before the module disables itself; 0 = no limit.
    ///   - maxRecords: records to keep; beyond it the oldest is evicted; 0 = unbounded.
    public func enable(hitLimit: UInt64 = 0, maxRecords: Int = 0) throws(TraceError) {
        try exclusively("enable") { () throws(TraceError) in
            guard let target else { throw TraceError.targetGone }
            guard stateValue.load(ordering: .sequentiallyConsistent) == 0 else { throw TraceError.invalidState(operation: "enable", state: .enabled) }
            guard !plan.locations.isEmpty else { throw TraceError.noProbes }
            drainHitsInFlight()
            store.reconfigure(slotSize: plan.slotSize, capacity: max(0, maxRecords))
            control.withLock { c in
                c.hitLimit = hitLimit
                c.maxRecords = maxRecords
            }
            // Set before any hit can see `enabled`; one CAS per hit then takes from it.
            hitsLeft.store(hitLimit, ordering: .relaxed)
            limited.store(hitLimit > 0, ordering: .relaxed)
            // Enabled before arming: the target may deliver hits as soon as it has armed.
            stateValue.store(1, ordering: .sequentiallyConsistent)
            let armed = plan.locations.enumerated().map { ArmedLocation(index: $0.offset, address: $0.element.address, timing: $0.element.timing) }
            do throws(TraceError) {
                try target.arm(self, locations: armed, vcpus: vcpus)
            } catch {
                stateValue.store(0, ordering: .sequentiallyConsistent)
                throw error
            }
        }
    }

    /// Stops recording and disarms the target. Records stay until `clear()`.
    /// Disabling a module that is not enabled (e.g. after it reached its hit limit) only
    /// makes sure the target has disarmed it.
    public func disable() throws(TraceError) {
        try exclusively("disable") { () throws(TraceError) in
            guard let target else { throw TraceError.targetGone }
            stateValue.store(0, ordering: .sequentiallyConsistent)
            // A hit waiting for room in a full stream would never let the target park its
            // vCPU, and the caller may be the stream's consumer: those hits go on.
            store.releaseProducers()
            // No lock of this module is held here: a vCPU taking the last hit of the budget
            // needs none, so a target that waits for every vCPU to park gets them all.
            try target.disarm(self)
        }
    }

    /// Runs one control operation; a second one started meanwhile (on another thread, or
    /// from a probe callback) is refused instead of waiting, so no wait can form a cycle
    /// with the target.
    private func exclusively(_ name: String, _ body: () throws(TraceError) -> Void) throws(TraceError) {
        guard operation.compareExchange(expected: false, desired: true, ordering: .acquiring).exchanged else {
            throw TraceError.concurrentOperation(name)
        }
        defer { operation.store(false, ordering: .releasing) }
        try body()
    }

    /// Waits until no hit is between its first look at the state and its return.
    private func drainHitsInFlight() {
        while inFlight.load(ordering: .sequentiallyConsistent) != 0 { sched_yield() }
    }

    /// Drops every record kept so far.
    public func clear() { store.removeAll() }

    /// An immutable snapshot of the records kept, oldest first.
    public func report() -> TraceReport {
        control.withLock { _ in
            TraceReport(buffer: store.snapshot(), locations: plan.locations, commonProbe: commonProbe,
                        commonLayout: commonLayout, probeBase: plan.probeBase, reasons: reasons)
        }
    }

    // MARK: Stream

    /// Opens the module's record stream: every record taken from now on is handed, in
    /// sequence order, to `takeStreamed` (one consumer, on a thread of its own), whatever
    /// `maxRecords` keeps for `report()`. At most `maxPendingBytes` of records (at least
    /// 4,096 records) wait for the consumer: a hit that finds that many waiting waits until
    /// it takes some, so nothing is dropped and memory stays bounded, but a consumer that
    /// stops taking stalls the guest until `closeStream()`.
    public func openStream(maxPendingBytes: Int = 64 << 20) {
        control.withLock { _ in store.openStream(maxPendingBytes: maxPendingBytes) }
    }

    /// The records taken since the last call (at most `maxRecords`, oldest first), as a
    /// report to filter and write. Empty when there are none; with `wait`, waits up to
    /// that long for hits to fill the stream's window halfway before answering with what
    /// there is (a consumer's flush interval). Once the module is disabled and this returns
    /// an empty report, the stream has handed out every record.
    public func takeStreamed(maxRecords: Int = 16_384, wait: Duration? = nil) -> TraceReport {
        let buffer = store.takeStreamed(limit: max(1, maxRecords), wait: wait)
        return control.withLock { _ in
            TraceReport(buffer: buffer, locations: plan.locations, commonProbe: commonProbe,
                        commonLayout: commonLayout, probeBase: plan.probeBase, reasons: reasons)
        }
    }

    /// The record store's own counts (tests: memory held, records waiting for the stream).
    var storeTotals: RecordStore.Totals { store.totals }

    /// Hits waiting for room in a full stream go on, and no later hit waits (the stream's
    /// window grows instead; nothing is dropped). A target calls it when it stops running
    /// (`disable()` does it too), so a stop requested by the stream's own consumer is never
    /// waited for by a hit only that consumer could release.
    public func releaseStreamWaiters() { store.releaseProducers() }

    /// Closes the stream: records it has not handed out are dropped from it (they stay in
    /// `report()` if `maxRecords` keeps them), and a hit waiting for room goes on.
    public func closeStream() { store.closeStream() }

    /// The module's counters.
    public var counters: TraceCounters {
        control.withLock { _ in
            let t = store.totals
            let p = plan
            let locations = p.locations.indices.map { i in
                LocationCounters(address: p.locations[i].address, timing: p.locations[i].timing,
                                 hits: p.hits[i].value.load(ordering: .relaxed),
                                 taken: i < t.takenAt.count ? t.takenAt[i] : 0,
                                 evicted: i < t.evictedAt.count ? t.evictedAt[i] : 0,
                                 lost: i < t.lostAt.count ? t.lostAt[i] : 0,
                                 filtered: p.filtered[i].filtered.load(ordering: .relaxed),
                                 conditionUnreadable: p.filtered[i].unreadable.load(ordering: .relaxed),
                                 conditionUnreadableReason: p.filtered[i].unreadable.load(ordering: .relaxed) > 0
                                     ? reasons.reason(p.filtered[i].reason.load(ordering: .relaxed)) : nil)
            }
            let wrongVCPU = suppressedWrongVCPU.load(ordering: .relaxed)
            let overLimit = suppressedOverLimit.load(ordering: .relaxed)
            let disabled = suppressedDisabled.load(ordering: .relaxed)
            // Every delivered hit ends in exactly one of these counters, so the total needs
            // no counter of its own on the hit path.
            return TraceCounters(
                hitsSeen: locations.reduce(0) { $0 + $1.hits } + disabled,
                recordsTaken: t.taken, recordsKept: t.kept, evicted: t.evicted, recordsLost: t.lost,
                suppressedWrongVCPU: wrongVCPU, suppressedOverLimit: overLimit, suppressedDisabled: disabled,
                filteredAtHit: locations.reduce(0) { $0 + $1.filtered },
                locations: locations)
        }
    }

    // MARK: Hit path

    /// Records a hit at armed location `location` (the `ArmedLocation.index` the target got).
    /// Called by the target on the hitting vCPU's thread; returns whether to halt.
    public func hit<C: HitContext>(location: Int, context: C) -> HitAction {
        inFlight.add(1, ordering: .sequentiallyConsistent)
        defer { inFlight.subtract(1, ordering: .releasing) }
        guard stateValue.load(ordering: .sequentiallyConsistent) == 1 else {
            suppressedDisabled.add(1, ordering: .relaxed)
            return .continue
        }
        let p = plan
        guard location >= 0, location < p.locations.count else {
            suppressedDisabled.add(1, ordering: .relaxed)
            return .continue
        }
        // Every hit delivered while enabled counts at its location, taken or not, so the
        // summary can show per location what the vCPU selection and the budget held back.
        p.hits[location].value.add(1, ordering: .relaxed)
        let vcpu = context.vcpu
        guard vcpus.contains(vcpu) else {
            suppressedWrongVCPU.add(1, ordering: .relaxed)
            return .continue
        }
        // The condition comes before the budget: a false one takes nothing.
        if p.anyCondition {
            let holds: Bool
            do throws(TraceError) {
                if p.rangeStart[location] < p.rangeEnd[location] {
                    holds = try ProbeCondition.run(p.rangeTests, from: p.rangeStart[location], to: p.rangeEnd[location],
                                                   all: p.rangeAll[location], context)
                } else if p.conditionStart[location] < p.conditionEnd[location] {
                    holds = try ProbeCondition.run(p.conditionCode, from: p.conditionStart[location], to: p.conditionEnd[location], context)
                } else {
                    holds = true
                }
            } catch {
                countConditionFailure(p.filtered[location], error)
                holds = false
            }
            if !holds {
                p.filtered[location].filtered.add(1, ordering: .relaxed)
                return .continue
            }
        }
        // One compare-exchange loop takes a hit from the budget, so concurrent vCPUs can
        // never take more than the limit.
        var lastHit = false
        if limited.load(ordering: .relaxed) {
            var left = hitsLeft.load(ordering: .relaxed)
            while true {
                guard left > 0 else {
                    suppressedOverLimit.add(1, ordering: .relaxed)
                    return .continue
                }
                let (done, now) = hitsLeft.compareExchange(expected: left, desired: left - 1, ordering: .acquiringAndReleasing)
                if done { break }
                left = now
            }
            lastHit = left == 1
        }
        if !p.aggregations.isEmpty { aggregate(p, location, context) }
        let timing = p.timings[location]
        let halt = store.record(slotSize: p.slotSize, common: commonLayout, commonBase: p.commonBase,
                                probe: p.layouts[location], probeBase: p.probeBase, context: context,
                                hit: ProbeHit(vcpu: vcpu, address: p.addresses[location], timing: timing),
                                commonHit: ProbeHit(vcpu: vcpu, address: nil, timing: timing),
                                location: location, vcpu: vcpu, reasons: reasons)
        if lastHit, stateValue.compareExchange(expected: 1, desired: 0, ordering: .sequentiallyConsistent).exchanged {
            target?.moduleReachedHitLimit(self)
        }
        return halt ? .halt : .continue
    }
}

extension TraceModule {
    /// Each aggregation's value at this hit, counted at its location.
    fileprivate func aggregate<C: HitContext>(_ p: Plan, _ location: Int, _ context: C) {
        let states = p.aggregationStates[location]
        for (k, a) in p.aggregations.enumerated() {
            do throws(TraceError) {
                states[k].add(try a.expression.value(context), a)
            } catch {
                states[k].reason.store(reasons.index(for: error.description), ordering: .relaxed)
                states[k].unreadable.value.add(1, ordering: .relaxed)
            }
        }
    }

    /// Off the fast path: a condition's read failed; counted with its reason.
    @inline(never)
    fileprivate func countConditionFailure(_ f: ConditionCounter, _ error: TraceError) {
        f.reason.store(reasons.index(for: error.description), ordering: .relaxed)
        f.unreadable.add(1, ordering: .relaxed)
    }
}

/// One location's hit count (atomics cannot live in arrays directly).
private final class HitCounter: Sendable {
    let value = Atomic<UInt64>(0)
}

/// One location's condition figures: hits filtered, read failures among them, and the
/// reason (a `ReasonTable` index) of the latest failure.
private final class ConditionCounter: Sendable {
    let filtered = Atomic<UInt64>(0)
    let unreadable = Atomic<UInt64>(0)
    let reason = Atomic<UInt8>(0)
}


