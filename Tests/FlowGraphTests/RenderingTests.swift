import ELF
import FlowGraph
import Foundation
import Testing
import TestSupport

private let dotPath: String? = ["/usr/bin/dot", "/usr/local/bin/dot"].first { FileManager.default.isExecutableFile(atPath: $0) }

/// DOT statements as the renderer writes them: one per line.
struct DOTGraph {
    var nodes: [String: String] = [:]  // id -> attributes
    var edges: [(from: String, to: String, attributes: String)] = []

    /// A strict reading of the renderer's output: a digraph header, one statement per line
    /// ending in `;`, every quoted string closed, every edge between declared nodes.
    init(_ text: String) throws {
        var lines = text.split(separator: "\n").map(String.init)
        guard lines.first?.hasPrefix("digraph \"") == true, lines.first?.hasSuffix(" {") == true, lines.last == "}" else {
            throw ParseFailure("not a digraph block")
        }
        lines.removeFirst(); lines.removeLast()
        for line in lines {
            // Quotes balance once escaped ones are dropped.
            let unescaped = line.replacingOccurrences(of: "\\\\", with: "").replacingOccurrences(of: "\\\"", with: "")
            guard unescaped.filter({ $0 == "\"" }).count % 2 == 0, line.hasSuffix(";") else { throw ParseFailure("bad statement: \(line)") }
            let body = line.trimmingCharacters(in: .whitespaces)
            if body.hasPrefix("graph ") || body.hasPrefix("node ") || body.hasPrefix("edge ") { continue }
            let head = body.prefix { $0 != " " && $0 != ";" }
            let rest = body.dropFirst(head.count).trimmingCharacters(in: .whitespaces)
            if rest.hasPrefix("->") {
                let to = rest.dropFirst(2).trimmingCharacters(in: .whitespaces).prefix { $0 != " " && $0 != ";" }
                edges.append((String(head), String(to), rest))
            } else {
                guard nodes[String(head)] == nil else { throw ParseFailure("node \(head) declared twice") }
                nodes[String(head)] = rest
            }
        }
        for e in edges where nodes[e.from] == nil || nodes[e.to] == nil {
            throw ParseFailure("edge \(e.from) -> \(e.to) names an undeclared node")
        }
    }
}

struct ParseFailure: Error, CustomStringConvertible {
    var description: String
    init(_ d: String) { description = d }
}

@Suite struct RenderingTests {
    let image: ELFImage
    let graph: FlowGraph
    let symbols: Symbolizer

    init() throws {
        image = try ELFImage(path: try Guests.path("switch"))
        graph = try FlowGraph.build(function: "dispatch", in: image)
        symbols = Symbolizer(image: image)
    }

    func describe(_ a: UInt64) -> String? { symbols.describe(a) }

    @Test func dotHasOneNodePerBlockAndOneEdgePerSuccessor() throws {
        let dot = try DOTGraph(graph.dot(describe: describe))
        let blocks = dot.nodes.keys.filter { $0.hasPrefix("b") }
        #expect(blocks.count == graph.blocks.count)
        // finish(), the tail call's target, is the one node outside the graph.
        #expect(dot.nodes.count == graph.blocks.count + 1)
        #expect(dot.nodes.first { !$0.key.hasPrefix("b") }?.value.contains("label=\"finish\"") == true)
        #expect(dot.edges.count == graph.edges.count)
        for (from, s) in graph.edges {
            #expect(dot.edges.contains { $0.from == "b\(from)" && $0.to == (s.block.map { "b\($0)" } ?? "x\(String(s.target, radix: 16))") })
        }
        // Each block's label lists its instructions.
        for b in graph.blocks {
            let label = try #require(dot.nodes["b\(b.id)"])
            for i in b.instructions { #expect(label.contains(i.text)) }
        }
        #expect(dot.nodes["b0"]?.contains("peripheries=2") == true)
    }

    @Test func heatFillsBlocksByTheirCounts() throws {
        // Counts as records at each block's probe address would give them.
        var counts: [UInt64: UInt64] = [:]
        for (k, b) in graph.blocks.enumerated() where k % 3 != 0 { counts[b.start] = UInt64(k * 10) }
        // An exit probe after the last instruction and an entry probe in the same block
        // count once (the larger), not twice.
        if let last = graph.blocks[1].instructions.last { counts[last.address] = 7 }
        let hits = graph.blockHits(fromAddressCounts: counts)
        #expect(hits[1] == 10)
        #expect(hits[0] == nil)
        let dot = try DOTGraph(graph.dot(describe: describe, hits: hits))
        let hottest = try #require(hits.max { $0.value < $1.value }).key
        for b in graph.blocks {
            let node = try #require(dot.nodes["b\(b.id)"])
            #expect(node.contains("hits \(hits[b.id] ?? 0)\\l"))
            #expect(node.contains("fillcolor=\"#") && node.contains("style=filled"))
            if hits[b.id] == nil { #expect(node.contains("fillcolor=\"#e0e0e0\"")) }
            if b.id == hottest { #expect(node.contains("fillcolor=\"#ff140a\"")) }
        }
    }

    @Test func textListsBlocksInstructionsAndEdges() throws {
        let text = graph.text(describe: describe)
        let lines = text.split(separator: "\n").map(String.init)
        #expect(lines[0].hasPrefix("dispatch: 0x\(String(graph.entry, radix: 16))-"))
        #expect(lines[0].contains("\(graph.blocks.count) blocks, \(graph.instructionCount) instructions, \(graph.edges.count) edges"))
        #expect(lines[1].hasPrefix("jump table for the jump at 0x\(String(graph.jumpTables[0].jump, radix: 16)): 8 entries of 4 bytes"))
        #expect(lines.filter { $0.hasPrefix("block ") }.count == graph.blocks.count)
        #expect(text.contains("  ; case0_hits"))
        #expect(text.contains("finish (outside) (jump)"))
    }

    @Test(.enabled(if: dotPath != nil, "Graphviz's dot is not installed (apt-get install graphviz)"))
    func graphvizRendersTheDOT() throws {
        let file = try temporaryFile(Array(graph.dot(describe: describe, hits: [0: 5, 1: 2]).utf8), name: "dispatch.dot")
        let r = try run(dotPath!, ["-Tsvg", file])
        #expect(r.status == 0, "\(r.stderr)")
        #expect(r.stderr.isEmpty, "\(r.stderr)")
        #expect(r.stdout.contains("<svg"))
        #expect(r.stdout.components(separatedBy: "class=\"node\"").count - 1 == graph.blocks.count + 1)
    }
}
