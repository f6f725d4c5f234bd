import FlowGraph
import KVM

/// Guest memory as a flow graph's code source: guest-virtual addresses through the boot
/// page tables, with the original bytes shown where a probe has patched in a trap byte, so
/// a graph can be built while probes are armed, and code the guest wrote itself is seen as
/// it is now.
public struct MachineCodeSource: CodeSource {
    public let machine: Machine

    public init(machine: Machine) { self.machine = machine }

    public func code(at address: UInt64, count: Int) -> Result<[UInt8], CodeSourceError> {
        // Up to the end of the page first, so an instruction at the end of mapped memory
        // still decodes from the bytes that are there.
        let toPageEnd = Int(0x1000 - (address & 0xFFF))
        var bytes: [UInt8]
        do { bytes = try machine.readCode(virtual: address, count: min(count, toPageEnd)) } catch {
            return .failure(CodeSourceError(error.description))
        }
        if bytes.count < count, case let .success(more) = data(at: address &+ UInt64(bytes.count), count: count - bytes.count) {
            bytes += more
        }
        return .success(bytes)
    }

    public func data(at address: UInt64, count: Int) -> Result<[UInt8], CodeSourceError> {
        do { return .success(try machine.readCode(virtual: address, count: count)) } catch {
            return .failure(CodeSourceError(error.description))
        }
    }
}
