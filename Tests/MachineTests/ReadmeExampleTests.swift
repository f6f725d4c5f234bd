import FlowGraph
import FlowTrace
import FlowTraceGraphs
import Foundation
import KVM
import Machine
import Testing
import TestSupport

/// The README's library example, compiled and run here so it cannot rot. The lines between
/// the markers must equal the README's code block (the guest's path aside).
@Suite("README example", .enabled(if: KVMHost.isUsable(), kvmSkipReason))
struct ReadmeExampleTests {
    @Test func exampleRunsAndMatchesTheREADME() throws {
        // README-EXAMPLE-BEGIN
        let machine = try Machine(path: Guests.path("fib"))
        let module = try TraceModule(target: machine)
        let fib = try #require(machine.symbolizer.address(of: "fib"))
        try module.addProbe(Probe("fib entry", entries: [try .register(named: "rdi")]), at: fib)
        try module.enable()

        let result = try machine.run(timeout: .seconds(10))
        print(result.ending)  // guest exited with status 0
        let report = module.report()
        print(report.count)   // 1973
        for record in report.prefix(3) {
            print(record.sequence, machine.symbolizer.describe(record.address), record.values)
        }
        // 0 fib [FlowTrace.ProbeValue.register(0xf)]
        // 1 fib [FlowTrace.ProbeValue.register(0xe)]
        // 2 fib [FlowTrace.ProbeValue.register(0xd)]
        // README-EXAMPLE-END

        #expect(result.ending == .exited(status: 0))
        #expect(report.count == 1973)
        #expect(report.prefix(3).map(\.values) == [[.register(.u64(15))], [.register(.u64(14))], [.register(.u64(13))]])

        let source = try String(contentsOfFile: #filePath, encoding: .utf8)
        let readme = try String(contentsOf: Guests.root.appendingPathComponent("README.md"), encoding: .utf8)
        let example = try #require(block(source, from: "// README-EXAMPLE-BEGIN", to: "// README-EXAMPLE-END"))
            .replacingOccurrences(of: "try #require(machine.symbolizer.address(of: \"fib\"))",
                                  with: "machine.symbolizer.address(of: \"fib\")!")
            .replacingOccurrences(of: "Guests.path(\"fib\")", with: "\"guests/build/fib.elf\"")
        let documented = try #require(block(readme, from: "```swift", to: "```"))
        #expect(documented == "import FlowTrace\nimport Machine\n\n" + example)
    }

    @Test func flowGraphExampleRunsAndMatchesTheREADME() throws {
        let machine = try Machine(path: Guests.path("fib"))
        let module = try TraceModule(target: machine)
        // README-FLOW-BEGIN
        let graph = try FlowGraph.build(function: "fib", in: machine.image)
        try module.addFlowGraph(graph, entry: Probe("entry", entries: [try .register(named: "rdi")]),
                                regular: Probe("block"), exit: Probe("exit", entries: [try .register(named: "rax")]))
        // README-FLOW-END
        try module.enable()
        #expect(try machine.run(timeout: .seconds(10)).ending == .exited(status: 0))
        let report = module.report()
        #expect(report.filter { $0.probe.description == "entry" }.count == 1973)
        #expect(report.filter { $0.probe.description == "exit" }.count == 1973)

        let source = try String(contentsOfFile: #filePath, encoding: .utf8)
        let readme = try String(contentsOf: Guests.root.appendingPathComponent("README.md"), encoding: .utf8)
        let example = try #require(block(source, from: "// README-FLOW-BEGIN", to: "// README-FLOW-END"))
        let documented = try #require(block(readme, from: "```swift", to: "```", occurrence: 2))
        #expect(documented == "import FlowGraph\nimport FlowTraceGraphs\n\n" + example)
    }

    /// The lines strictly between the `occurrence`th `from` line and the next `to`, de-indented.
    func block(_ text: String, from: String, to: String, occurrence: Int = 1) -> String? {
        let lines = text.split(separator: "\n", omittingEmptySubsequences: false)
        let starts = lines.indices.filter { lines[$0].trimmingCharacters(in: .whitespaces) == from }
        guard starts.count >= occurrence else { return nil }
        let start = starts[occurrence - 1]
        guard let end = lines[(start + 1)...].firstIndex(where: { $0.trimmingCharacters(in: .whitespaces) == to }) else { return nil }
        let body = lines[(start + 1)..<end]
        let indent = body.filter { !$0.isEmpty }.map { $0.prefix { $0 == " " }.count }.min() ?? 0
        return body.map { $0.isEmpty ? "" : String($0.dropFirst(indent)) }.joined(separator: "\n")
    }
}
