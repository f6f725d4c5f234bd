import KVM

/// A guest stopped in a way it did not ask for: triple fault, an instruction KVM could
/// not emulate, an access outside RAM, an exit nobody handles.
public struct GuestFault: Error, Sendable, Equatable, CustomStringConvertible {
    /// The vCPU that stopped.
    public var vcpu: Int
    /// The exit that stopped it.
    public var exit: VMExit
    /// `rip` at the exit.
    public var rip: UInt64
    /// `rip` as `symbol+0xoff`, when the image has a symbol for it.
    public var location: String
    /// All general-purpose registers at the exit (nil if they could not be read).
    public var registers: Registers?
    /// What failed when the stop was not an exit of the guest's own (a KVM ioctl error).
    public var detail: String?

    public init(vcpu: Int, exit: VMExit, rip: UInt64, location: String, registers: Registers?, detail: String? = nil) {
        self.vcpu = vcpu; self.exit = exit; self.rip = rip; self.location = location
        self.registers = registers; self.detail = detail
    }

    public var description: String {
        var s = "guest fault on vCPU \(vcpu): \(detail ?? exit.name) at rip 0x\(String(rip, radix: 16))"
        if !location.hasPrefix("0x") { s += " (\(location))" }
        return s
    }

    /// The registers as `name=0x...` pairs, four per line, for reports.
    public var registerDump: String {
        guard let r = registers else { return "registers unavailable" }
        let pairs: [(String, UInt64)] = [
            ("rax", r.rax), ("rbx", r.rbx), ("rcx", r.rcx), ("rdx", r.rdx),
            ("rsi", r.rsi), ("rdi", r.rdi), ("rsp", r.rsp), ("rbp", r.rbp),
            ("r8", r.r8), ("r9", r.r9), ("r10", r.r10), ("r11", r.r11),
            ("r12", r.r12), ("r13", r.r13), ("r14", r.r14), ("r15", r.r15),
            ("rip", r.rip), ("rflags", r.rflags),
        ]
        return stride(from: 0, to: pairs.count, by: 4).map { i in
            pairs[i ..< min(i + 4, pairs.count)].map { p in
                let name = p.0.padding(toLength: 6)
                let hexValue = String(p.1, radix: 16)
                return "\(name) 0x\(String(repeating: "0", count: 16 - hexValue.count))\(hexValue)"
            }.joined(separator: "  ")
        }.joined(separator: "\n")
    }
}

extension String {
    func padding(toLength n: Int) -> String { count >= n ? self : self + String(repeating: " ", count: n - count) }
}
