import Foundation
import Sys
import TraceSpec

/// Where a run's records (or aggregation results) go: one rule for every format. Opened
/// before the guest starts; `-o FILE` (a regular file, existing or not) is written as a
/// temporary file beside FILE, which replaces FILE when the run ends, whatever the ending.
/// After a failed write FILE stays as it was and the temporary file is kept, with what
/// reached it, and named. Devices and FIFOs (`/dev/full`, a pipe) are written directly;
/// without `-o`, stdout.
final class RecordOutput {
    /// `-o`'s path, or "stdout".
    let destination: String
    let sink: ByteSink
    /// "records" or "results".
    let what: String

    init(path: String?, what: String) throws(SystemError) {
        destination = path ?? "stdout"
        sink = if let path { try ByteSink(replacing: path) } else { ByteSink(fd: STDOUT_FILENO) }
        self.what = what
    }

    /// The temporary file the records go to until the run ends (nil: written directly).
    var temporary: String? { sink.temporaryPath }

    /// Ends the output once every record is written. `failure`: a write error seen while
    /// writing (the stream writer stopped at it). Returns the error line for the end of the
    /// run, and the summary's words for where the `written` records are.
    /// `counted`: `written` is exactly the whole records in the output (streamed formats,
    /// cut back to a record boundary); a table or document cut short holds no count.
    func close(written: Int, failure: String?, counted: Bool = true) -> (error: String?, outcome: String) {
        let temporary = self.temporary
        if let failure {
            if let kept = sink.keepPartial() {
                guard counted else {
                    return ("writing the \(what) to \(destination): \(failure); \(destination) was left as it was, and what was written before the failure is in \(kept)",
                            "the \(what) could not all be written (\(destination) was left as it was; the part written is in \(kept))")
                }
                return ("writing the \(what) to \(destination): \(failure); \(destination) was left as it was, and the \(written) \(what) written before the failure are in \(kept)",
                        "\(written) \(what) reached \(kept) before writing failed (\(destination) was left as it was)")
            }
            guard counted else {
                return ("writing the \(what) to \(destination): \(failure)", "the \(what) could not all be written to \(destination)")
            }
            return ("writing the \(what) to \(destination): \(failure) (\(written) whole \(what) were written before it)",
                    "\(written) \(what) written to \(destination) before writing failed")
        }
        do throws(SystemError) { try sink.commit() } catch {
            let partial = temporary.map { ", and what was written is in \($0)" } ?? ""
            var reason = error.message.components(separatedBy: " (the file was left").first ?? error.message
            if reason.hasPrefix("writing '"), let end = reason.range(of: "': ") { reason = String(reason[end.upperBound...]) }
            return ("writing the \(what) to \(destination): \(reason)\(temporary != nil ? "; \(destination) was left as it was\(partial)" : "")",
                    "the \(what) could not all be written to \(destination)")
        }
        return (nil, "\(written) \(what) written to \(destination)")
    }
}
