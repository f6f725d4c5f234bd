import ELF
import NameSuggestions

/// How a basic block ends.
public enum BlockEnd: Sendable, Hashable {
    /// Its last instruction leaves the function: ret, iret, sysret, hlt, ud2, int3, or a
    /// call at the very end of the function (to a function that does not return).
    case exit
    /// It runs into the next block, which starts at a branch target.
    case fallThrough
    /// A direct unconditional jump (inside the graph, or out of it: a tail call).
    case jump
    /// A conditional branch: taken and not taken.
    case conditional
    /// A jump through a register or memory; its successors are a jump table's targets when
    /// the table was recognised, none otherwise.
    case indirect
    /// A call (only with `splitAtCalls`); the next block starts where it returns to.
    case call
    /// Decoding stopped before an instruction that ends a block; the reason says why.
    case incomplete(String)

    /// One word for it: exit, fall-through, jump, conditional, indirect, call, incomplete.
    public var kind: String {
        switch self {
        case .exit: "exit"
        case .fallThrough: "fall-through"
        case .jump: "jump"
        case .conditional: "conditional"
        case .indirect: "indirect"
        case .call: "call"
        case .incomplete: "incomplete"
        }
    }
}

/// An edge out of a block.
public struct Successor: Sendable, Hashable {
    public enum Kind: String, Sendable, Hashable {
        case fallThrough = "fall-through"
        case jump
        case taken
        case notTaken = "not-taken"
        /// A jump table entry; `cases` lists the table indexes that lead here.
        case table
        /// Where a call returns to (only with `splitAtCalls`).
        case callReturn = "return"
    }

    public let kind: Kind
    public let target: UInt64
    /// The block at `target`; nil when the target is outside the graph (a tail call, a jump
    /// out of the function's extent).
    public let block: Int?
    /// For `.table`: the table indexes whose entry is `target`.
    public let cases: [Int]
}

/// A straight run of instructions entered only at its first one.
public struct BasicBlock: Sendable, Hashable {
    /// Its index in `FlowGraph.blocks` (blocks are in address order).
    public let id: Int
    public let start: UInt64
    public let instructions: [Instruction]
    public let end: BlockEnd
    public let successors: [Successor]
    /// Whether the graph's entry address starts it.
    public let isEntry: Bool
    /// The address of an instruction elsewhere in the graph whose bytes overlap this block's
    /// (code that jumps into the middle of an instruction). Such a block is never probed.
    public let overlaps: UInt64?

    /// The first byte past its last instruction (`start` when it has none).
    public var endAddress: UInt64 { instructions.last?.end ?? start }
    public var isExit: Bool { end == .exit }
    public var isIncomplete: Bool { if case .incomplete = end { true } else { false } }
}

/// A jump table found behind an indirect jump.
public struct JumpTable: Sendable, Hashable {
    /// How many entries the table has, and how that was found out.
    public enum Bound: Sendable, Hashable {
        /// From the range check before the jump (`cmp INDEX, N` + `ja`) at this address.
        case compare(at: UInt64)
        /// No range check found: entries were read while their targets stayed inside the
        /// function and decoded.
        case scanned
    }

    /// The indirect jump.
    public let jump: UInt64
    /// The first entry.
    public let table: UInt64
    /// 4: 32-bit offsets from `table` (position-independent code); 8: absolute addresses.
    public let entrySize: Int
    /// The target of each entry, by index.
    public let targets: [UInt64]
    public let bound: Bound
}

/// Options for building a graph.
public struct FlowGraphOptions: Sendable, Hashable {
    /// End a block at every call (the next block starts where the call returns to).
    public var splitAtCalls = false
    /// Stop decoding after this many instructions (the rest is marked incomplete).
    public var maxInstructions = 65_536

    public init(splitAtCalls: Bool = false, maxInstructions: Int = 65_536) {
        self.splitAtCalls = splitAtCalls
        self.maxInstructions = maxInstructions
    }
}

/// Why a graph could not be built for a function.
public enum FlowGraphError: Error, Sendable, Equatable, CustomStringConvertible {
    case unknownFunction(String, path: String, suggestions: [String])
    case notCode(String, address: UInt64, reason: String)

    public var description: String {
        switch self {
        case let .unknownFunction(name, path, suggestions):
            let hint = suggestions.isEmpty ? "" : "; did you mean \(suggestions.map { "'\($0)'" }.joined(separator: ", "))?"
            return "no function '\(name)' in \(path)\(hint)"
        case let .notCode(name, address, reason):
            return "'\(name)' at 0x\(String(address, radix: 16)) is not code: \(reason)"
        }
    }
}

