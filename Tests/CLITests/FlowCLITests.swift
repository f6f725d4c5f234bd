import ELF
import FlowGraph
import Foundation
import KVM
import Testing
import TestSupport

private let kvmUsable = KVMHost.isUsable()
private let dotPath: String? = ["/usr/bin/dot", "/usr/local/bin/dot"].first { FileManager.default.isExecutableFile(atPath: $0) }

/// fib's return values in return order (post-order of the calls).
private func fibReturns(_ n: UInt64) -> [UInt64] {
    var out: [UInt64] = []
    func fib(_ n: UInt64) -> UInt64 {
        let r = n < 2 ? n : fib(n - 1) + fib(n - 2)
        out.append(r)
        return r
    }
    _ = fib(n)
    return out
}

/// `block N  0x...  KINDS  (hits H)` lines of `flowtrace graph --heat`: block -> hits.
private func heatOfTextGraph(_ text: String) -> [Int: UInt64] {
    var out: [Int: UInt64] = [:]
    for line in text.split(separator: "\n") where line.hasPrefix("block ") {
        let id = Int(line.split(separator: " ")[1])!
        let h = line.range(of: "(hits ").map { line[$0.upperBound...].prefix { $0.isNumber } }
        out[id] = h.flatMap { UInt64($0) }
    }
    return out
}

