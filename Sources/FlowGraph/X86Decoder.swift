import CZydis

/// Why bytes did not decode.
public struct DecodeError: Error, Sendable, Hashable, CustomStringConvertible {
    public let address: UInt64
    public let reason: String
    public var description: String { "0x\(String(address, radix: 16)): \(reason)" }
}

/// x86-64 decoding and Intel-syntax formatting, through Zydis.
public struct X86Decoder {
    private var decoder = ZydisDecoder()
    private var formatter = ZydisFormatter()

    /// The longest x86 instruction.
    public static let maxLength = 15

    public init() {
        // Both calls only fail for invalid arguments, which these are not.
        _ = ZydisDecoderInit(&decoder, ZYDIS_MACHINE_MODE_LONG_64, ZYDIS_STACK_WIDTH_64)
        _ = ZydisFormatterInit(&formatter, ZYDIS_FORMATTER_STYLE_INTEL)
        _ = ZydisFormatterSetProperty(&formatter, ZYDIS_FORMATTER_PROP_HEX_UPPERCASE, 0)
        _ = ZydisFormatterSetProperty(&formatter, ZYDIS_FORMATTER_PROP_ADDR_PADDING_ABSOLUTE, ZyanUPointer(bitPattern: Int(ZYDIS_PADDING_DISABLED.rawValue)))
        _ = ZydisFormatterSetProperty(&formatter, ZYDIS_FORMATTER_PROP_FORCE_RELATIVE_RIPREL, 1)
        for p in [ZYDIS_FORMATTER_PROP_IMM_PADDING, ZYDIS_FORMATTER_PROP_DISP_PADDING] {
            _ = ZydisFormatterSetProperty(&formatter, p, ZyanUPointer(bitPattern: Int(ZYDIS_PADDING_DISABLED.rawValue)))
        }
    }

    /// Decodes the instruction at the start of `bytes`, which were read at `address`.
    /// `bytes` may hold more than one instruction; fewer than 15 bytes is fine when the
    /// instruction fits.
    public func decode(_ bytes: [UInt8], at address: UInt64) -> Result<Instruction, DecodeError> {
        guard !bytes.isEmpty else { return .failure(DecodeError(address: address, reason: "no bytes to decode")) }
        var insn = ZydisDecodedInstruction()
        var ops = [ZydisDecodedOperand](repeating: ZydisDecodedOperand(), count: Int(ZYDIS_MAX_OPERAND_COUNT))
        // SAFETY: Zydis reads the decoder, `bytes` and writes `ops` only during this call.
        let status = withUnsafePointer(to: decoder) { d in
            bytes.withUnsafeBytes { b in
                ops.withUnsafeMutableBufferPointer { o in
                    ZydisDecoderDecodeFull(d, b.baseAddress, b.count, &insn, o.baseAddress)
                }
            }
        }
        guard status & 0x8000_0000 == 0 else {
            return .failure(DecodeError(address: address, reason: Self.describe(status: status, available: bytes.count)))
        }
        let length = Int(insn.length)
        let visible = Int(insn.operand_count_visible)
        var buffer = [CChar](repeating: 0, count: 256)
        // SAFETY: Zydis reads the formatter and the operands decoded above only during this call.
        let fmt = withUnsafePointer(to: formatter) { f in
            ops.withUnsafeBufferPointer { o in
                ZydisFormatterFormatInstruction(f, &insn, o.baseAddress, UInt8(visible), &buffer, buffer.count, address, nil)
            }
        }
        let mnemonic = String(cString: ZydisMnemonicGetString(insn.mnemonic))
        let text = fmt & 0x8000_0000 == 0 ? String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self) : mnemonic
        let end = address &+ UInt64(length)

        var operands: [Operand] = []
        var reference: UInt64?
        for k in 0..<visible {
            let op = ops[k]
            switch op.type {
            case ZYDIS_OPERAND_TYPE_REGISTER:
                operands.append(.register(Self.register(op.reg.value)))
            case ZYDIS_OPERAND_TYPE_MEMORY:
                var m = MemoryOperand(
                    base: op.mem.base == ZYDIS_REGISTER_NONE ? nil : Self.register(op.mem.base),
                    index: op.mem.index == ZYDIS_REGISTER_NONE ? nil : Self.register(op.mem.index),
                    scale: Int(op.mem.scale), displacement: op.mem.disp.has_displacement != 0 ? op.mem.disp.value : 0,
                    size: op.mem.type == ZYDIS_MEMOP_TYPE_AGEN ? 0 : Int(op.size), absolute: nil)
                if op.mem.base == ZYDIS_REGISTER_RIP {
                    m.absolute = end &+ UInt64(bitPattern: m.displacement)
                    reference = m.absolute
                }
                operands.append(.memory(m))
            case ZYDIS_OPERAND_TYPE_IMMEDIATE:
                if op.imm.is_relative != 0 {
                    var target: UInt64 = 0
                    var o = op
                    if ZydisCalcAbsoluteAddress(&insn, &o, address, &target) & 0x8000_0000 == 0 {
                        reference = target
                        operands.append(.immediate(Int64(bitPattern: target)))
                    } else {
                        operands.append(.other)
                    }
                } else {
                    operands.append(.immediate(op.imm.is_signed != 0 ? op.imm.value.s : Int64(bitPattern: op.imm.value.u)))
                }
            default:
                operands.append(.other)
            }
        }

