/// Jump-table recognition for indirect jumps, in the two forms compilers emit for dense
/// `switch` statements:
///
/// - position-independent: `lea B, [rip+T]` ; `movsxd X, dword [B+I*4]` ; `add X, B` ;
///   `jmp X` (either add operand may be the jump register), entries are 32-bit offsets from T;
/// - absolute: `jmp qword [T+I*8]` (or `[B+I*8]` after `lea B, [rip+T]`), entries are addresses.
///
/// The entry count comes from the range check on the index before the jump
/// (`cmp I, N` + `ja`/`jae`/`jbe`/`jb`, following register copies); without one, entries are
/// read while their targets stay inside the function and decode.
extension GraphBuilder {
    /// Most instructions looked at before a jump.
    static var historyLimit: Int { 32 }
    static var maxEntries: Int { 4096 }

    func resolveJumpTable(at j: UInt64) -> Result<JumpTable, TableFailure> {
        guard let jump = instructions[j] else { return .failure(TableFailure("not decoded")) }
        let history = self.history(before: j)
        var table: UInt64
        let entrySize: Int
        let index: Register
        var matchedUpTo = 0

        switch jump.operands.first {
        case let .register(target)? where target.width == 64:
            guard let (addAt, add) = lastWriter(of: target, in: history, from: 0), add.mnemonic == "add",
                  add.operands.count == 2, case let .register(a) = add.operands[0], case let .register(b) = add.operands[1] else {
                return .failure(TableFailure("jmp \(jump.text.split(separator: " ").last ?? ""): no `add` of a table base before it"))
            }
            guard let (wa, writerA) = lastWriter(of: a, in: history, from: addAt + 1),
                  let (wb, writerB) = lastWriter(of: b, in: history, from: addAt + 1) else {
                return .failure(TableFailure("no `lea`/`movsxd` pair before `\(add.text)`"))
            }
            let (load, lea) = writerA.mnemonic == "movsxd" ? (writerA, writerB) : (writerB, writerA)
            guard load.mnemonic == "movsxd", lea.mnemonic == "lea",
                  case let .register(base)? = lea.operands.first, lea.operands.count == 2,
                  case let .memory(leaMemory) = lea.operands[1], let t = leaMemory.absolute,
                  load.operands.count == 2, case let .memory(m) = load.operands[1],
                  m.size == 32, m.scale == 4, m.displacement == 0, m.base?.family == base.family, let i = m.index else {
                return .failure(TableFailure("`\(add.text)` does not add a `lea [rip+...]` table base to a `movsxd` entry"))
            }
            table = t; entrySize = 4; index = i; matchedUpTo = max(wa, wb)

        case let .memory(m)? where m.size == 64 && m.scale == 8 && m.index != nil:
            index = m.index!
            entrySize = 8
            if let base = m.base {
                guard let (w, lea) = lastWriter(of: base, in: history, from: 0), lea.mnemonic == "lea", lea.operands.count == 2,
                      case let .memory(lm) = lea.operands[1], let t = lm.absolute else {
                    return .failure(TableFailure("`\(jump.text)`: the base register is not set by a `lea [rip+...]` before it"))
                }
                table = t &+ UInt64(bitPattern: m.displacement); matchedUpTo = w
            } else {
                table = UInt64(bitPattern: m.displacement)
            }

        default:
            return .failure(TableFailure("`\(jump.text)` is not a jump-table form this tool knows"))
        }

        if let (count, compare) = rangeCheck(on: index, in: history, from: matchedUpTo) {
            var targets: [UInt64] = []
            for k in 0..<count {
                switch entry(k, of: table, size: entrySize) {
                case let .success(t): targets.append(t)
                case let .failure(e): return .failure(TableFailure("jump table at \(hex(table)), entry \(k) of \(count): \(e.reason)"))
                }
            }
            return .success(JumpTable(jump: j, table: table, entrySize: entrySize, targets: targets, bound: .compare(at: compare)))
        }
        // No range check: read entries while they land on decodable code inside the function.
        guard bounds != nil else {
            return .failure(TableFailure("jump table at \(hex(table)): no range check (cmp + ja) before the jump, and no function extent to scan against"))
        }
        var targets: [UInt64] = []
        while targets.count < Self.maxEntries, case let .success(t) = entry(targets.count, of: table, size: entrySize), inBounds(t),
              instructions[t] != nil || isDecodable(t) {
            targets.append(t)
        }
        guard !targets.isEmpty else { return .failure(TableFailure("jump table at \(hex(table)): no range check before the jump and no entry inside \(name)")) }
        return .success(JumpTable(jump: j, table: table, entrySize: entrySize, targets: targets, bound: .scanned))
    }

