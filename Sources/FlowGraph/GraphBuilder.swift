/// Builds a `FlowGraph` in two passes: explore (decode every reachable instruction once,
/// collect block leaders, resolve jump tables once every path into them is known), then cut
/// the decoded instructions into blocks at the leaders.
struct GraphBuilder<Source: CodeSource> {
    let entry: UInt64
    let name: String
    let bounds: Range<UInt64>?
    let source: Source
    let options: FlowGraphOptions
    let decoder = X86Decoder()

    /// Decoded instructions by address.
    var instructions: [UInt64: Instruction] = [:]
    /// Addresses where decoding stopped, with the reason.
    var failures: [UInt64: String] = [:]
    /// Where blocks start.
    var leaders: Set<UInt64> = []
    /// For each branch target: the branches that go there.
    var branchesTo: [UInt64: [UInt64]] = [:]
    /// For each instruction end: the instruction that ends there and flows on into it.
    var flowsInto: [UInt64: UInt64] = [:]
    var indirectJumps: [UInt64] = []
    var tables: [UInt64: JumpTable] = [:]
    var unresolved: [UInt64: String] = [:]
    var work: [UInt64] = []

    init(entry: UInt64, name: String, bounds: Range<UInt64>?, source: Source, options: FlowGraphOptions) {
        self.entry = entry; self.name = name; self.bounds = bounds; self.source = source; self.options = options
    }

    func inBounds(_ a: UInt64) -> Bool { bounds?.contains(a) ?? true }

    mutating func explore() {
        leaders.insert(entry)
        work.append(entry)
        var tried: Set<UInt64> = []
        repeat {
            while let a = work.popLast() { walk(from: a) }
            // Jump tables last: by now every path into the jump is known, so the range check
            // before it can be found whichever way the compiler laid it out.
            for j in indirectJumps where !tried.contains(j) {
                tried.insert(j)
                switch resolveJumpTable(at: j) {
                case let .success(t):
                    tables[j] = t
                    for target in Set(t.targets) { addBranch(from: j, to: target) }
                case let .failure(reason):
                    unresolved[j] = reason.reason
                }
            }
        } while !work.isEmpty
    }

    private mutating func addBranch(from: UInt64, to target: UInt64) {
        branchesTo[target, default: []].append(from)
        guard inBounds(target) else { return }
        if leaders.insert(target).inserted { work.append(target) }
    }

    /// Decodes straight-line code from `start` until it ends, meets decoded code or fails.
    private mutating func walk(from start: UInt64) {
        var pc = start
        while instructions[pc] == nil, failures[pc] == nil {
            guard inBounds(pc) else {
                failures[pc] = "runs past the end of \(name) (\(hex(bounds!.lowerBound))-\(hex(bounds!.upperBound))) at \(hex(pc))"
                return
            }
            guard instructions.count < options.maxInstructions else {
                failures[pc] = "stopped at \(hex(pc)): more than \(options.maxInstructions) instructions"
                return
            }
            let bytes: [UInt8]
            switch source.code(at: pc, count: X86Decoder.maxLength) {
            case let .success(b): bytes = b
            case let .failure(e): failures[pc] = e.reason; return
            }
            let insn: Instruction
            switch decoder.decode(bytes, at: pc) {
            case let .success(i): insn = i
            case let .failure(e): failures[pc] = "cannot decode \(hexBytes(bytes.prefix(8))) at \(hex(pc)): \(e.reason)"; return
            }
            instructions[pc] = insn
            switch insn.flow {
            case .next:
                flowsInto[insn.end] = pc
                pc = insn.end
            case .call:
                // A call at the very end of the function does not come back (the compiler
                // put nothing after a call to a noreturn function): the block ends there.
                if let b = bounds, insn.end == b.upperBound { return }
                flowsInto[insn.end] = pc
                if options.splitAtCalls { leaders.insert(insn.end) }
                pc = insn.end
            case let .jump(t):
                addBranch(from: pc, to: t)
                return
            case let .conditionalJump(t):
                addBranch(from: pc, to: t)
                flowsInto[insn.end] = pc
                leaders.insert(insn.end)
                pc = insn.end
            case .indirectJump:
                indirectJumps.append(pc)
                return
            case .exit:
                return
            }
        }
    }

