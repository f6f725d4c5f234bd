import FlowTrace
import Locking
import Synchronization
import TraceSpec

/// Writes a module's records while the guest runs (jsonl, csv): a thread takes the
/// module's stream batch by batch, in sequence order, filters each batch and appends it to
/// the output. `finish()`, once the run is over and the module disabled, writes what is
/// left and hands the output back.
///
/// The thread waits at most `flushInterval` for a batch to fill, so a slow trace still
/// reaches the output (a `tail -f` sees it) within that time.
///
/// A write that fails ends the writing at once: the output is cut back to the last whole
/// batch (a file; a device keeps what reached it), the module's stream is closed (a hit
/// waiting for room goes on), and `onFailure` is called so the run stops promptly. The
/// records counted as written are exactly those of the whole batches before the failure.
final class RecordStreamWriter: Sendable {
    private let module: TraceModule
    private final class Flags: Sendable {
        let finishing = Atomic<Bool>(false)
        let written = Atomic<Int>(0)
        let failure = Locked<String?>(nil)
    }
    private let flags: Flags
    /// The writer and the output: touched by the thread only, until `finish()` has joined it.
    private let output: Locked<(writer: ReportWriter, sink: ByteSink)>
    private let thread: JoinableThread

    static let batch = 16_384
    static let flushInterval = Duration.milliseconds(100)

    init(module: TraceModule, writer: ReportWriter, sink: ByteSink,
         filter: (@Sendable (TraceReport) -> TraceReport)?, onFailure: @escaping @Sendable (String) -> Void) throws(ThreadError) {
        self.module = module
        let output = Locked((writer: writer, sink: sink)), flags = Flags()
        self.output = output
        self.flags = flags
        thread = try JoinableThread { [module, flags, output] in
            /// Writes `body`; the whole records it wrote, or nil (the failure kept, a file cut
            /// back to its last whole record) when a write failed.
            func written(_ body: (ReportWriter, ByteSink, @escaping (Int) -> Void) -> Void) -> Int? {
                let failure = output.withLock { o -> String? in
                    let start = o.sink.bytesAccepted
                    var ends: [Int] = []
                    body(o.writer, o.sink) { ends.append($0) }
                    o.sink.flush()
                    guard let e = o.sink.error else { return nil }
                    // The records whose last byte reached the output.
                    let reached = o.sink.bytesWritten
                    let whole = ends.prefix { $0 <= reached }
                    o.sink.truncate(to: whole.last ?? start)
                    flags.written.add(whole.count, ordering: .relaxed)
                    return e
                }
                guard let failure else { return 0 }
                flags.failure.withLock { $0 = failure }
                module.closeStream()
                onFailure(failure)
                return nil
            }
            guard written({ w, s, _ in w.begin(s) }) != nil else { return }
            while true {
                // Read before taking: a batch taken after the flag was seen is the last.
                let last = flags.finishing.load(ordering: .acquiring)
                let batch = module.takeStreamed(maxRecords: Self.batch, wait: last ? nil : Self.flushInterval)
                if batch.isEmpty {
                    if last { return }
                    continue
                }
                let selected = filter?(batch) ?? batch
                guard written({ w, s, ends in w.append(selected, to: s, recordEnds: ends) }) != nil else { return }
                flags.written.add(selected.count, ordering: .relaxed)
            }
        }
    }

    /// Call once no more records come (the module disabled): writes the rest and closes the
    /// module's stream. Returns the records written (whole records that reached the output)
    /// and the write error, if one stopped the writing.
    func finish() -> (written: Int, error: String?) {
        flags.finishing.store(true, ordering: .releasing)
        thread.join()
        module.closeStream()
        return (flags.written.load(ordering: .relaxed), flags.failure.withLock { $0 })
    }
}
