import FlowTrace
import Locking
import Synchronization
import TraceSpec

/// Writes a module's records while the guest runs (jsonl, csv): a thread takes the
/// module's stream batch by batch, in sequence order, filters each batch and appends it to
/// the output. `finish()`, once the run is over and the module disabled, writes what is
/// left and closes the output.
///
/// The thread waits at most `flushInterval` for a batch to fill, so a slow trace still
/// reaches the output (a `tail -f` sees it) within that time.
final class RecordStreamWriter: Sendable {
    private let module: TraceModule
    private let destination: String
    private final class Flags: Sendable {
        let finishing = Atomic<Bool>(false)
        let written = Atomic<Int>(0)
    }
    private let flags: Flags
    /// The writer and the output: touched by the thread only, until `finish()` has joined it.
    private let output: Locked<(writer: ReportWriter, sink: ByteSink)>
    private let thread: JoinableThread

    static let batch = 16_384
    static let flushInterval = Duration.milliseconds(100)

    init(module: TraceModule, writer: ReportWriter, sink: ByteSink, destination: String,
         filter: (@Sendable (TraceReport) -> TraceReport)?) throws(ThreadError) {
        self.module = module
        self.destination = destination
        let output = Locked((writer: writer, sink: sink)), flags = Flags()
        self.output = output
        self.flags = flags
        thread = try JoinableThread { [module, flags, output] in
            output.withLock { o in o.writer.begin(o.sink) }
            while true {
                // Read before taking: a batch taken after the flag was seen is the last.
                let last = flags.finishing.load(ordering: .acquiring)
                let batch = module.takeStreamed(maxRecords: Self.batch, wait: last ? nil : Self.flushInterval)
                if batch.isEmpty {
                    if last { return }
                    continue
                }
                let selected = filter?(batch) ?? batch
                output.withLock { o in o.writer.append(selected, to: o.sink) }
                flags.written.add(selected.count, ordering: .relaxed)
            }
        }
    }

    /// Call once no more records come (the module disabled): writes the rest, closes the
    /// output and the module's stream. Returns the records written and the write error.
    func finish() -> (written: Int, error: String?) {
        flags.finishing.store(true, ordering: .releasing)
        thread.join()
        module.closeStream()
        let failure: String? = output.withLock { o in
            do throws(SystemError) { try o.sink.commit() } catch { return "writing the records to \(destination): \(error.message)" }
            return nil
        }
        return (flags.written.load(ordering: .relaxed), failure)
    }
}
