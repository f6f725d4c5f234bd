/// A condition on a probe location, evaluated on the vCPU thread at the hit before anything
/// is recorded: a hit whose condition is false takes no hit budget and keeps no record.
///
/// Arithmetic is unsigned 64-bit and wraps (`+ - *`); shifts by 64 or more give 0;
/// comparisons are unsigned (a signed test looks at the sign bit: `rax & (1 << 63) != 0`
/// for "negative"); `! && ||` treat 0 as false and give 0 or 1, and `&&` / `||` evaluate
/// their right side only when it decides (so `rdi != 0 && [rdi]:4 == 5` never reads at 0).
/// A register or memory read that fails makes the condition false; the hit counts it with
/// its reason.
///
/// Built from an `Expression` once, into a flat postfix program that the hit path runs on a
/// fixed-size stack: no parsing, no allocation.
public struct ProbeCondition: Sendable, CustomStringConvertible {
    public indirect enum Expression: Sendable, Equatable {
        case constant(UInt64)
        case register(X86Register)
        /// `size` bytes (1, 2, 4 or 8) at the address the expression gives, little-endian.
        case memory(Expression, size: Int)
        case unary(UnaryOperator, Expression)
        case binary(BinaryOperator, Expression, Expression)
    }

    public enum UnaryOperator: String, Sendable, CaseIterable {
        case not = "!", complement = "~", negate = "-"
    }

    public enum BinaryOperator: String, Sendable, CaseIterable {
        case multiply = "*", add = "+", subtract = "-", shiftLeft = "<<", shiftRight = ">>"
        case less = "<", lessOrEqual = "<=", greater = ">", greaterOrEqual = ">="
        case equal = "==", notEqual = "!="
        case bitAnd = "&", bitXor = "^", bitOr = "|", logicalAnd = "&&", logicalOr = "||"
    }

    /// What the condition came from, for messages (the expression as the user wrote it).
    public let description: String
    public let expression: Expression
    let program: [Instruction]

    /// The deepest stack a program may need.
    public static let maximumDepth = 32

    enum Instruction: Sendable {
        case constant(UInt64)
        case register(X86Register)
        case load(size: Int)
        case unary(UnaryOperator)
        case binary(BinaryOperator)
        /// `&&`: a false left side is the result (jump to `to`), else it is dropped.
        case andJump(to: Int)
        /// `||`: a true left side gives 1 (jump to `to`), else it is dropped.
        case orJump(to: Int)
        /// The right side of `&&` / `||` as 0 or 1.
        case truth
    }

    /// Compiles `expression`; `text` is how it reads. Throws for a register wider than 64
    /// bits, a memory size other than 1, 2, 4 or 8, or a program deeper than
    /// `maximumDepth`.
    public init(_ expression: Expression, text: String) throws(TraceError) {
        var program: [Instruction] = []
        var depth = 0, deepest = 0
        try Self.emit(expression, into: &program, depth: &depth, deepest: &deepest)
        guard deepest <= Self.maximumDepth else {
            throw TraceError.invalidCondition(text, reason: "too complex: it needs \(deepest) values at once, at most \(Self.maximumDepth)")
        }
        self.description = text
        self.expression = expression
        self.program = program
    }

    private static func emit(_ e: Expression, into p: inout [Instruction], depth: inout Int, deepest: inout Int) throws(TraceError) {
        func push() { depth += 1; deepest = max(deepest, depth) }
        switch e {
        case let .constant(c):
            p.append(.constant(c)); push()
        case let .register(r):
            switch r.width {
            case .u8, .u16, .u32, .u64: break
            case .u128, .descriptorTable:
                throw TraceError.invalidCondition(r.name, reason: "\(r.name) is wider than 64 bits; conditions compute in 64 bits")
            }
            p.append(.register(r)); push()
        case let .memory(address, size):
            guard [1, 2, 4, 8].contains(size) else {
                throw TraceError.invalidCondition(":\(size)", reason: "a memory operand in a condition is 1, 2, 4 or 8 bytes, not \(size)")
            }
            try emit(address, into: &p, depth: &depth, deepest: &deepest)
            p.append(.load(size: size))
        case let .unary(op, x):
            try emit(x, into: &p, depth: &depth, deepest: &deepest)
            p.append(.unary(op))
        case let .binary(op, a, b) where op == .logicalAnd || op == .logicalOr:
            try emit(a, into: &p, depth: &depth, deepest: &deepest)
            let jump = p.count
            p.append(.truth)   // replaced below, once the target is known
            depth -= 1
            try emit(b, into: &p, depth: &depth, deepest: &deepest)
            p.append(.truth)
            p[jump] = op == .logicalAnd ? .andJump(to: p.count) : .orJump(to: p.count)
        case let .binary(op, a, b):
            try emit(a, into: &p, depth: &depth, deepest: &deepest)
            try emit(b, into: &p, depth: &depth, deepest: &deepest)
            p.append(.binary(op))
            depth -= 1
        }
    }