    // MARK: Blocks

    func graph() -> FlowGraph {
        let starts = leaders.filter { instructions[$0] != nil || failures[$0] != nil }.sorted()
        let index = Dictionary(uniqueKeysWithValues: starts.enumerated().map { ($1, $0) })
        var blocks: [BasicBlock] = []
        for (id, s) in starts.enumerated() {
            var list: [Instruction] = []
            var pc = s
            var end = BlockEnd.incomplete("nothing decoded")
            var succ: [Successor] = []
            func to(_ kind: Successor.Kind, _ t: UInt64, cases: [Int] = []) {
                succ.append(Successor(kind: kind, target: t, block: inBounds(t) ? index[t] : nil, cases: cases))
            }
            walk: while true {
                if pc != s, leaders.contains(pc) { end = .fallThrough; to(.fallThrough, pc); break }
                if let f = failures[pc] { end = .incomplete(f); break }
                guard let i = instructions[pc] else { end = .incomplete("not decoded at \(hex(pc))"); break }
                list.append(i)
                switch i.flow {
                case .next:
                    pc = i.end
                case .call:
                    if let b = bounds, i.end == b.upperBound { end = .exit; break walk }
                    if options.splitAtCalls { end = .call; to(.callReturn, i.end); break walk }
                    pc = i.end
                case let .jump(t):
                    end = .jump; to(.jump, t); break walk
                case let .conditionalJump(t):
                    end = .conditional; to(.taken, t); to(.notTaken, i.end); break walk
                case .indirectJump:
                    end = .indirect
                    if let t = tables[i.address] {
                        var order: [UInt64] = []
                        var cases: [UInt64: [Int]] = [:]
                        for (k, target) in t.targets.enumerated() {
                            if cases[target] == nil { order.append(target) }
                            cases[target, default: []].append(k)
                        }
                        for target in order { to(.table, target, cases: cases[target]!) }
                    }
                    break walk
                case .exit:
                    end = .exit; break walk
                }
            }
            blocks.append(BasicBlock(id: id, start: s, instructions: list, end: end, successors: succ,
                                     isEntry: s == entry, overlaps: nil))
        }
        return FlowGraph(name: name, entry: entry, bounds: bounds, options: options, blocks: markOverlaps(blocks),
                         jumpTables: tables.values.sorted { $0.jump < $1.jump },
                         unresolvedJumps: unresolved.sorted { $0.key < $1.key }.map { ($0.key, $0.value) })
    }

    /// Flags blocks whose instructions share bytes with another instruction of the graph.
    private func markOverlaps(_ blocks: [BasicBlock]) -> [BasicBlock] {
        var spans: [(start: UInt64, end: UInt64, block: Int)] = []
        for b in blocks { for i in b.instructions { spans.append((i.address, i.end, b.id)) } }
        spans.sort { $0.start < $1.start }
        var flagged: [Int: UInt64] = [:]
        var reach: (end: UInt64, address: UInt64, block: Int)?
        for s in spans {
            if let r = reach, s.start < r.end {
                if flagged[s.block] == nil { flagged[s.block] = r.address }
                if flagged[r.block] == nil { flagged[r.block] = s.start }
            }
            if reach == nil || s.end > reach!.end { reach = (s.end, s.start, s.block) }
        }
        guard !flagged.isEmpty else { return blocks }
        return blocks.map { b in
            guard let other = flagged[b.id] else { return b }
            return BasicBlock(id: b.id, start: b.start, instructions: b.instructions, end: b.end, successors: b.successors,
                              isEntry: b.isEntry, overlaps: other)
        }
    }
}

func hex(_ v: UInt64) -> String { "0x" + String(v, radix: 16) }

func hexBytes(_ b: some Sequence<UInt8>) -> String {
    b.map { ($0 < 16 ? "0" : "") + String($0, radix: 16) }.joined(separator: " ")
}
