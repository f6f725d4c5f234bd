import ArgumentParser
import ELF
import FlowTrace
import FlowTraceGraphs
import Foundation
import KVM
import FlowGraph
import LinuxKernel
import Locking
import Devices
import Machine
import Sys
import TraceSpec

/// What --serial asks for.
enum SerialMode: Equatable {
    /// Output to the console, no input.
    case none
    /// Output to the console, standard input to the guest.
    case stdio
    /// Output to a file, no input.
    case file(String)

    init(parsing text: String) throws(ExitCode) {
        switch text {
        case "none": self = .none
        case "stdio": self = .stdio
        default:
            guard text.hasPrefix("file:"), text.count > 5 else {
                throw fail("--serial '\(text)': expected none, stdio or file:PATH", status: ExitStatus.usage)
            }
            self = .file(String(text.dropFirst(5)))
        }
    }
}


/// The serial port's output file: opened once the run is about to start, written by vCPU
/// threads (a line at a time reaches the file), closed at the end.
final class SerialFile: Sendable {
    private let sink = Locked<ByteSink?>(nil)
    func open(_ path: String) throws(SystemError) {
        let s = try ByteSink(overwriting: path)
        sink.withLock { $0 = s }
    }
    func write(_ byte: UInt8) {
        sink.withLock { s in
            s?.write(byte: byte)
            if byte == 0x0A { s?.flush() }
        }
    }
    /// Writes the rest out; the error, if writing failed.
    func close() -> String? {
        guard let s = sink.withLock({ s -> ByteSink? in defer { s = nil }; return s }) else { return nil }
        do { try s.commit() } catch { return error.description }
        return nil
    }
}

/// Standard input fed to the guest's UART (`--serial stdio`): a pump thread hands what it
/// reads to the receiver, waiting while the FIFO is full; a terminal is put in raw mode.
final class SerialInput: Sendable {
    private let pump: InputPump
    private let uart: UART16550
    private let stopped: Locked<Bool>
    private let terminal: RawTerminal?

    init(uart: UART16550) throws(ExitCode) {
        self.uart = uart
        let stopped = Locked(false)
        self.stopped = stopped
        terminal = RawTerminal(fd: 0)
        do {
            pump = try InputPump(fd: 0) { bytes in
                var rest = bytes[...]
                while !rest.isEmpty {
                    rest = rest.dropFirst(uart.receive(rest))
                    if rest.isEmpty || !uart.waitForRoom(orUntil: { stopped.withLock { $0 } }) { return }
                }
            }
        } catch {
            terminal?.restore()
            throw fail("--serial stdio: \(error.description)", status: ExitStatus.software)
        }
    }

    /// Stops the pump and restores the terminal; once (later calls do nothing).
    func stop() {
        guard stopped.withLock({ s -> Bool in defer { s = true }; return !s }) else { return }
        uart.wake()
        pump.stop()
        terminal?.restore()
    }
}

/// An unknown access for the summary, its rip symbolized.
func describe(_ a: UnknownAccesses.Access, symbols: Symbolizer) -> String {
    let what = a.space == .port ? "port \(hex(a.address))" : "MMIO \(hex(a.address))"
    let at = symbols.describe(a.rip)
    let rip = at.hasPrefix("0x") ? hex(a.rip) : "\(hex(a.rip)) (\(at))"
    return "\(what): first \(a.isWrite ? "write" : "read") (\(a.size) byte\(a.size == 1 ? "" : "s")) on vCPU \(a.vcpu) at \(rip), \(a.count) access\(a.count == 1 ? "" : "es")"
}
