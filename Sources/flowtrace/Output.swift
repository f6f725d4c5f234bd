import FlowTrace
import Foundation
import Locking
import Sys


private let outputLock = Locked(())

/// Writes `text` and a newline to stderr.
func printError(_ text: String) {
    outputLock.withLock { _ in FileHandle.standardError.write(Data((text + "\n").utf8)) }
}

/// Writes `text` and a newline to stdout, whole, even from several threads.
func printOut(_ text: String) {
    outputLock.withLock { _ in FileHandle.standardOutput.write(Data((text + "\n").utf8)) }
}

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

/// The live progress line on a terminal's stderr: elapsed time, hits, hits/s, records.
/// Console lines are printed above it. Nothing of it when stderr is not a terminal.
final class ProgressLine: Sendable {
    private let module: TraceModule
    /// Dispatch sources are not Sendable: this one is only touched under its lock.
    private let timer: Locked<any DispatchSourceTimer>
    private let start = monotonicNanoseconds()
    private let shown = Locked(false)

    init?(module: TraceModule) {
        guard isTerminal(STDERR_FILENO) else { return nil }
        self.module = module
        timer = Locked(DispatchSource.makeTimerSource(queue: .global()))
        timer.withLock { t in
            t.schedule(deadline: .now() + .milliseconds(200), repeating: .milliseconds(250))
            t.setEventHandler { [weak self] in self?.draw() }
            t.resume()
        }
    }

    private var text: String {
        let c = module.counters
        let s = Double(monotonicNanoseconds() - start) / 1e9
        return String(format: "  %.1f s  %llu hits  %@ hits/s  %d records", s, c.hitsSeen, formatRate(s > 0 ? Double(c.hitsSeen) / s : 0), c.recordsKept)
    }

    private func draw() {
        let line = text
        outputLock.withLock { _ in
            FileHandle.standardError.write(Data(("\r\u{1B}[K" + line).utf8))
            shown.withLock { $0 = true }
        }
    }

    /// Prints a whole line (to stdout or stderr) above the progress line.
    func printAbove(_ line: String, toStdout: Bool) {
        outputLock.withLock { _ in
            if shown.withLock({ $0 }) { FileHandle.standardError.write(Data("\r\u{1B}[K".utf8)) }
            (toStdout ? FileHandle.standardOutput : FileHandle.standardError).write(Data((line + "\n").utf8))
            shown.withLock { $0 = false }
        }
    }

    /// Stops updating and clears the line.
    func finish() {
        timer.withLock { $0.cancel() }
        outputLock.withLock { _ in
            if shown.withLock({ $0 }) { FileHandle.standardError.write(Data("\r\u{1B}[K".utf8)) }
            shown.withLock { $0 = false }
        }
    }
}
