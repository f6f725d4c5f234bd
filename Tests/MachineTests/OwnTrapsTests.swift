import ELF
import FlowTrace
import KVM
import Machine
import Testing
import TestSupport

/// The engines whose step-overs leave a guest's own single-stepping alone (all but step:
/// KVM's single step and the guest's TF are one flag; see docs/engines.md).
let ownTrapEngines: [BreakpointEngine] = workingEngines.filter { $0 != .step && $0 != .int3 }

@Suite("the guest's own #DB under our engines", .serialized, .enabled(if: !ownTrapEngines.isEmpty, "neither hlt nor hw works here"),
       .timeLimit(.minutes(3)))
struct OwnTrapsTests {
    /// own-step single-steps a region with its own TF and counts the traps (DR6.BS) in its
    /// #DB handler: 13 untraced. With every instruction of the region probed (hw: four at a
    /// time, the rest in later runs) the count stays 13 and every probe hits once.
    @Test(arguments: ownTrapEngines)
    func ownSingleStepsStayExact(_ engine: BreakpointEngine) throws {
        let path = try Guests.path("own-step")
        let untraced = try Machine(path: path).run(timeout: .seconds(30))
        #expect(untraced.ending == .exited(status: 0x42))
        #expect(untraced.console.map(\.text) == ["own-traps: 0 breakpoints, 13 single steps"])
        let all = try functionInstructions(path, "stepped_region")
        #expect(all.count == 17)   // 3 to set TF, 10 nops, 3 to clear it, ret
        // The int3 variant of this test runs where there is no objdump: it decodes instead.
        #expect(try decodedInstructions(path, "stepped_region") == all)
        #expect(try decodedInstructions(Guests.path("own-traps"), "stepped_region").count == 17)
        let groups = engine == .hw ? stride(from: 0, to: all.count, by: 4).map { Array(all[$0..<min($0 + 4, all.count)]) } : [all]
        for places in groups {
            for timing in [ProbeTiming.before, .after] {
                let m = try Machine(path: path, configuration: .init(engine: .engine(engine)))
                let module = try TraceModule(target: m)
                for a in places { try module.addProbe(Probe("p"), at: a, timing: timing) }
                try module.enable()
                let r = try m.run(timeout: .seconds(30))
                #expect(r.ending == .exited(status: 0x42), "\(engine) \(timing) at \(places.map { String($0, radix: 16) })")
                #expect(r.console == untraced.console, "\(engine) \(timing) at \(places.map { String($0, radix: 16) })")
                #expect(module.report().map(\.address) == places, "\(engine) \(timing)")
            }
        }
    }
}
