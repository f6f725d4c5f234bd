import Locking
import Synchronization

/// A summary a module computes at each hit it takes, per location, without a record:
/// how many hits had each value of an expression, or a histogram of its values.
public struct Aggregation: Sendable {
    public enum Kind: Sendable, Equatable {
        /// Hits per distinct value.
        case count
        /// Hits per power-of-two bucket: 0, 1, [2, 4), [4, 8), ... (as bpftrace's `hist()`).
        case log2Histogram
        /// Hits per `step`-wide bucket from `min` to `max`, with one bucket below and one
        /// above (as bpftrace's `lhist()`).
        case linearHistogram(min: UInt64, max: UInt64, step: UInt64)
    }

    /// The expression as the user wrote it (the key of the output).
    public let item: String
    public let expression: ProbeCondition
    public let kind: Kind

    public init(item: String, expression: ProbeCondition, kind: Kind) throws(TraceError) {
        if case let .linearHistogram(min, max, step) = kind {
            guard step > 0, min < max else {
                throw TraceError.invalidCondition(item, reason: "a linear histogram needs MIN < MAX and STEP > 0 (got \(min):\(max):\(step))")
            }
            guard (max - min) / step <= 10_000 else {
                throw TraceError.invalidCondition(item, reason: "a linear histogram of \((max - min) / step) buckets is too many (at most 10000)")
            }
        }
        self.item = item
        self.expression = expression
        self.kind = kind
    }

    /// The buckets of a histogram kind: (low, high) with `high` exclusive, nil for no bound.
    var bucketBounds: [(low: UInt64, high: UInt64?)] {
        switch kind {
        case .count: return []
        case .log2Histogram:
            var b: [(low: UInt64, high: UInt64?)] = [(0, 1)]
            for k in 0..<64 {
                let low: UInt64 = 1 << UInt64(k)
                let high: UInt64? = k == 63 ? nil : low << 1
                b.append((low, high))
            }
            return b
        case let .linearHistogram(min, max, step):
            let n = Int((max - min + step - 1) / step)
            var b: [(low: UInt64, high: UInt64?)] = []
            if min > 0 { b.append((0, min)) }
            for i in 0..<n {
                let low = min + UInt64(i) * step
                b.append((low, Swift.min(low + step, max)))
            }
            b.append((max, nil))
            return b
        }
    }

    /// The bucket `v` falls in (see `bucketBounds`).
    @inline(__always)
    func bucket(_ v: UInt64) -> Int {
        switch kind {
        case .count: return 0
        case .log2Histogram: return v == 0 ? 0 : 64 - v.leadingZeroBitCount
        case let .linearHistogram(min, max, step):
            let below = min > 0 ? 1 : 0
            if v < min { return 0 }
            if v >= max { return below + Int((max - min + step - 1) / step) }
            return below + Int((v - min) / step)
        }
    }
}

/// What an aggregation found at one location.
public struct AggregationResult: Sendable, Equatable {
    public struct Value: Sendable, Equatable {
        public var value: UInt64
        public var count: UInt64
    }
    public struct Bucket: Sendable, Equatable {
        public var low: UInt64
        /// Exclusive; nil: no upper bound.
        public var high: UInt64?
        public var count: UInt64
    }

    public var item: String
    public var kind: Aggregation.Kind
    public var address: UInt64
    public var timing: ProbeTiming
    /// Hits counted (every hit the module took here whose value could be read).
    public var hits: UInt64
    /// `.count`: every distinct value with its hits, most hits first (ties: lower value first).
    public var values: [Value]
    /// Histograms: every bucket, lowest first, empty ones included.
    public var buckets: [Bucket]
    /// Hits whose value could not be read, and the reason of the latest.
    public var unreadable: UInt64
    public var unreadableReason: String?
}

/// One aggregation's state at one location, updated by vCPU threads.
final class AggregationState: Sendable {
    let counts = Locked<[UInt64: UInt64]>([:])
    let buckets: [AggregationCounter]
    let hits = AggregationCounter()
    let unreadable = AggregationCounter()
    let reason = Atomic<UInt8>(0)

    init(_ a: Aggregation) {
        buckets = a.bucketBounds.map { _ in AggregationCounter() }
    }

    @inline(__always)
    func add(_ v: UInt64, _ a: Aggregation) {
        hits.value.add(1, ordering: .relaxed)
        if case .count = a.kind {
            counts.withLock { $0[v, default: 0] += 1 }
        } else {
            buckets[a.bucket(v)].value.add(1, ordering: .relaxed)
        }
    }

    func result(_ a: Aggregation, address: UInt64, timing: ProbeTiming, reasons: ReasonTable) -> AggregationResult {
        let values = counts.withLock { $0 }.map { AggregationResult.Value(value: $0.key, count: $0.value) }
            .sorted { $0.count != $1.count ? $0.count > $1.count : $0.value < $1.value }
        let bounds = a.bucketBounds
        let bucketValues = zip(bounds, buckets).map { b, c in
            AggregationResult.Bucket(low: b.low, high: b.high, count: c.value.load(ordering: .relaxed))
        }
        let u = unreadable.value.load(ordering: .relaxed)
        return AggregationResult(item: a.item, kind: a.kind, address: address, timing: timing,
                                 hits: hits.value.load(ordering: .relaxed), values: values, buckets: bucketValues,
                                 unreadable: u, unreadableReason: u > 0 ? reasons.reason(reason.load(ordering: .relaxed)) : nil)
    }
}

final class AggregationCounter: Sendable {
    let value = Atomic<UInt64>(0)
}
