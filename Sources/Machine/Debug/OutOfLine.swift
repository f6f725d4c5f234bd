import FlowGraph

/// The instruction under a patched probe, prepared for out-of-line stepping: instead of
/// putting the original byte back and single-stepping it in place (which must hold every
/// other vCPU out of the guest, or one could run through the location unseen), the vCPU
/// single-steps a copy of the instruction in a slot of its own, and rip (and a call's
/// return address) is moved back to where the instruction really is. The trap byte stays,
/// so other vCPUs keep running and keep trapping.
///
/// Instructions whose effect depends on where they run in ways a rip fix-up cannot undo are
/// stepped in place: hlt, int3/int n, syscall/sysenter/sysret/sysexit, iret, ud0-2, xbegin,
/// far branches.
public struct DisplacedInstruction: Sendable, Equatable {
    /// What to do to rip after the step.
    public enum Fixup: Sendable, Equatable {
        /// rip is relative to the copy (the next instruction, or a relative branch's
        /// target): move it by (address − slot).
        case relocate
        /// rip is absolute (ret, a jump through a register or memory): keep it.
        case keep
        /// A call: relocate rip when the call is relative; the return address it pushed
        /// (slot + length) becomes address + length.
        case call(relative: Bool)
    }

    /// Where the instruction is.
    public let address: UInt64
    public let bytes: [UInt8]
    /// The 32-bit rip-relative displacement's offset in `bytes`, adjusted for the slot.
    public let ripDisplacementOffset: Int?
    public let fixup: Fixup

    static let inPlace: Set<String> = ["hlt", "int3", "int", "int1", "into", "syscall", "sysenter", "sysexit", "sysret",
                                       "iret", "iretd", "iretq", "ud0", "ud1", "ud2", "xbegin"]

    /// Why `instruction` must be stepped in place, or the plan to step it out of line.
    public static func plan(_ instruction: Instruction) -> Result<DisplacedInstruction, InPlaceReason> {
        if inPlace.contains(instruction.mnemonic) { return .failure(InPlaceReason("\(instruction.mnemonic) depends on where it runs")) }
        if instruction.isFar { return .failure(InPlaceReason("far branch")) }
        let fixup: Fixup
        switch instruction.flow {
        case .next, .jump, .conditionalJump: fixup = .relocate
        case let .call(target): fixup = .call(relative: target != nil)
        case .indirectJump: fixup = .keep
        case .exit:
            guard instruction.mnemonic == "ret" else { return .failure(InPlaceReason("\(instruction.mnemonic) depends on where it runs")) }
            fixup = .keep
        }
        return .success(DisplacedInstruction(address: instruction.address, bytes: instruction.bytes,
                                             ripDisplacementOffset: instruction.ripDisplacementOffset, fixup: fixup))
    }

    /// The bytes to run at `slot`: a rip-relative displacement adjusted to name the same
    /// address from there; nil when the adjusted displacement does not fit in 32 bits.
    public func bytes(at slot: UInt64) -> [UInt8]? {
        guard let o = ripDisplacementOffset else { return bytes }
        let old = Int64(Int32(bitPattern: UInt32(bytes[o]) | UInt32(bytes[o + 1]) << 8 | UInt32(bytes[o + 2]) << 16 | UInt32(bytes[o + 3]) << 24))
        let (shifted, overflow) = old.addingReportingOverflow(Int64(bitPattern: address &- slot))
        guard !overflow, let new = Int32(exactly: shifted) else { return nil }
        var out = bytes
        let u = UInt32(bitPattern: new)
        for k in 0..<4 { out[o + k] = UInt8(truncatingIfNeeded: u >> (8 * UInt32(k))) }
        return out
    }

    /// rip after the step, moved back to the instruction's own address where it is relative.
    public func relocated(rip: UInt64, slot: UInt64) -> UInt64 {
        switch fixup {
        case .relocate, .call(relative: true): rip &- slot &+ address
        case .keep, .call(relative: false): rip
        }
    }

    /// The return address a call pushed from `slot`, and the one it must be.
    public func returnAddresses(slot: UInt64) -> (pushed: UInt64, real: UInt64)? {
        guard case .call = fixup else { return nil }
        return (slot &+ UInt64(bytes.count), address &+ UInt64(bytes.count))
    }
}

/// Why an instruction is stepped in place.
public struct InPlaceReason: Error, Sendable, Equatable, CustomStringConvertible {
    public let description: String
    init(_ d: String) { description = d }
}