        let relativeTarget: UInt64? = {
            guard visible > 0, ops[0].type == ZYDIS_OPERAND_TYPE_IMMEDIATE, ops[0].imm.is_relative != 0 else { return nil }
            return reference
        }()
        let flow: Flow
        switch insn.meta.category {
        case ZYDIS_CATEGORY_COND_BR:
            flow = relativeTarget.map { .conditionalJump(target: $0) } ?? .indirectJump
        case ZYDIS_CATEGORY_UNCOND_BR:
            flow = relativeTarget.map { .jump(target: $0) } ?? .indirectJump
        case ZYDIS_CATEGORY_CALL:
            flow = .call(target: relativeTarget)
        case ZYDIS_CATEGORY_RET:
            flow = .exit
        default:
            switch insn.mnemonic {
            case ZYDIS_MNEMONIC_IRET, ZYDIS_MNEMONIC_IRETD, ZYDIS_MNEMONIC_IRETQ, ZYDIS_MNEMONIC_SYSRET,
                 ZYDIS_MNEMONIC_SYSEXIT, ZYDIS_MNEMONIC_HLT, ZYDIS_MNEMONIC_UD0, ZYDIS_MNEMONIC_UD1,
                 ZYDIS_MNEMONIC_UD2, ZYDIS_MNEMONIC_INT3:
                flow = .exit
            default:
                flow = .next
            }
        }
        // A rip-relative operand's displacement is always 32 bits in 64-bit mode.
        let ripRelative = (0..<Int(insn.operand_count)).contains { k in
            ops[k].type == ZYDIS_OPERAND_TYPE_MEMORY && ops[k].mem.base == ZYDIS_REGISTER_RIP
        }
        let ripDisplacementOffset = ripRelative && insn.raw.disp.size == 32 ? Int(insn.raw.disp.offset) : nil
        return .success(Instruction(address: address, bytes: Array(bytes.prefix(length)), text: text, mnemonic: mnemonic,
                                    flow: flow, reference: reference, ripDisplacementOffset: ripDisplacementOffset,
                                    isFar: insn.meta.branch_type == ZYDIS_BRANCH_TYPE_FAR, operands: operands))
    }

    private static func register(_ r: ZydisRegister) -> Register {
        let family = ZydisRegisterGetLargestEnclosing(ZYDIS_MACHINE_MODE_LONG_64, r)
        return Register(raw: r.rawValue, family: family.rawValue, width: Int(ZydisRegisterGetWidth(ZYDIS_MACHINE_MODE_LONG_64, r)))
    }

    /// Zydis's status codes (ZYDIS_STATUS_*, module 2) in words.
    private static func describe(status: ZyanStatus, available: Int) -> String {
        guard (status >> 20) & 0x7FF == 2 else { return "cannot decode (Zyan status 0x\(String(status, radix: 16)))" }
        return switch status & 0xFFFFF {
        case 0x0: "needs more bytes than the \(available) readable here"
        case 0x1: "invalid instruction encoding"
        case 0x2: "invalid instruction: longer than 15 bytes"
        case 0x3: "invalid instruction: register not allowed here"
        case 0x4: "invalid instruction: LOCK prefix not allowed here"
        case 0x5: "invalid instruction: legacy prefix not allowed here"
        case 0x6: "invalid instruction: REX prefix not allowed here"
        case 0x7: "invalid instruction: bad opcode map"
        case 0x8: "invalid instruction: malformed EVEX prefix"
        case 0x9: "invalid instruction: malformed MVEX prefix"
        case 0xA: "invalid instruction: bad mask register"
        default: "cannot decode (Zydis status 0x\(String(status, radix: 16)))"
        }
    }
}

extension X86Decoder {
    /// The instruction that starts at or covers `address`, found by decoding one instruction
    /// after another from `start` (a function's first byte); nil when decoding fails first.
    /// Where a function holds no data between its instructions, `address` is an instruction
    /// boundary exactly when the result starts there.
    public func instruction(covering address: UInt64, sweepingFrom start: UInt64, source: some CodeSource) -> Instruction? {
        var a = start
        while a <= address {
            guard case let .success(bytes) = source.code(at: a, count: Self.maxLength),
                  case let .success(i) = decode(bytes, at: a) else { return nil }
            if address < i.end { return i }
            a = i.end
        }
        return nil
    }
}
