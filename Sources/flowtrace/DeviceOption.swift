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

/// `--device isa-debug-exit[,iobase=N][,iosize=N]` (QEMU's names and defaults).
func parseDevice(_ text: String) throws(ExitCode) -> DeviceRequest {
    let parts = text.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }
    if parts.first == "pc-testdev" {
        guard parts.count == 1 else { throw fail("--device '\(text)': pc-testdev has no properties", status: ExitStatus.usage) }
        return .pcTestdev
    }
    guard let name = parts.first, name == "isa-debug-exit" else {
        throw fail("--device '\(text)': unknown device '\(parts.first ?? "")' (devices: isa-debug-exit[,iobase=N][,iosize=N], pc-testdev)", status: ExitStatus.usage)
    }
    var base = ISADebugExit.defaultBase, size = ISADebugExit.defaultSize
    for p in parts.dropFirst() {
        let kv = p.split(separator: "=", maxSplits: 1).map(String.init)
        guard kv.count == 2, let n = parseNumber(kv[1]) else {
            throw fail("--device '\(text)': '\(p)' is not NAME=NUMBER (iobase=0xf4, iosize=4)", status: ExitStatus.usage)
        }
        switch kv[0] {
        case "iobase":
            guard n <= 0xFFFF else { throw fail("--device '\(text)': iobase \(kv[1]) is beyond the 16-bit port space", status: ExitStatus.usage) }
            base = UInt16(n)
        case "iosize":
            guard n >= 1, n <= 4 else { throw fail("--device '\(text)': iosize \(kv[1]) must be 1 to 4", status: ExitStatus.usage) }
            size = UInt16(n)
        default:
            throw fail("--device '\(text)': isa-debug-exit has no property '\(kv[0])' (iobase, iosize)", status: ExitStatus.usage)
        }
    }
    guard UInt32(base) + UInt32(size) <= 0x10000 else { throw fail("--device '\(text)': ports past 0xffff", status: ExitStatus.usage) }
    return .isaDebugExit(base: base, size: size)
}
