import FlowTrace
import Foundation
import Locking
import Machine
import Sys

/// flowtrace's own text on stdout and stderr: whole lines, from any thread, and the live
/// progress line. Nothing here traps: a write that fails (a full disk, a closed pipe with
/// SIGPIPE ignored, a hung-up terminal) is remembered, the first failure per stream, later
/// text for that stream is dropped, and the command ends with exit 74 naming it (see
/// `FlowTraceCommand.main`). `onFailure` lets a run stop its guest at the first failure.
final class StandardOutput: Sendable {
    enum Stream: Sendable {
        case stdout, stderr
        var fd: Int32 { self == .stdout ? STDOUT_FILENO : STDERR_FILENO }
        var name: String { self == .stdout ? "stdout" : "stderr" }
    }

    private struct State {
        var failures: [(stream: Stream, what: String, message: String)] = []
        /// The progress text is on stderr, without its newline.
        var progressShown = false
        var onFailure: (@Sendable (String) -> Void)?
    }
    private let state = Locked(State())
    /// stdout and stderr are one terminal: a line on stdout must erase the progress first.
    let shareTerminal = sameTerminal(STDOUT_FILENO, STDERR_FILENO)

    /// Writes `text` and a newline to `stream`, above the progress line. `what` names the
    /// text in a failure's message ("the guest's console").
    func line(_ text: String, to stream: Stream, what: String = "flowtrace's messages") {
        var failure: (String, (@Sendable (String) -> Void)?)?
        state.withLock { s in
            if s.progressShown, stream == .stderr || shareTerminal {
                write(Array("\r\u{1B}[K".utf8), to: .stderr, what: "the progress line", &s)
                s.progressShown = false
            }
            failure = write(Array((text + "\n").utf8), to: stream, what: what, &s)
        }
        if let (message, hook) = failure { hook?(message) }
    }

    /// Draws `text` as the progress line on stderr (replacing the previous one).
    func progress(_ text: String) {
        state.withLock { s in
            guard !s.failures.contains(where: { $0.stream == .stderr }) else { return }
            write(Array(("\r\u{1B}[K" + text).utf8), to: .stderr, what: "the progress line", &s)
            s.progressShown = true
        }
    }

    /// Erases the progress line, if one is shown.
    func clearProgress() {
        state.withLock { s in
            guard s.progressShown else { return }
            write(Array("\r\u{1B}[K".utf8), to: .stderr, what: "the progress line", &s)
            s.progressShown = false
        }
    }

    /// Called (once, outside the lock) at the first failed write, with its message.
    func onFailure(_ hook: (@Sendable (String) -> Void)?) { state.withLock { $0.onFailure = hook } }

    /// The first failed write, as one line ("writing the guest's console to stdout: No
    /// space left on device"), and the stream it failed on.
    var failure: (stream: Stream, message: String)? {
        state.withLock { s in s.failures.first.map { ($0.stream, "writing \($0.what) to \($0.stream.name): \($0.message)") } }
    }

    /// Whether `stream` can still be written.
    func works(_ stream: Stream) -> Bool { state.withLock { s in !s.failures.contains { $0.stream == stream } } }

    /// Writes under the lock; returns the message and hook of a first failure.
    @discardableResult
    private func write(_ bytes: [UInt8], to stream: Stream, what: String, _ s: inout State) -> (String, (@Sendable (String) -> Void)?)? {
        guard !s.failures.contains(where: { $0.stream == stream }) else { return nil }
        do throws(SystemError) { try writeAll(stream.fd, bytes) } catch {
            let first = s.failures.isEmpty
            let message = error.message.hasPrefix("write: ") ? String(error.message.dropFirst(7)) : error.message
            s.failures.append((stream, what, message))
            if stream == .stderr { s.progressShown = false }
            return first ? ("writing \(what) to \(stream.name): \(message)", s.onFailure) : nil
        }
        return nil
    }
}

let standardOutput = StandardOutput()

/// Writes `text` and a newline to stderr.
func printError(_ text: String) { standardOutput.line(text, to: .stderr) }

/// Writes `text` and a newline to stdout, whole, even from several threads.
func printOut(_ text: String) { standardOutput.line(text, to: .stdout, what: "the output") }

func hex(_ v: UInt64) -> String { "0x" + String(v, radix: 16) }

/// Aligns each column of `rows` to its widest cell: left, or right for the columns in
/// `rightAligned` (numbers).
func table(_ rows: [[String]], indent: String = "  ", rightAligned: Set<Int> = []) -> String {
    guard let width = rows.map(\.count).max() else { return "" }
    var widths = [Int](repeating: 0, count: width)
    for r in rows { for (i, c) in r.enumerated() { widths[i] = max(widths[i], c.count) } }
    return rows.map { r in
        indent + r.enumerated().map { i, c in
            let pad = String(repeating: " ", count: widths[i] - c.count)
            return rightAligned.contains(i) ? pad + c : (i == r.count - 1 ? c : c + pad)
        }.joined(separator: "  ")
    }.joined(separator: "\n")
}

/// The live progress line on a terminal's stderr, redrawn every 250 ms from `text`. Every
/// other line flowtrace writes to that terminal goes through `standardOutput`, which erases
/// the progress first, so no line is ever appended to it. Nothing when stderr is not a
/// terminal.
final class ProgressLine: Sendable {
    /// Dispatch sources are not Sendable: this one is only touched under its lock.
    private let timer: Locked<any DispatchSourceTimer>
    private let stopped = Locked(false)

    init?(text: @escaping @Sendable (_ seconds: Double) -> String) {
        guard isTerminal(STDERR_FILENO) else { return nil }
        let start = monotonicNanoseconds()
        let stopped = self.stopped
        timer = Locked(DispatchSource.makeTimerSource(queue: .global()))
        timer.withLock { t in
            t.schedule(deadline: .now() + .milliseconds(200), repeating: .milliseconds(250))
            t.setEventHandler {
                let line = text(Double(monotonicNanoseconds() - start) / 1e9)
                // Checked and drawn under one lock, so no draw follows `finish`.
                stopped.withLock { s in if !s { standardOutput.progress(line) } }
            }
            t.resume()
        }
    }

    /// The tracing run's progress: elapsed time, hits, hits/s, records taken.
    static func tracing(_ module: TraceModule) -> ProgressLine? {
        ProgressLine { s in
            let c = module.counters
            return String(format: "  %.1f s  %llu hits  %@ hits/s  %llu records", s, c.hitsSeen,
                          formatRate(s > 0 ? Double(c.hitsSeen) / s : 0), c.recordsTaken)
        }
    }

    /// A run without probes: elapsed time, exits, and where vCPU 0 was at its last exit.
    static func running(_ machine: Machine) -> ProgressLine? {
        ProgressLine { s in
            let p = machine.liveProgress
            let at = p.vcpu0.map { "  vCPU 0 at 0x\(String($0.rip, radix: 16))" + ($0.location.hasPrefix("0x") ? "" : " (\($0.location))") } ?? ""
            return String(format: "  %.1f s  %llu exits", s, p.exits) + at
        }
    }

    /// Stops updating and clears the line.
    func finish() {
        timer.withLock { $0.cancel() }
        stopped.withLock { $0 = true }
        standardOutput.clearProgress()
    }
}

