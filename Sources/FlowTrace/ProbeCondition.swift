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
    /// The same condition as range tests on registers, all or any of which must hold, when
    /// it is only comparisons of registers with constants joined by `&&` (or by `||`): the
    /// commonest kind, run without an interpreter.
    let ranges: RangeTests?

    /// `register` in `low ... low + span` (unsigned), or with `inside` false outside it.
    struct RangeTest: Sendable {
        let register: X86Register
        let low: UInt64
        let span: UInt64
        let inside: Bool

        @inline(__always)
        func holds(_ v: UInt64) -> Bool { (v &- low <= span) == inside }
    }

    struct RangeTests: Sendable {
        let all: Bool
        let tests: [RangeTest]
    }

    /// The deepest stack a program may need.
    public static let maximumDepth = 16

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
        /// `register OP constant` in one step (the commonest comparison).
        case registerWithConstant(X86Register, BinaryOperator, UInt64)
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
        ranges = Self.rangeTests(expression)
    }

    /// `e` as range tests, if it is comparisons of registers with constants all joined by
    /// `&&` or all by `||`.
    static func rangeTests(_ e: Expression) -> RangeTests? {
        func operands(_ e: Expression, _ op: BinaryOperator) -> [Expression] {
            if case let .binary(o, a, b) = e, o == op { return operands(a, op) + operands(b, op) }
            return [e]
        }
        for joiner in [BinaryOperator.logicalAnd, .logicalOr] {
            let parts = operands(e, joiner)
            let tests = parts.compactMap(rangeTest)
            if tests.count == parts.count, parts.count > 1 || joiner == .logicalAnd { return RangeTests(all: joiner == .logicalAnd, tests: tests) }
        }
        return nil
    }

    /// `register CMP constant` (or `constant CMP register`) as a range test.
    static func rangeTest(_ e: Expression) -> RangeTest? {
        guard case let .binary(op, a, b) = e else { return nil }
        let r: X86Register, c: UInt64, cmp: BinaryOperator
        switch (a, b) {
        case let (.register(x), .constant(k)): (r, c, cmp) = (x, k, op)
        case let (.constant(k), .register(x)):
            // Mirrored: c < r is r > c.
            let mirror: [BinaryOperator: BinaryOperator] = [.less: .greater, .lessOrEqual: .greaterOrEqual, .greater: .less,
                                                            .greaterOrEqual: .lessOrEqual, .equal: .equal, .notEqual: .notEqual]
            guard let m = mirror[op] else { return nil }
            (r, c, cmp) = (x, k, m)
        default: return nil
        }
        switch r.width {
        case .u8, .u16, .u32, .u64: break
        case .u128, .descriptorTable: return nil
        }
        func range(_ low: UInt64, _ high: UInt64, inside: Bool = true) -> RangeTest {
            RangeTest(register: r, low: low, span: high - low, inside: inside)
        }
        switch cmp {
        case .equal: return range(c, c)
        case .notEqual: return range(c, c, inside: false)
        case .less: return c == 0 ? range(0, .max, inside: false) : range(0, c - 1)
        case .lessOrEqual: return range(0, c)
        case .greater: return c == .max ? range(0, .max, inside: false) : range(c + 1, .max)
        case .greaterOrEqual: return range(c, .max)
        default: return nil
        }
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
                throw TraceError.invalidCondition(r.name, reason: "\(r.name) is wider than 64 bits; conditions and aggregations compute in 64 bits")
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
        case let .binary(op, .register(r), .constant(c)) where op != .logicalAnd && op != .logicalOr:
            try emit(.register(r), into: &p, depth: &depth, deepest: &deepest)
            p[p.count - 1] = .registerWithConstant(r, op, c)
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
    public func evaluate<C: HitContext>(_ context: C) -> Outcome {
        do throws(TraceError) {
            if let ranges { return try Self.run(ranges.tests, from: 0, to: ranges.tests.count, all: ranges.all, context) ? .pass : .fail }
            return try Self.run(program, from: 0, to: program.count, context) ? .pass : .fail
        } catch {
            return .unreadable(error)
        }
    }

    /// Runs `code[from..<to]` (one condition's program; the module keeps every location's
    /// in one array) against `context`: whether it holds, or the error of a read that
    /// failed (typed, so the passing path has nothing to clean up). Jump targets are
    /// relative to `from`. The value on top of the stack lives in `acc`; the stack holds
    /// the ones below it.
    @inline(__always)
    static func run<C: HitContext>(_ code: [Instruction], from: Int, to end: Int, _ context: C) throws(TraceError) -> Bool {
        try value(code, from: from, to: end, context) != 0
    }

    /// The value `code[from..<to]` computes (its last value on the stack).
    @inline(__always)
    static func value<C: HitContext>(_ code: [Instruction], from: Int, to end: Int, _ context: C) throws(TraceError) -> UInt64 {
        var stack = InlineArray<16, UInt64>(repeating: 0)
        var depth = 0          // values: `acc` and `depth - 1` in `stack` below it
        var acc: UInt64 = 0
        var pc = from
        while pc < end {
            switch code[pc] {
            case let .constant(c):
                if depth > 0 { stack[depth - 1] = acc }
                depth += 1
                acc = c
            case let .register(r):
                if depth > 0 { stack[depth - 1] = acc }
                depth += 1
                acc = try context.readInteger(r)
            case let .registerWithConstant(r, op, c):
                if depth > 0 { stack[depth - 1] = acc }
                depth += 1
                acc = apply(op, try context.readInteger(r), c)
            case let .load(size):
                acc = try load(size, at: acc, context)
            case let .unary(op):
                switch op {
                case .not: acc = acc == 0 ? 1 : 0
                case .complement: acc = ~acc
                case .negate: acc = 0 &- acc
                }
            case let .binary(op):
                depth -= 1
                acc = apply(op, stack[depth - 1], acc)
            case let .andJump(target):
                if acc == 0 { pc = from + target; continue }
                depth -= 1
                if depth > 0 { acc = stack[depth - 1] }
            case let .orJump(target):
                if acc != 0 { acc = 1; pc = from + target; continue }
                depth -= 1
                if depth > 0 { acc = stack[depth - 1] }
            case .truth:
                acc = acc == 0 ? 0 : 1
            }
            pc += 1
        }
        return acc
    }

    /// The expression's value at a hit (what `--count-by` and `--hist` count).
    public func value<C: HitContext>(_ context: C) throws(TraceError) -> UInt64 {
        try Self.value(program, from: 0, to: program.count, context)
    }

    /// Range tests `tests[from..<to]`: all of them hold, or (`all` false) any.
    @inline(__always)
    static func run<C: HitContext>(_ tests: [RangeTest], from: Int, to end: Int, all: Bool, _ context: C) throws(TraceError) -> Bool {
        var i = from
        while i < end {
            let t = tests[i]
            if t.holds(try context.readInteger(t.register)) != all { return !all }
            i += 1
        }
        return all
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

