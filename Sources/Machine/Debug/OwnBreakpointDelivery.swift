import KVM

/// Delivering the guest's own #BP (an int3 of its own that exited to flowtrace because int3
/// traps of ours are armed) the way the CPU would, without KVM's injection.
///
/// Why not `KVM_GUESTDBG_INJECT_BP`: KVM delivers a #BP as a software exception, and on an
/// SVM host without NRIPS (the nested machine the tests use; QEMU's TCG offers no NRIPS) it
/// first moves rip past the int3 by decoding the instruction there, then injects. That was
/// seen to go wrong roughly once in a few hundred deliveries (runs failed after 3, 76 and
/// about 520) when Linux patches its own text on 2 vCPUs (text_poke_bp writes int3s into
/// code the other CPU runs): rip ended one byte past the int3 with no #BP delivered, so the
/// CPU ran the tail bytes of a half-patched jump-label site as instructions and the kernel
/// oopsed (LinuxSymbolTests, "the kernel patching its own text under int3"). Building the
/// exception frame here leaves nothing to decode or re-inject: rip is the handler's when
/// the vCPU enters the guest again.
///
/// It applies to the case kernels hit: 64-bit mode at CPL 0, the IDT's vector 3 a present
/// 64-bit interrupt or trap gate into the current code segment (the same privilege, so no
/// stack switch but an IST stack if the gate names one). Anything else (another mode,
/// user-mode int3s, FRED, CET, a gate flowtrace cannot use, memory it cannot reach) returns
/// false and the caller injects through KVM as before.
struct OwnBreakpointDelivery {
    let memory: GuestMemory

    /// RFLAGS bits event delivery changes.
    private static let trapFlag: UInt64 = 1 << 8, interruptFlag: UInt64 = 1 << 9
    private static let nestedTask: UInt64 = 1 << 14, resume: UInt64 = 1 << 16, virtual8086: UInt64 = 1 << 17
    private static let longModeActive: UInt64 = 1 << 10
    private static let cr4CET: UInt64 = 1 << 23, cr4FRED: UInt64 = 1 << 32

    /// What the CPU would do for the int3 at `address`: the frame on the stack and the
    /// registers that enter the handler; nil where it does not apply.
    struct Plan: Equatable {
        /// Guest-physical address of each 8-byte slot of the frame, lowest first: rip after
        /// the int3, cs, rflags, rsp, ss.
        var slots: [UInt64]
        var frame: [UInt64]
        var registers: Registers
    }

    func plan(at address: UInt64, registers regs: Registers, special s: SpecialRegisters) throws(KVMError) -> Plan? {
        guard s.efer & Self.longModeActive != 0, s.cs.long, s.cs.selector & 3 == 0, s.cs.dpl == 0,
              s.cr4 & (Self.cr4CET | Self.cr4FRED) == 0, regs.rip == address, s.idt.limit >= 3 * 16 + 15 else { return nil }
        let paging = s.paging
        let gate = try memory.read(virtual: s.idt.base &+ 3 * 16, count: 16, paging: paging)
        let type = gate[5] & 0xF, present = gate[5] & 0x80 != 0
        guard present, type == 0xE || type == 0xF else { return nil }
        guard gate.le16(2) == s.cs.selector else { return nil }
        // The handler's offset: bits 15:0, 31:16 and 63:32 at bytes 0, 6 and 8.
        let target = UInt64(gate.le16(0)) | UInt64(gate.le16(6)) << 16 | UInt64(gate.le32(8)) << 32
        var rsp = regs.rsp
        let ist = UInt64(gate[4] & 7)
        if ist != 0 {
            // The 64-bit TSS keeps IST1..IST7 at 0x24 + 8 * (n - 1).
            rsp = try memory.read(virtual: s.tr.base &+ 0x24 &+ 8 * (ist - 1), count: 8, paging: paging).le64(0)
        }
        // 64-bit mode aligns the new stack pointer to 16 bytes, then pushes ss, rsp, rflags,
        // cs and the address after the int3.
        let top = (rsp & ~0xF) &- 40
        var slots: [UInt64] = []
        for i in 0..<5 { slots.append(try memory.translate(virtual: top &+ 8 * UInt64(i), paging: paging).physical) }
        let frame = [address &+ 1, UInt64(s.cs.selector), regs.rflags, regs.rsp, UInt64(s.ss.selector)]
        var entering = regs
        entering.rip = target
        entering.rsp = top
        entering.rflags &= ~(Self.trapFlag | Self.nestedTask | Self.resume | Self.virtual8086)
        if type == 0xE { entering.rflags &= ~Self.interruptFlag }
        return Plan(slots: slots, frame: frame, registers: entering)
    }

    /// Delivers the #BP of the int3 at `address` on `vcpu`. false: it does not apply here
    /// (nothing was changed).
    func deliver(_ vcpu: VCPU, at address: UInt64) throws(KVMError) -> Bool {
        let plan: Plan?
        do { plan = try self.plan(at: address, registers: try vcpu.registers(), special: try vcpu.specialRegisters()) } catch {
            // A gate, TSS or stack flowtrace cannot read: KVM's injection will find out.
            switch error {
            case .unmapped, .physicalOutOfRange: return false
            default: throw error
            }
        }
        guard let plan else { return false }
        for (slot, value) in zip(plan.slots, plan.frame) { try memory.writeUInt64(physical: slot, value) }
        try vcpu.setRegisters(plan.registers)
        // Delivering an event ends an STI or MOV SS interrupt shadow.
        var events = try vcpu.events()
        if events.interruptShadow != 0 {
            events.interruptShadow = 0
            try vcpu.setEvents(events)
        }
        return true
    }
}
