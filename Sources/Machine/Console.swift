import Locking


/// One line a vCPU wrote to the console port (0xE9), without its newline.
public struct ConsoleLine: Sendable, Equatable {
    public var vcpu: Int
    public var text: String
    public init(vcpu: Int, text: String) { self.vcpu = vcpu; self.text = text }
}

/// Assembles console bytes into whole lines per vCPU, so lines from different vCPUs never
/// interleave mid-line, and keeps every line of the run.
final class Console: Sendable {
    private let pending: Locked<[[UInt8]]>
    private let lines = Locked<[ConsoleLine]>([])
    private let sink: @Sendable (ConsoleLine) -> Void

    init(vcpuCount: Int, sink: @escaping @Sendable (ConsoleLine) -> Void) {
        pending = Locked(Array(repeating: [], count: vcpuCount))
        self.sink = sink
    }

    func write(_ bytes: [UInt8], from vcpu: Int) {
        var complete: [ConsoleLine] = []
        pending.withLock { buffers in
            for b in bytes {
                if b == 0x0A {
                    complete.append(ConsoleLine(vcpu: vcpu, text: String(decoding: buffers[vcpu], as: UTF8.self)))
                    buffers[vcpu].removeAll(keepingCapacity: true)
                } else {
                    buffers[vcpu].append(b)
                }
            }
        }
        emit(complete)
    }

    /// Emits what is left of unterminated lines (at the end of a run).
    func flush() {
        let rest = pending.withLock { buffers -> [ConsoleLine] in
            defer { for i in buffers.indices { buffers[i].removeAll() } }
            return buffers.enumerated().filter { !$0.element.isEmpty }.map {
                ConsoleLine(vcpu: $0.offset, text: String(decoding: $0.element, as: UTF8.self))
            }
        }
        emit(rest)
    }

    private func emit(_ complete: [ConsoleLine]) {
        guard !complete.isEmpty else { return }
        lines.withLock { $0.append(contentsOf: complete) }
        for l in complete { sink(l) }
    }

    var allLines: [ConsoleLine] { lines.withLock { $0 } }
}