/// The control-flow graph of a function: its basic blocks, edges and jump tables.
///
/// Built by recursive traversal from the entry: every reachable instruction is decoded once;
/// blocks start at the entry, at branch targets, after conditional branches (and after calls
/// with `splitAtCalls`); jump tables behind indirect jumps are resolved. Targets outside the
/// function's extent are edges out of the graph and are not followed.
public struct FlowGraph: Sendable {
    /// The function's name (or the entry address in hex).
    public let name: String
    public let entry: UInt64
    /// The function's extent; nil when the graph follows direct jumps anywhere.
    public let bounds: Range<UInt64>?
    public let options: FlowGraphOptions
    /// In address order; `blocks[k].id == k`.
    public let blocks: [BasicBlock]
    /// The jump tables found, by jump address.
    public let jumpTables: [JumpTable]
    /// Indirect jumps whose targets were not found, with the reason.
    public let unresolvedJumps: [(jump: UInt64, reason: String)]

    /// The block with `address` among its instructions' bytes (or at its start).
    public func block(containing address: UInt64) -> BasicBlock? {
        blocks.first { $0.start == address || ($0.start <= address && address < $0.endAddress) }
    }

    /// The entry block.
    public var entryBlock: BasicBlock? { blocks.first { $0.isEntry } }

    /// Every edge, as (from block, successor).
    public var edges: [(from: Int, successor: Successor)] {
        blocks.flatMap { b in b.successors.map { (b.id, $0) } }
    }

    /// Instructions in the graph.
    public var instructionCount: Int { blocks.reduce(0) { $0 + $1.instructions.count } }
}

extension FlowGraph {
    /// The graph of the function `name` in `image`. The extent is the symbol's size; for a
    /// symbol without a size, up to the next symbol (or the segment's end).
    public static func build(function name: String, in image: ELFImage, options: FlowGraphOptions = .init()) throws(FlowGraphError) -> FlowGraph {
        let symbol: Symbol
        if let s = image.symbol(named: name), s.kind != .object {
            symbol = s
        } else {
            let code = image.symbols.filter { $0.kind != .object }.map(\.name)
            throw FlowGraphError.unknownFunction(name, path: image.path,
                                                 suggestions: closestNames(to: name, among: code, maxDistance: max(2, name.count / 2)))
        }
        return try build(entry: symbol.address, named: name, in: image, symbolSize: symbol.size, options: options)
    }

    /// The graph from `address` in `image`, bounded by the function symbol that contains it
    /// (or up to the next symbol).
    public static func build(address: UInt64, in image: ELFImage, options: FlowGraphOptions = .init()) throws(FlowGraphError) -> FlowGraph {
        let name = "0x\(String(address, radix: 16))"
        if let (s, off) = Symbolizer(image: image).locate(address), s.kind != .object {
            return try build(entry: address, named: off == 0 ? s.name : "\(s.name)+0x\(String(off, radix: 16))",
                             in: image, extentStart: s.address, symbolSize: s.size, options: options)
        }
        return try build(entry: address, named: name, in: image, symbolSize: 0, options: options)
    }

    private static func build(entry: UInt64, named name: String, in image: ELFImage, extentStart: UInt64? = nil, symbolSize: UInt64,
                              options: FlowGraphOptions) throws(FlowGraphError) -> FlowGraph {
        guard let segment = image.segments.first(where: { $0.range.contains(entry) }), segment.isExecutable else {
            throw FlowGraphError.notCode(name, address: entry, reason: "not in an executable segment of \(image.path)")
        }
        let start = extentStart ?? entry
        let end: UInt64
        if symbolSize > 0 {
            end = start + symbolSize
        } else {
            let next = image.symbols.first { $0.address > start }?.address ?? segment.range.upperBound
            end = min(next, segment.range.upperBound)
        }
        return build(entry: entry, name: name, bounds: start ..< end, source: ImageCodeSource(image: image), options: options)
    }

    /// The graph from `entry`, reading bytes from `source`. With `bounds`, targets outside it
    /// are edges out of the graph and straight-line code that leaves it is incomplete;
    /// without, direct jumps are followed anywhere (calls never are).
    public static func build(entry: UInt64, name: String? = nil, bounds: Range<UInt64>?, source: some CodeSource,
                             options: FlowGraphOptions = .init()) -> FlowGraph {
        var builder = GraphBuilder(entry: entry, name: name ?? "0x\(String(entry, radix: 16))", bounds: bounds, source: source, options: options)
        builder.explore()
        return builder.graph()
    }
}