    /// The condition's answer at a hit.
    public enum Outcome: Sendable, Equatable {
        case pass
        case fail
        /// A read failed (the condition counts as false).
        case unreadable(TraceError)
    }

    /// Runs the program against `context`.
    @inline(__always)
    public func evaluate<C: HitContext>(_ context: C) -> Outcome {
        var stack = InlineArray<32, UInt64>(repeating: 0)
        var top = -1
        var pc = 0
        let count = program.count
        while pc < count {
            switch program[pc] {
            case let .constant(c):
                top += 1; stack[top] = c
            case let .register(r):
                do throws(TraceError) {
                    let v = try context.read(r).asUInt64
                    top += 1; stack[top] = v
                } catch { return .unreadable(error) }
            case let .load(size):
                do throws(TraceError) { stack[top] = try Self.load(size, at: stack[top], context) } catch { return .unreadable(error) }
            case let .unary(op):
                let x = stack[top]
                switch op {
                case .not: stack[top] = x == 0 ? 1 : 0
                case .complement: stack[top] = ~x
                case .negate: stack[top] = 0 &- x
                }
            case let .binary(op):
                let b = stack[top], a = stack[top - 1]
                top -= 1
                stack[top] = Self.apply(op, a, b)
            case let .andJump(target):
                if stack[top] == 0 { pc = target; continue }
                top -= 1
            case let .orJump(target):
                if stack[top] != 0 { stack[top] = 1; pc = target; continue }
                top -= 1
            case .truth:
                stack[top] = stack[top] == 0 ? 0 : 1
            }
            pc += 1
        }
        return stack[0] != 0 ? .pass : .fail
    }

    @inline(__always)
    static func apply(_ op: BinaryOperator, _ a: UInt64, _ b: UInt64) -> UInt64 {
        switch op {
        case .multiply: a &* b
        case .add: a &+ b
        case .subtract: a &- b
        case .shiftLeft: b >= 64 ? 0 : a << b
        case .shiftRight: b >= 64 ? 0 : a >> b
        case .less: a < b ? 1 : 0
        case .lessOrEqual: a <= b ? 1 : 0
        case .greater: a > b ? 1 : 0
        case .greaterOrEqual: a >= b ? 1 : 0
        case .equal: a == b ? 1 : 0
        case .notEqual: a != b ? 1 : 0
        case .bitAnd: a & b
        case .bitXor: a ^ b
        case .bitOr: a | b
        case .logicalAnd: (a != 0 && b != 0) ? 1 : 0
        case .logicalOr: (a != 0 || b != 0) ? 1 : 0
        }
    }

    /// `size` bytes at `address` through the context, little-endian, into a stack buffer.
    @inline(__always)
    static func load<C: HitContext>(_ size: Int, at address: UInt64, _ context: C) throws(TraceError) -> UInt64 {
        switch size {
        case 1: return try read(InlineArray<1, UInt8>(repeating: 0), at: address, context)
        case 2: return try read(InlineArray<2, UInt8>(repeating: 0), at: address, context)
        case 4: return try read(InlineArray<4, UInt8>(repeating: 0), at: address, context)
        default: return try read(InlineArray<8, UInt8>(repeating: 0), at: address, context)
        }
    }

    @inline(__always)
    private static func read<let N: Int, C: HitContext>(_ buffer: InlineArray<N, UInt8>, at address: UInt64, _ context: C) throws(TraceError) -> UInt64 {
        var b = buffer
        var span = b.mutableSpan
        var bytes = span.mutableBytes
        try context.readMemory(at: address, into: &bytes)
        var v: UInt64 = 0
        for i in 0..<N { v |= UInt64(b[i]) << (8 * UInt64(i)) }
        return v
    }
}
