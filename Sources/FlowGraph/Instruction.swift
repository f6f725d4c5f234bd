/// One decoded x86-64 instruction.
public struct Instruction: Sendable, Hashable {
    /// Guest-virtual address of its first byte.
    public let address: UInt64
    /// Its encoding.
    public let bytes: [UInt8]
    /// Intel syntax, lower case (`mov rax, qword ptr [rip+0x1f54]`).
    public let text: String
    /// The mnemonic alone (`mov`).
    public let mnemonic: String
    /// What it does to the flow of control.
    public let flow: Flow
    /// The absolute address it refers to, for annotations: the target of a direct branch or
    /// call, or the address of a rip-relative memory operand.
    public let reference: UInt64?
    /// Where in `bytes` the 32-bit displacement of a rip-relative memory operand is, for
    /// code that moves the instruction elsewhere (out-of-line stepping); nil without one.
    public let ripDisplacementOffset: Int?
    /// A far branch (`jmp far`, `call far`, `retf`): it loads cs too.
    public let isFar: Bool
    /// Its visible operands, for the pattern matchers (jump tables).
    let operands: [Operand]

    /// The address of the next instruction in memory.
    public var end: UInt64 { address &+ UInt64(bytes.count) }
    public var length: Int { bytes.count }

    /// Whether it ends a basic block (anything but `.next` and `.call`).
    public var endsBlock: Bool {
        switch flow {
        case .next, .call: false
        case .jump, .conditionalJump, .indirectJump, .exit: true
        }
    }
}

/// What an instruction does to the flow of control.
public enum Flow: Sendable, Hashable {
    /// Execution goes on at the next instruction.
    case next
    /// A call; nil target for an indirect call. Execution comes back to the next instruction.
    case call(target: UInt64?)
    /// A direct unconditional jump.
    case jump(target: UInt64)
    /// A direct conditional branch (jcc, loop, jrcxz): to `target` or the next instruction.
    case conditionalJump(target: UInt64)
    /// A jump through a register or memory.
    case indirectJump
    /// Execution does not go on in this function: ret, iret, sysret, sysexit, hlt, ud0-2, int3.
    case exit
}

/// A general-purpose register as the matchers see it.
struct Register: Sendable, Hashable {
    /// Zydis's register number.
    let raw: UInt32
    /// The 64-bit register it is part of (`rax` for `eax`), Zydis's number.
    let family: UInt32
    /// Width in bits.
    let width: Int
}

/// A memory operand: `[base + index*scale + displacement]`.
struct MemoryOperand: Sendable, Hashable {
    var base: Register?
    var index: Register?
    var scale: Int
    var displacement: Int64
    /// Operand size in bits (0 for an address computation such as lea's).
    var size: Int
    /// `[rip+disp]`: then `absolute` is the address it names.
    var absolute: UInt64?
}

enum Operand: Sendable, Hashable {
    case register(Register)
    case memory(MemoryOperand)
    case immediate(Int64)
    case other
}
