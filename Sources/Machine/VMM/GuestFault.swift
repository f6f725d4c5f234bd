import KVM

/// A run stopped in a way the guest did not ask for: by the guest (triple fault, an
/// instruction KVM could not emulate, an access outside RAM, an exit nobody handles), or by
/// the host (a KVM call that failed).
public struct GuestFault: Error, Sendable, Equatable, CustomStringConvertible {
    /// What stopped the run.
    public enum Cause: Sendable, Equatable {
        /// The guest's exit that nothing handles.
        case exit(VMExit)
        /// A host call failed (`error`, with its errno) while flowtrace was doing `doing`.
        case host(KVMError, while: String)
        /// The guest's exit, handled, but a host call needed for it failed.
        case exitFailed(VMExit, KVMError, while: String)
        /// The guest's own memory made what flowtrace was doing impossible: an address its
        /// page tables do not map (an unmapped stack at a probed `popf`/`iret`), or one
        /// they map outside its RAM (`KVMError.isGuestCondition`). A guest fault, not the host's.
        case guestMemory(KVMError, while: String)
    }

    /// The vCPU that stopped.
    public var vcpu: Int
    public var cause: Cause
    /// `rip` at the exit.
    public var rip: UInt64
    /// `rip` as `symbol+0xoff`, when the image has a symbol for it.
    public var location: String
    /// All general-purpose registers at the exit (nil if they could not be read).
    public var registers: Registers?

    /// The instruction at rip, decoded (`movaps xmmword ptr [rsp-0x28], xmm0 (0f 29 44 24
    /// d8)`), for faults of the guest's own code; nil when it could not be read or decoded.
    public var instruction: String?
    /// What to do about it, where flowtrace knows (an SSE instruction PVM cannot emulate).
    public var hint: String?

    public init(vcpu: Int, cause: Cause, rip: UInt64, location: String, registers: Registers?,
                instruction: String? = nil, hint: String? = nil) {
        self.vcpu = vcpu; self.cause = cause; self.rip = rip; self.location = location
        self.registers = registers; self.instruction = instruction; self.hint = hint
    }

    /// The guest's exit, when the guest stopped it.
    public var exit: VMExit? {
        if case let .exit(e) = cause { return e }
        return nil
    }

    /// Whether a host call failed (not the guest).
    public var isHostFailure: Bool {
        switch cause {
        case .exit, .guestMemory: false
        case .host, .exitFailed: true
        }
    }

    public var description: String {
        let at = "at rip 0x\(String(rip, radix: 16))" + (location.hasPrefix("0x") ? "" : " (\(location))")
        switch cause {
        case let .exit(e):
            return "guest fault on vCPU \(vcpu): \(e.name) \(at)" + (instruction.map { ": \($0)" } ?? "")
        case let .host(error, doing):
            return "host failure on vCPU \(vcpu) while \(doing): \(error.description); guest \(at)"
        case let .exitFailed(e, error, doing):
            return "host failure on vCPU \(vcpu) while \(doing) after \(e.name): \(error.description); guest \(at)"
        case let .guestMemory(error, doing):
            return "guest fault on vCPU \(vcpu) while \(doing): \(error.description) \(at)"
        }
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
