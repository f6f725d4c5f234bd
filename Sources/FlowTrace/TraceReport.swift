/// An immutable snapshot of a module's records, oldest first. Cheap to filter: a filtered
/// report shares the snapshot and keeps only the positions of the records that passed.
public struct TraceReport: Sendable, RandomAccessCollection {
    private let storage: Storage
    /// Positions into the snapshot; nil = all of them.
    private let selection: [Int32]?

    private final class Storage: Sendable {
        let buffer: RecordBuffer
        let locations: [ProbeLocation]
        let commonProbe: Probe?
        let commonLayout: ProbeLayout
        let probeBase: Int
        let reasons: ReasonTable

        init(buffer: RecordBuffer, locations: [ProbeLocation], commonProbe: Probe?, commonLayout: ProbeLayout,
             probeBase: Int, reasons: ReasonTable) {
            self.buffer = buffer; self.locations = locations; self.commonProbe = commonProbe
            self.commonLayout = commonLayout; self.probeBase = probeBase; self.reasons = reasons
        }

        @inline(__always) func sequence(_ i: Int) -> UInt64 { buffer.slot(i).load(fromByteOffset: RecordHeader.sequence, as: UInt64.self) }
        @inline(__always) func timestamp(_ i: Int) -> UInt64 { buffer.slot(i).load(fromByteOffset: RecordHeader.timestamp, as: UInt64.self) }
        @inline(__always) func location(_ i: Int) -> Int { Int(buffer.slot(i).load(fromByteOffset: RecordHeader.location, as: UInt32.self)) }
        @inline(__always) func vcpu(_ i: Int) -> Int { Int(buffer.slot(i).load(fromByteOffset: RecordHeader.vcpu, as: UInt32.self)) }
    }

    init(buffer: RecordBuffer, locations: [ProbeLocation], commonProbe: Probe?, commonLayout: ProbeLayout,
         probeBase: Int, reasons: ReasonTable) {
        storage = Storage(buffer: buffer, locations: locations, commonProbe: commonProbe, commonLayout: commonLayout,
                          probeBase: probeBase, reasons: reasons)
        selection = nil
    }

    private init(storage: Storage, selection: [Int32]) {
        self.storage = storage
        self.selection = selection
    }

    /// Records the module kept that this snapshot could not copy (no memory for the copy);
    /// 0 normally.
    public var missing: Int { storage.buffer.missing }

    public var startIndex: Int { 0 }
    public var endIndex: Int { selection?.count ?? storage.buffer.count }

    @inline(__always)
    private func position(_ i: Int) -> Int { selection.map { Int($0[i]) } ?? i }

    /// The record at `index` (0 = oldest), decoded from the snapshot.
    public subscript(index: Int) -> TraceRecord {
        let s = storage, p = position(index)
        let loc = s.locations[s.location(p)]
        let slot = s.buffer.slot(p)
        return TraceRecord(
            sequence: s.sequence(p), timestamp: s.timestamp(p), vcpu: s.vcpu(p), address: loc.address, timing: loc.timing,
            probe: loc.probe,
            values: loc.layout.decode(from: slot, base: s.probeBase, reasons: s.reasons),
            commonValues: s.commonLayout.decode(from: slot, base: RecordHeader.size, reasons: s.reasons),
            entries: loc.layout.entries, commonEntries: s.commonLayout.entries)
    }

    /// The records that match `filters` combined by `combining`, or with `reverse` those
    /// that do not. (The reference rejected its only valid flag, so reverse could not be
    /// asked for: defect 4.)
    public func filtered(by filters: [TraceFilter], combining: FilterCombination = .all, reverse: Bool = false) -> TraceReport {
        let matchers = filters.map { Matcher($0, storage: storage) }
        var kept: [Int32] = []
        kept.reserveCapacity(count)
        for i in 0..<count {
            let p = position(i)
            let hit: Bool
            switch combining {
            case .all: hit = matchers.allSatisfy { $0.matches(p, storage) }
            case .any: hit = matchers.contains { $0.matches(p, storage) }
            }
            if hit != reverse { kept.append(Int32(p)) }
        }
        return TraceReport(storage: storage, selection: kept)
    }

    /// The records that match `filter`.
    public func filtered(by filter: TraceFilter, reverse: Bool = false) -> TraceReport {
        filtered(by: [filter], reverse: reverse)
    }

    /// A filter prepared against this snapshot: probe-data matches are resolved to entry
    /// indices per location once, so matching reads only the bytes involved.
    private struct Matcher {
        let filter: TraceFilter
        /// For probe data, per location: for each match, the entry indices whose key matches.
        let entryIndices: [[[Int]]]

        init(_ filter: TraceFilter, storage: Storage) {
            self.filter = filter
            if case let .probeData(matches, common) = filter {
                let layouts = common ? Array(repeating: storage.commonLayout, count: storage.locations.count)
                                     : storage.locations.map(\.layout)
                entryIndices = layouts.map { layout in
                    matches.map { m in layout.entries.indices.filter { layout.entries[$0].description == m.entry } }
                }
            } else {
                entryIndices = []
            }
        }

        @inline(__always)
        func matches(_ p: Int, _ s: Storage) -> Bool {
            switch filter {
            case let .sequence(r): return r.contains(s.sequence(p))
            case let .timestamp(r): return r.contains(s.timestamp(p))
            case let .address(r): return r.contains(s.locations[s.location(p)].address)
            case let .vcpu(r): return r.contains(s.vcpu(p))
            case let .probeData(matches, common):
                let l = s.location(p)
                let layout = common ? s.commonLayout : s.locations[l].layout
                let base = common ? RecordHeader.size : s.probeBase
                let slot = s.buffer.slot(p)
                // Every match must be met by at least one value.
                for (m, candidates) in zip(matches, entryIndices[l]) {
                    let met = candidates.contains { m.matches(layout.decode(entry: $0, from: slot, base: base, reasons: s.reasons)) }
                    if !met { return false }
                }
                return !matches.isEmpty
            }
        }
    }
}