@Suite("flowtrace graph and run --flow", .serialized, .timeLimit(.minutes(3)))
struct FlowCLITests {
    @Test func graphPrintsBlocksInstructionsAndEdges() throws {
        let path = try Guests.path("switch")
        let r = try flowtrace("graph", path, "dispatch")
        #expect(r.status == 0, "\(r.stderr)")
        #expect(r.stderr.isEmpty)
        let g = try FlowGraph.build(function: "dispatch", in: try ELFImage(path: path))
        let lines = r.stdout.split(separator: "\n").map(String.init)
        #expect(lines.first == "dispatch: 0x\(String(g.bounds!.lowerBound, radix: 16))-0x\(String(g.bounds!.upperBound, radix: 16)), "
                + "\(g.blocks.count) blocks, \(g.instructionCount) instructions, \(g.edges.count) edges")
        #expect(lines.filter { $0.hasPrefix("block ") }.count == g.blocks.count)
        #expect(lines.contains { $0.hasPrefix("jump table for the jump at ") && $0.contains("8 entries of 4 bytes") })
        // Instruction lines: address, bytes, Intel syntax; the table's jump among them.
        #expect(lines.contains { $0.hasPrefix("  0x\(String(g.jumpTables[0].jump, radix: 16))  ff e") && $0.hasSuffix("jmp rdx") })
        #expect(lines.contains { $0.contains("finish (outside) (jump)") })
        // An address inside the function works too.
        let inside = try flowtrace("graph", path, "0x\(String(g.blocks[3].start, radix: 16))")
        #expect(inside.status == 0)
        #expect(inside.stdout.hasPrefix("dispatch+0x\(String(g.blocks[3].start - g.entry, radix: 16)): "))
    }

    @Test func graphToAFileAndAsDOT() throws {
        let path = try Guests.path("fib")
        let out = try temporaryFile([], name: "fib.dot")
        let r = try flowtrace("graph", path, "fib", "--format", "dot", "-o", out)
        #expect(r.status == 0 && r.stdout.isEmpty && r.stderr.isEmpty, "\(r.stderr)")
        let dot = try String(contentsOfFile: out, encoding: .utf8)
        #expect(dot.hasPrefix("digraph \"fib\" {\n"))
        #expect(dot.components(separatedBy: "[label=\"block ").count - 1 == 3)
        #expect(dot.contains("b0 -> b2 [label=\"taken\" color=darkgreen];"))
        #expect(dot.contains("b0 -> b1 [label=\"not taken\" color=red];"))
        if let dotPath {
            let svg = try run(dotPath, ["-Tsvg", out])
            #expect(svg.status == 0 && svg.stderr.isEmpty && svg.stdout.contains("<svg"), "\(svg.stderr)")
        }
    }

    @Test func graphAsJSON() throws {
        let path = try Guests.path("switch")
        let g = try FlowGraph.build(function: "dispatch", in: try ELFImage(path: path))
        let r = try flowtrace("graph", path, "dispatch", "--format", "json")
        #expect(r.status == 0 && r.stderr.isEmpty, "\(r.stderr)")
        let o = try #require(try JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [String: Any])
        #expect(o["function"] as? String == "dispatch")
        let blocks = try #require(o["blocks"] as? [[String: Any]])
        #expect(blocks.map { hexValue($0["start"]) } == g.blocks.map(\.start))
        #expect(blocks.map { $0["kind"] as? String } == g.blocks.map(\.end.kind))
        #expect(blocks.map { ($0["instructions"] as? [[String: Any]])?.count } == g.blocks.map(\.instructions.count))
        for (b, json) in zip(g.blocks, blocks) {
            let successors = try #require(json["successors"] as? [[String: Any]])
            #expect(successors.map { hexValue($0["target"]) } == b.successors.map(\.target))
            #expect(successors.map { $0["block"] as? Int } == b.successors.map(\.block))
        }
        let tables = try #require(o["jump_tables"] as? [[String: Any]])
        #expect((tables.first?["targets"] as? [String])?.map { hexValue($0) } == g.jumpTables[0].targets)
        #expect(tables.first?["bound"] as? String == "compare")
    }

    /// A kernel's function, read from the vmlinux inside a bzImage (its compressed payload):
    /// the same graph as from that vmlinux itself, text and JSON.
    @Test func graphOfAKernelFunctionInsideABzImage() throws {
        let (bzImage, _) = try ELFFuzzTests.bzImageWithPayload()
        let packed = try temporaryFile(bzImage, name: "graph.bzimage")
        let vmlinux = try Guests.kernelPath("vmlinux.elf")
        for format in ["text", "json"] {
            let fromPayload = try flowtrace("graph", packed, "kernel_main", "--format", format)
            let direct = try flowtrace("graph", vmlinux, "kernel_main", "--format", format)
            #expect(fromPayload.status == 0, "\(fromPayload.stderr)")
            #expect(direct.status == 0, "\(direct.stderr)")
            #expect(!direct.stdout.isEmpty)
            #expect(fromPayload.stdout == direct.stdout)
        }
        expectOneLineError(try flowtrace("graph", packed, "no_such_function"), "no function 'no_such_function'", "xz payload")
        // A symbol file is for kernels without symbols of their own.
        let map = try temporaryFile(Array("0000000000100000 T elsewhere\n".utf8), name: "System.map")
        let kept = try flowtrace("graph", packed, "kernel_main", "--symbol-file", map)
        #expect(kept.status == 0 && kept.stderr == "flowtrace: --symbol-file \(map) not used: \(packed) has its own .symtab\n", "\(kept.stderr)")
        let fib = try Guests.path("fib")
        let plain = try flowtrace("graph", fib, "fib", "--symbol-file", map)
        #expect(plain.status == 0 && plain.stderr == "flowtrace: --symbol-file \(map) not used: \(fib) is not a Linux kernel\n", "\(plain.stderr)")
    }

    @Test func graphBadInput() throws {
        let fib = try Guests.path("fib")
        expectOneLineError(try flowtrace("graph", fib, "fbi"), "no function 'fbi' in", "did you mean 'fib'")
        expectOneLineError(try flowtrace("graph", fib, "fib_calls"), "no function 'fib_calls'")
        expectOneLineError(try flowtrace("graph", "/nonexistent.elf", "fib"), "/nonexistent.elf")
        expectOneLineError(try flowtrace("graph", fib, "0x10"), "'0x10' at 0x10 is not code", "not in an executable segment")
        expectOneLineError(try flowtrace("graph", fib, "fib", "--heat", "/nonexistent.jsonl"), "--heat /nonexistent.jsonl", "no such file")
        let junk = try temporaryFile(Array("{\"seq\":0,\"addr\":\"0x1000a5\"}\nnot json\n".utf8), name: "junk.jsonl")
        expectOneLineError(try flowtrace("graph", fib, "fib", "--heat", junk), "junk.jsonl line 2: not a JSON object")
        let noAddr = try temporaryFile(Array("{\"seq\":0}\n".utf8), name: "noaddr.jsonl")
        expectOneLineError(try flowtrace("graph", fib, "fib", "--heat", noAddr), "noaddr.jsonl line 1: no \"addr\" field")
        let r = try flowtrace("graph", fib, "fib", "--format", "svg")
        #expect(r.status == 64 && r.stderr.contains("svg") && r.stdout.isEmpty)
        expectOneLineError(try flowtrace("graph", fib, "fib", "-o", "/nonexistent-dir/x.dot"), "-o cannot write '/nonexistent-dir/x.dot'")
    }

    @Test func flowBadInputFailsBeforeTheGuestRuns() throws {
        let fib = try Guests.path("fib")
        expectOneLineError(try flowtrace("run", fib, "--flow", "fbi"), "--flow 'fbi': no function 'fbi'", "did you mean 'fib'")
        expectOneLineError(try flowtrace("run", fib, "--flow", "fib:rdq"), "--flow 'fib:rdq': unknown register 'rdq'")
        expectOneLineError(try flowtrace("run", fib, "--flow", ":rdi"), "--flow ':rdi': expected a function name")
        expectOneLineError(try flowtrace("run", fib, "--flow-exit", "rax"), "--flow-exit needs --flow")
        expectOneLineError(try flowtrace("run", fib, "--split-calls"), "--split-calls needs --flow")
        expectOneLineError(try flowtrace("run", fib, "--flow", "fib", "--probe", "fib:rdi"),
                           "--flow 'fib': block 0 at 0x", "already has --probe 'fib:rdi'; one probe per address")
        expectOneLineError(try flowtrace("run", fib, "--flow", "fib", "--flow", "fib"), "--flow 'fib': block 0", "already has --flow 'fib' (block 0)")
    }

    @Test(.enabled(if: kvmUsable, "needs a usable /dev/kvm (engines are checked against the host)"))
    func flowWithMoreBlocksThanHardwareBreakpoints() throws {
        // fib's 3 blocks and guest_main's: more than hw's 4 breakpoints.
        expectOneLineError(try flowtrace("run", Guests.path("fib"), "--flow", "fib", "--engine", "hw", "--flow", "guest_main"),
                           "--engine hw arms at most 4 locations")
    }

    @Test(.enabled(if: kvmUsable, kvmSkipReason))
    func flowSaysWhenTheEntryBlockIsALoopHead() throws {
        let r = try flowtrace("run", Guests.path("shapes"), "--flow", "shape_entry_loop", "--flow", "shape_loop")
        #expect(r.status == 0, "\(r.stderr)")
        #expect(r.stderr.contains("flowtrace: --flow shape_entry_loop: 2 blocks (2 probed), entered 0 times, left through exit blocks 0 times (the entry block is also a loop head: its hits count the iterations too)\n"))
        #expect(r.stderr.contains("flowtrace: --flow shape_loop: 3 blocks (3 probed), entered 0 times, left through exit blocks 0 times\n"))
    }

    @Test func probeInsideAnInstructionIsRefused() throws {
        let fib = try Guests.path("fib")
        // fib starts with a 7-byte mov (objdump: 48 8b 05 54 1f 00 00).
        expectOneLineError(try flowtrace("run", fib, "--probe", "fib+3:rdi"),
                           "--probe 'fib+3:rdi': 0x", "is inside the instruction at fib (mov rax, [rip+0x1f54], 7 bytes); probe fib or fib+0x7")
    }

    @Test(.enabled(if: kvmUsable, kvmSkipReason))
    func flowFibEntriesAreCallsAndExitsAreReturns() throws {
        let r = try flowtrace("run", Guests.path("fib"), "--flow", "fib:rdi", "--flow-exit", "rax", "--format", "jsonl")
        #expect(r.status == 0, "\(r.stderr)")
        let records = try parseJSONLines(r.stdout)
        let entries = records.filter { $0["when"] as? String == "before" }
        let exits = records.filter { $0["when"] as? String == "after" }
        #expect(entries.map { hexValue(($0["values"] as? [String: Any])?["rdi"]) } == fibArguments)
        #expect(exits.map { hexValue(($0["values"] as? [String: Any])?["rax"]) } == fibReturns(15))
        #expect(entries.allSatisfy { $0["location"] as? String == "fib+0x0" })
        #expect(r.stderr.contains("flowtrace: --flow fib: 3 blocks (3 probed), entered 1973 times, left through exit blocks 1973 times"))
        #expect(r.stderr.contains("  LOCATION  BLOCK    WHEN    HITS  TAKEN  SUPPRESSED"))
    }

    @Test(.enabled(if: kvmUsable, kvmSkipReason))
    func flowSwitchHeatMatchesTheGuestsCounts() throws {
        let path = try Guests.path("switch")
        let trace = try temporaryFile([], name: "switch.jsonl")
        let r = try flowtrace("run", path, "--flow", "dispatch", "-o", trace)
        #expect(r.status == 0, "\(r.stderr)")
        let ops = (0..<240).map { i in (5 * i + i / 3) % 10 }
        let perCase = (0..<8).map { k in UInt64(ops.filter { $0 == k }.count) }
        #expect(r.stdout.hasPrefix("switch: calls 240 cases \(perCase.map(String.init).joined(separator: " ")) default \(ops.filter { $0 >= 8 }.count) "))
        #expect(r.stderr.contains("flowtrace: --flow dispatch: 21 blocks (21 probed), entered 240 times, left through exit blocks \(240 - perCase[7]) times"))

        let g = try FlowGraph.build(function: "dispatch", in: try ELFImage(path: path))
        let text = try flowtrace("graph", path, "dispatch", "--heat", trace)
        #expect(text.status == 0, "\(text.stderr)")
        let heat = heatOfTextGraph(text.stdout)
        #expect(heat.count == g.blocks.count)
        #expect(heat[0] == 240)
        for (k, target) in g.jumpTables[0].targets.enumerated() {
            #expect(heat[try #require(g.blocks.first { $0.start == target }).id] == perCase[k], "case \(k)")
        }
        // The same counts colour the DOT output.
        let dot = try flowtrace("graph", path, "dispatch", "--heat", trace, "--format", "dot")
        #expect(dot.status == 0)
        #expect(dot.stdout.contains("b0 [label=\"block 0  0x\(String(g.entry, radix: 16))  entry, conditional\\lhits 240\\l"))
        #expect(dot.stdout.components(separatedBy: "style=filled").count - 1 == g.blocks.count)
        // Records of another function: said so, and every block shows 0.
        let other = try flowtrace("graph", path, "finish", "--heat", trace)
        #expect(other.status == 0)
        #expect(other.stderr == "flowtrace: warning: --heat \(trace): none of its 1389 records is at an address of finish; every block shows 0 "
                + "(trace it with: flowtrace run \(path) --flow finish)\n")
        #expect(heatOfTextGraph(other.stdout) == [0: 0])
    }
}
