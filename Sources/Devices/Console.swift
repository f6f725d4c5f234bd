import Locking

/// One line of guest output, without its newline.
public struct ConsoleLine: Sendable, Equatable {
    /// Where a line came from.
    public enum Source: String, Sendable, Equatable {
        /// The debug console port 0xE9: lines are assembled per vCPU.
        case debugPort
        /// The serial port (COM1): one stream for the whole machine.
        case serial
    }
    /// The vCPU that wrote it (for serial lines: the one that wrote its last byte).
    public var vcpu: Int
    public var text: String
    public var source: Source
    public init(vcpu: Int, text: String, source: Source = .debugPort) { self.vcpu = vcpu; self.text = text; self.source = source }
}

/// Assembles guest output into whole lines, so lines from different vCPUs never
/// interleave mid-line, and keeps every line of the run. Debug-port output is assembled
/// per vCPU; serial output is one stream (as a terminal on COM1 would show it).
public final class Console: Sendable {
    private struct Buffers {
        var perVCPU: [[UInt8]]
        var serial: [UInt8] = []
    }
    private let pending: Locked<Buffers>
    private let lines = Locked<[ConsoleLine]>([])
    private let sink: @Sendable (ConsoleLine) -> Void

    public init(vcpuCount: Int, sink: @escaping @Sendable (ConsoleLine) -> Void) {
        pending = Locked(Buffers(perVCPU: Array(repeating: [], count: vcpuCount)))
        self.sink = sink
    }

    /// Debug-port bytes from `vcpu`.
    public func write(_ bytes: some Sequence<UInt8>, from vcpu: Int) {
        var complete: [ConsoleLine] = []
        pending.withLock { b in
            for c in bytes {
                if c == 0x0A {
                    complete.append(ConsoleLine(vcpu: vcpu, text: String(decoding: b.perVCPU[vcpu], as: UTF8.self)))
                    b.perVCPU[vcpu].removeAll(keepingCapacity: true)
                } else {
                    b.perVCPU[vcpu].append(c)
                }
            }
        }
        emit(complete)
    }

    /// One debug-port byte from `vcpu` (no allocation unless a line completes).
    public func write(byte: UInt8, from vcpu: Int) {
        write(CollectionOfOne(byte), from: vcpu)
    }

    /// Serial bytes (the UART's transmitter); `vcpu` wrote them. Carriage returns are
    /// dropped (a terminal would move to the line start; lines here end at the newline).
    public func writeSerial(byte: UInt8, from vcpu: Int) {
        var complete: ConsoleLine?
        pending.withLock { b in
            switch byte {
            case 0x0A:
                complete = ConsoleLine(vcpu: vcpu, text: String(decoding: b.serial, as: UTF8.self), source: .serial)
                b.serial.removeAll(keepingCapacity: true)
            case 0x0D:
                break
            default:
                b.serial.append(byte)
            }
        }
        if let complete { emit([complete]) }
    }

    /// Emits what is left of unterminated lines (at the end of a run).
    public func flush() {
        let rest = pending.withLock { b -> [ConsoleLine] in
            defer {
                for i in b.perVCPU.indices { b.perVCPU[i].removeAll() }
                b.serial.removeAll()
            }
            var rest = b.perVCPU.enumerated().filter { !$0.element.isEmpty }.map {
                ConsoleLine(vcpu: $0.offset, text: String(decoding: $0.element, as: UTF8.self))
            }
            if !b.serial.isEmpty { rest.append(ConsoleLine(vcpu: 0, text: String(decoding: b.serial, as: UTF8.self), source: .serial)) }
            return rest
        }
        emit(rest)
    }

    private func emit(_ complete: [ConsoleLine]) {
        guard !complete.isEmpty else { return }
        lines.withLock { $0.append(contentsOf: complete) }
        for l in complete { sink(l) }
    }

    public var allLines: [ConsoleLine] { lines.withLock { $0 } }
}