    private func entry(_ k: Int, of table: UInt64, size: Int) -> Result<UInt64, CodeSourceError> {
        source.data(at: table &+ UInt64(k * size), count: size).map { b in
            if size == 4 {
                let v = Int32(bitPattern: UInt32(b[0]) | UInt32(b[1]) << 8 | UInt32(b[2]) << 16 | UInt32(b[3]) << 24)
                return table &+ UInt64(bitPattern: Int64(v))
            }
            return b.enumerated().reduce(UInt64(0)) { $0 | UInt64($1.element) << (8 * UInt64($1.offset)) }
        }
    }

    private func isDecodable(_ a: UInt64) -> Bool {
        guard case let .success(b) = source.code(at: a, count: X86Decoder.maxLength), case .success = decoder.decode(b, at: a) else { return false }
        return true
    }

    /// The instructions that run before `address`, nearest first: the one that flows into
    /// it, else a branch to it, and so on back.
    private func history(before address: UInt64) -> [Instruction] {
        var out: [Instruction] = []
        var seen: Set<UInt64> = [address]
        var a = address
        while out.count < Self.historyLimit {
            guard let p = flowsInto[a] ?? branchesTo[a]?.first, seen.insert(p).inserted, let i = instructions[p] else { break }
            out.append(i)
            a = p
        }
        return out
    }

    /// The nearest instruction in `history[from...]` whose destination is `register`'s family.
    private func lastWriter(of register: Register, in history: [Instruction], from: Int) -> (Int, Instruction)? {
        guard from < history.count else { return nil }
        for k in from..<history.count {
            let i = history[k]
            guard case let .register(r)? = i.operands.first, r.family == register.family else { continue }
            if ["cmp", "test", "push", "bt"].contains(i.mnemonic) { continue }
            return (k, i)
        }
        return nil
    }

    /// `cmp I, N` + an unsigned branch on the index (or a register it was copied from):
    /// the entry count and the compare's address.
    private func rangeCheck(on index: Register, in history: [Instruction], from: Int) -> (Int, UInt64)? {
        var aliases: Set<UInt32> = [index.family]
        var k = from
        while k < history.count {
            let i = history[k]
            if ["jnbe", "jnb", "jbe", "jb"].contains(i.mnemonic), k + 1 < history.count {
                let c = history[k + 1]
                if c.mnemonic == "cmp", c.operands.count == 2, case let .register(r) = c.operands[0], aliases.contains(r.family),
                   case let .immediate(n) = c.operands[1], n >= 0 {
                    let count = (i.mnemonic == "jnbe" || i.mnemonic == "jbe") ? Int(n) + 1 : Int(n)
                    return count >= 1 && count <= Self.maxEntries ? (count, c.address) : nil
                }
            }
            if ["mov", "movzx", "movsxd"].contains(i.mnemonic), i.operands.count == 2,
               case let .register(d) = i.operands[0], aliases.contains(d.family), case let .register(s) = i.operands[1] {
                aliases.insert(s.family)
            }
            k += 1
        }
        return nil
    }
}

/// Why an indirect jump's table was not found.
struct TableFailure: Error {
    let reason: String
    init(_ reason: String) { self.reason = reason }
}
