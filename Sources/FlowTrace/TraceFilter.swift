/// A value a probe-data filter looks for.
public struct ValueMatch: Sendable, Hashable {
    public enum Expected: Sendable, Hashable {
        /// A register entry with this value.
        case register(RegisterValue)
        /// A memory entry holding these bytes, wherever it was read.
        case bytes([UInt8])
        /// A memory entry read at `address` holding these bytes.
        case memory(address: UInt64, bytes: [UInt8])
    }

    /// The entry's description as `ProbeEntry.description` gives it: `rdi`, `[rsp]:8`.
    public var entry: String
    public var expected: Expected

    public init(entry: String, _ expected: Expected) {
        self.entry = entry
        self.expected = expected
    }

    /// A register entry named `register` with `value`.
    public static func register(_ register: String, _ value: RegisterValue) -> ValueMatch {
        ValueMatch(entry: register.lowercased(), .register(value))
    }

    func matches(_ value: ProbeValue) -> Bool {
        switch (expected, value) {
        case let (.register(want), .register(got)): want == got
        case let (.bytes(want), .memory(_, got)): want == got
        case let (.memory(wantAddress, want), .memory(gotAddress, got)): wantAddress == gotAddress && want == got
        default: false
        }
    }
}

/// One condition on records.
public enum TraceFilter: Sendable, Hashable {
    /// Sequence numbers in the range.
    case sequence(ClosedRange<UInt64>)
    /// Timestamps (ns, as records carry them) in the range.
    case timestamp(ClosedRange<UInt64>)
    /// Probe addresses in the range.
    case address(ClosedRange<UInt64>)
    /// vCPU ids in the range.
    case vcpu(ClosedRange<Int>)
    /// Every match is met by at least one of the probe's values (`common: false`) or of
    /// the common probe's values (`common: true`). (The reference's matcher started from
    /// "no match" and so never matched: defect 3.)
    case probeData([ValueMatch], common: Bool = false)
}

/// How several filters combine.
public enum FilterCombination: String, Sendable {
    /// A record must match every filter (no filters: every record matches).
    case all
    /// A record must match at least one filter (no filters: no record matches).
    case any
}
