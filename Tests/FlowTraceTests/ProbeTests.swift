@testable import FlowTrace
import FlowTraceSimulation
import Testing

@Suite("probes and entries")
struct ProbeTests {
    @Test func unknownRegisterFailsAtCreationWithSuggestions() {
        #expect { _ = try ProbeEntry.register(named: "rdx2") } throws: { e in
            guard case let .unknownRegister(name, suggestions) = e as? TraceError else { return false }
            return name == "rdx2" && suggestions.first == "rdx"
        }
    }

    @Test func registerNamesResolveToTheirWidths() throws {
        #expect(try X86Register.resolve("RDI").width == .u64)
        #expect(try X86Register.resolve("eax").width == .u32)
        #expect(try X86Register.resolve("r9w").width == .u16)
        #expect(try X86Register.resolve("ah").shift == 8)
        #expect(try X86Register.resolve("xmm15").width == .u128)
        #expect(try X86Register.resolve("gdtr").width == .descriptorTable)
        #expect(try X86Register.resolve("fs_base").storage == .segmentBase(4))
        #expect(throws: TraceError.self) { try X86Register.resolve("xmm16") }
        do {
            _ = try X86Register.resolve("rsx")
            Issue.record("rsx resolved")
            return
        } catch {
            guard case let .unknownRegister(name, suggestions) = error else { Issue.record("\(error)"); return }
            #expect(name == "rsx")
            // Every name one edit away, closest and then alphabetical first.
            #expect(suggestions == ["rax", "rbx", "rcx"])
            #expect(error.description.hasPrefix("unknown register 'rsx' (did you mean"))
        }
    }

    @Test func memorySizesAndScalesAreChecked() throws {
        #expect(throws: TraceError.invalidMemorySize(0)) { try ProbeEntry.memory(at: 0x1000, size: 0) }
        #expect(throws: TraceError.invalidMemorySize(4097)) { try ProbeEntry.memory(at: 0x1000, size: 4097) }
        #expect(throws: TraceError.invalidScale(3)) { try MemoryOperand(base: .register(X86Register.resolve("rdi")), scale: 3) }
        let op = try MemoryOperand(base: .register(X86Register.resolve("rdi")), index: X86Register.resolve("rsi"), scale: 8, displacement: 16)
        #expect(try ProbeEntry.memory(op, size: 8).description == "[rdi+rsi*8+16]:8")
        #expect(try ProbeEntry.memory(at: 0x2000, size: 16).description == "[0x2000]:16")
        let neg = try MemoryOperand(base: .register(X86Register.resolve("rsp")), displacement: -8)
        #expect(neg.description == "rsp-8")
    }

    /// Defect 9: a refused add must leave the probe's entries exactly as they were.
    @Test func addingEntriesToAProbeInUseThrowsAndChangesNothing() throws {
        let target = InMemoryTarget(registers: [.general(7): 5])
        let probe = Probe("args", entries: [try .register(named: "rdi")])
        let module = try TraceModule(target: target)
        try module.addProbe(probe, at: 0x100)
        #expect(probe.isInUse)
        #expect(throws: TraceError.probeInUse("args")) { try probe.add(.register(named: "rsi")) }
        #expect(probe.entries.map(\.description) == ["rdi"])
        try module.enable()
        target.fire(at: 0x100, vcpu: 0)
        #expect(module.report().first?.values == [.register(.u64(5))])
    }
}

/// Conditions made only of register-constant comparisons run as range tests: they must
/// answer exactly as the general program does, at the edges (0, the constant, max) too.
@Suite("conditions as range tests")
struct ConditionRangeTests {
    @Test func rangeTestsAgreeWithThePrograms() throws {
        let rdi = X86Register.named("rdi")!, esi = X86Register.named("esi")!
        let comparisons: [ProbeCondition.BinaryOperator] = [.equal, .notEqual, .less, .lessOrEqual, .greater, .greaterOrEqual]
        let constants: [UInt64] = [0, 1, 5, 0xFFFF_FFFF, 0x1_0000_0000, .max - 1, .max]
        let values: [UInt64] = [0, 1, 4, 5, 6, 0xFFFF_FFFF, 0x1_0000_0000, .max - 1, .max]
        var checked = 0, asRanges = 0
        for op in comparisons {
            for c in constants {
                for mirrored in [false, true] {
                    let r: ProbeCondition.Expression = .register(mirrored ? esi : rdi)
                    let k: ProbeCondition.Expression = .constant(c)
                    let one: ProbeCondition.Expression = mirrored ? .binary(op, k, r) : .binary(op, r, k)
                    for e in [one, .binary(.logicalAnd, one, .binary(.notEqual, .register(rdi), .constant(4))),
                              .binary(.logicalOr, one, .binary(.equal, .register(rdi), .constant(6)))] {
                        let condition = try ProbeCondition(e, text: "\(e)")
                        if condition.ranges != nil { asRanges += 1 }
                        for v in values {
                            let t = InMemoryTarget(registers: [.general(7): UInt128(v), .general(6): UInt128(v)])
                            let viaRanges = condition.evaluate(t.context())
                            var viaProgram: ProbeCondition.Outcome
                            do throws(TraceError) {
                                viaProgram = try ProbeCondition.run(condition.program, from: 0, to: condition.program.count, t.context()) ? .pass : .fail
                            } catch { viaProgram = .unreadable(error) }
                            #expect(viaRanges == viaProgram, "\(e) at \(v)")
                            checked += 1
                        }
                    }
                }
            }
        }
        #expect(asRanges == comparisons.count * constants.count * 2 * 3)
        #expect(checked == asRanges * values.count)
    }
}
