/// One probe hit.
public struct TraceRecord: Sendable {
    /// Per module, monotonic, starting at 0; gaps are records evicted or cleared.
    public let sequence: UInt64
    /// CLOCK_MONOTONIC nanoseconds when the record was stored.
    public let timestamp: UInt64
    public let vcpu: Int
    /// The probe location's address.
    public let address: UInt64
    public let timing: ProbeTiming
    public let probe: Probe
    /// One value per entry of `probe`, in entry order.
    public let values: [ProbeValue]
    /// One value per entry of the module's common probe (empty without one).
    public let commonValues: [ProbeValue]
    /// `probe`'s entries, aligned with `values`.
    public let entries: [ProbeEntry]
    /// The common probe's entries, aligned with `commonValues`.
    public let commonEntries: [ProbeEntry]

    /// The value of the entry whose description is `key` (`rdi`, `[rsp]:8`), if any.
    public func value(_ key: String) -> ProbeValue? {
        entries.firstIndex { $0.description == key }.map { values[$0] }
    }

    /// The common-probe value of the entry whose description is `key`, if any.
    public func commonValue(_ key: String) -> ProbeValue? {
        commonEntries.firstIndex { $0.description == key }.map { commonValues[$0] }
    }
}
