import KVM

/// Where a vCPU was when a run ended: its rip, the symbol there and its CPU mode.
public struct VCPUPosition: Sendable, Equatable, CustomStringConvertible {
    public var vcpu: Int
    /// nil when the registers could not be read (the reason in `unreadable`).
    public var rip: UInt64?
    /// `symbol+0xoff`, or the address when no symbol covers it.
    public var location: String
    /// "64-bit mode, CPL0", "32-bit protected mode, CPL0", "real mode", ...
    public var mode: String
    public var unreadable: String?

    public var description: String {
        guard let rip else { return "vCPU \(vcpu): registers unreadable (\(unreadable ?? "unknown reason"))" }
        let at = location.hasPrefix("0x") ? "0x\(String(rip, radix: 16))" : "0x\(String(rip, radix: 16)) (\(location))"
        return "vCPU \(vcpu) at \(at), \(mode)"
    }

    /// The mode the control registers and cs describe.
    static func mode(_ s: SpecialRegisters) -> String {
        let protected = s.cr0 & 1 != 0
        guard protected else { return "real mode" }
        let cpl = s.cs.dpl
        if s.efer & (1 << 10) != 0 {  // EFER.LMA
            return s.cs.long ? "64-bit mode, CPL\(cpl)" : "compatibility mode, CPL\(cpl)"
        }
        return "\(s.cs.defaultSize32 ? "32" : "16")-bit protected mode, CPL\(cpl)\(s.cr0 & (1 << 31) != 0 ? ", paging on" : "")"
    }
}

extension Machine {
    /// Where each vCPU is: for a run that has ended (its threads joined) or is halted at a
    /// probe (every vCPU parked), never while vCPUs run.
    public func positions() -> [VCPUPosition] {
        vcpus.map { v in
            do throws(KVMError) {
                let r = try v.registers(), s = try v.specialRegisters()
                return VCPUPosition(vcpu: v.id, rip: r.rip, location: symbolizer.describe(r.rip), mode: VCPUPosition.mode(s))
            } catch {
                return VCPUPosition(vcpu: v.id, rip: nil, location: "", mode: "", unreadable: error.description)
            }
        }
    }
}
