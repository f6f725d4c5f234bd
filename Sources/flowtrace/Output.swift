import Foundation
import Locking


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

/// Left-aligns each column of `rows` to its widest cell.
func table(_ rows: [[String]], indent: String = "  ") -> String {
    guard let width = rows.map(\.count).max() else { return "" }
    var widths = [Int](repeating: 0, count: width)
    for r in rows { for (i, c) in r.enumerated() { widths[i] = max(widths[i], c.count) } }
    return rows.map { r in
        indent + r.enumerated().map { i, c in
            i == r.count - 1 ? c : c + String(repeating: " ", count: widths[i] - c.count)
        }.joined(separator: "  ")
    }.joined(separator: "\n")
}
