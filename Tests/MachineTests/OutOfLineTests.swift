import ELF
import FlowGraph
import FlowTrace
import KVM
@testable import Machine
import Synchronization
import Glibc
import Testing
import TestSupport

private func decode(_ bytes: [UInt8], at address: UInt64 = 0x100000) throws -> Instruction {
    try X86Decoder().decode(bytes, at: address).get()
}

/// Planning out-of-line steps: which instructions, and the fix-ups (no KVM needed).
@Suite struct DisplacedInstructionTests {
    @Test func ripRelativeDisplacementIsAdjustedForTheSlot() throws {
        // mov rax, [rip+0x1f54] at 0x1000a5: reads 0x102000.
        let d = try DisplacedInstruction.plan(decode([0x48, 0x8B, 0x05, 0x54, 0x1F, 0x00, 0x00], at: 0x1000A5)).get()
        #expect(d.fixup == .relocate && d.ripDisplacementOffset == 3)
        let bytes = try #require(d.bytes(at: 0x8000))
        // From the slot, rip after the instruction is 0x8007: 0x8007 + disp must be 0x102000.
        let disp = Int32(bitPattern: UInt32(bytes[3]) | UInt32(bytes[4]) << 8 | UInt32(bytes[5]) << 16 | UInt32(bytes[6]) << 24)
        #expect(UInt64(Int64(0x8007) + Int64(disp)) == 0x102000)
        #expect(Array(bytes[0..<3]) == [0x48, 0x8B, 0x05])
        #expect(d.relocated(rip: 0x8007, slot: 0x8000) == 0x1000AC)
    }

    @Test func displacementThatNoLongerFitsIsSteppedInPlace() throws {
        let d = try DisplacedInstruction.plan(decode([0x48, 0x8B, 0x05, 0x00, 0x00, 0x00, 0x70], at: 0x1_0000_0000)).get()
        #expect(d.bytes(at: 0x8000) == nil)
    }

    @Test func branchesAndCalls() throws {
        // jbe +0x28 at 0x1000be: taken lands on 0x1000e8, not taken on 0x1000c0.
        let jbe = try DisplacedInstruction.plan(decode([0x76, 0x28], at: 0x1000BE)).get()
        #expect(jbe.fixup == .relocate)
        #expect(jbe.relocated(rip: 0x8000 + 2 + 0x28, slot: 0x8000) == 0x1000E8)
        #expect(jbe.relocated(rip: 0x8002, slot: 0x8000) == 0x1000C0)
        // call fib (rel32) at 0x1000cd: to 0x1000a5, returning to 0x1000d2.
        let call = try DisplacedInstruction.plan(decode([0xE8, 0xD3, 0xFF, 0xFF, 0xFF], at: 0x1000CD)).get()
        #expect(call.fixup == .call(relative: true))
        let fromSlot = UInt64(Int64(0x8005) + Int64(Int32(bitPattern: 0xFFFF_FFD3)))
        #expect(call.relocated(rip: fromSlot, slot: 0x8000) == 0x1000A5)
        #expect(call.returnAddresses(slot: 0x8000)! == (0x8005, 0x1000D2))
        // call rax: rip is absolute; the return address still needs fixing.
        let indirect = try DisplacedInstruction.plan(decode([0xFF, 0xD0], at: 0x1000CD)).get()
        #expect(indirect.fixup == .call(relative: false))
        #expect(indirect.relocated(rip: 0x123456, slot: 0x8000) == 0x123456)
        #expect(indirect.returnAddresses(slot: 0x8000)! == (0x8002, 0x1000CF))
        // ret and jmp rdx: absolute.
        #expect(try DisplacedInstruction.plan(decode([0xC3])).get().fixup == .keep)
        #expect(try DisplacedInstruction.plan(decode([0xFF, 0xE2])).get().fixup == .keep)
    }

    @Test(arguments: [
        ([0xF4], "hlt"), ([0xCC], "int3"), ([0xCD, 0x80], "int"), ([0x0F, 0x05], "syscall"), ([0x48, 0xCF], "iretq"),
        ([0x0F, 0x0B], "ud2"), ([0x0F, 0x07], "sysret"), ([0xC7, 0xF8, 0x00, 0x00, 0x00, 0x00], "xbegin"),
    ] as [([UInt8], String)])
    func instructionsThatDependOnWhereTheyRunStayInPlace(bytes: [UInt8], mnemonic: String) throws {
        let i = try decode(bytes)
        #expect(i.mnemonic == mnemonic)
        guard case let .failure(reason) = DisplacedInstruction.plan(i) else { Issue.record("\(mnemonic) planned out of line"); return }
        #expect(reason.description == "\(mnemonic) depends on where it runs")
    }

    @Test func farBranchesStayInPlace() throws {
        // jmp far [rax] (FF /5) and retf (CB).
        for bytes: [UInt8] in [[0xFF, 0x28], [0xCB]] {
            let i = try decode(bytes)
            #expect(i.isFar)
            guard case .failure = DisplacedInstruction.plan(i) else { Issue.record("\(i.text) planned out of line"); continue }
        }
    }
}

/// Every instruction of a function probed at once with the patching engine: each is
/// stepped out of line, and the guest still computes its answer.
@Suite("out-of-line stepping on real guests", .serialized, .enabled(if: kvmUsable && works(.hlt), "needs /dev/kvm with a working hlt engine"),
       .timeLimit(.minutes(5)))
struct OutOfLineStepTests {
    @Test func fibEveryInstruction() throws {
        // rip-relative loads and stores, cmp/jbe both ways, push/pop, relative calls (the
        // return address is fixed up), ret.
        let (_, module) = try everyInstructionSteppedOutOfLine("fib", ["fib"], engine: .hlt, console: ["fib(15) = 610, calls = 1973"])
        #expect(module.counters.locations.first?.hits == 1973)
    }

    @Test func switchEveryInstruction() throws { try switchEveryInstructionSteppedOutOfLine(engine: .hlt) }

    @Test func codeRewrittenAfterArmingIsSteppedAsItIsNow() throws {
        // fib's `add rax, 0x1` (counting its calls) becomes `add rax, 0x2` after the probe is
        // armed: a copy made at arming time would still add 1.
        let m = try Machine(path: Guests.path("fib"), configuration: .init(engine: .engine(.hlt)))
        let add = try #require(FlowGraph.build(function: "fib", in: m.image).blocks[0].instructions[1])
        #expect(add.text == "add rax, 0x1")
        let module = try TraceModule(target: m)
        try module.addProbe(Probe("add"), at: add.address)
        try module.enable()
        try m.memory.write(physical: add.end - 1, bytes: [2])
        let r = try m.run(timeout: .seconds(60))
        #expect(r.console.map(\.text) == ["fib(15) = 610, calls = 3946"])
        #expect(m.stepOvers.inPlace == 1973 && m.stepOvers.outOfLine == 0)
    }

    @Test func inPlaceStepThatFaultsEndsTheRunAndReleasesTheOtherVCPUs() throws {
        // ud2 is stepped in place (the other vCPUs held) and faults: the fault is reported
        // at it, and disarming afterwards does not wait for the step to end.
        let m = try Machine(path: Guests.path("fault"), configuration: .init(vcpuCount: 2, engine: .engine(.hlt)))
        let module = try TraceModule(target: m)
        let fault = try #require(m.symbolizer.address(of: "fault_here"))
        try module.addProbe(Probe("ud2"), at: fault)
        try module.enable()
        let r = try m.run(timeout: .seconds(60))
        guard case let .fault(f) = r.ending else { Issue.record("ended \(r.ending)"); return }
        #expect(f.rip == fault)
        #expect(m.stepOvers == (outOfLine: 0, inPlace: 1))
        try module.disable()
        #expect(module.report().count == 1)
    }

    @Test func disarmingWhileAnotherVCPUStepsOutOfLine() throws {
        // A hit limit disarms the module from vCPU 1 while vCPU 0 is in the middle of an
        // out-of-line step: that step must still finish as a step. The interleaving is
        // forced through the machine's test hook: vCPU 0, right after beginning its first
        // step, waits until the disarm's rendezvous is being taken, and only then goes on (to
        // park for it); vCPU 1 takes no step before vCPU 0 is waiting, then the whole budget.
        for round in 0..<8 {
            let m = try Machine(path: Guests.path("smp"), configuration: .init(vcpuCount: 2, engine: .engine(.hlt)))
            let module = try TraceModule(target: m)
            let g = try FlowGraph.build(function: "work_unit", in: m.image)
            try module.addProbes(g.blocks.flatMap(\.instructions).map { (Probe("p"), $0.address, ProbeTiming.before) })
            // At most 359: below vCPU 1's 400 hits (200 units, 2 instructions each), which it
            // takes alone once vCPU 0 waits.
            let limit = 100 + UInt64(round) * 37
            let engaged = Atomic<Bool>(false)
            let waited = Atomic<Bool>(false)
            m.onOutOfLineStepBegun { [weak m] id in
                guard let m else { return }
                if id == 1 {
                    // Not ahead of vCPU 0 (unless a rendezvous or an ending says otherwise).
                    while !engaged.load(ordering: .acquiring) && !m.rendezvousIsHeld && m.runningVCPUs == 2 { sched_yield() }
                    return
                }
                guard !engaged.exchange(true, ordering: .acquiringAndReleasing) else { return }
                // vCPU 1 goes on hitting until the limit, then takes the rendezvous to disarm;
                // it cannot finish it before this vCPU parks.
                while !m.rendezvousIsHeld && m.runningVCPUs == 2 { sched_yield() }
                waited.store(m.rendezvousIsHeld, ordering: .releasing)
            }
            try module.enable(hitLimit: limit)
            let r = try m.run(timeout: .seconds(60))
            let forced = waited.load(ordering: .relaxed)
            #expect(forced, "round \(round): the forced interleaving did not happen")
            #expect(r.ending == .exited(status: 0), "round \(round)")
            #expect(Set(r.console.map(\.text)) == ["vcpu 0: 100 units", "vcpu 1: 200 units", "total: 300 units on 2 vcpus"], "round \(round)")
            #expect(module.counters.recordsTaken == 100 + UInt64(round) * 37)
        }
    }

    @Test func twoVCPUsRunOnWhileOneSteps() throws {
        _ = try everyInstructionSteppedOutOfLine("smp", ["work_unit"], vcpus: 2, engine: .hlt,
                                                 console: ["vcpu 0: 100 units", "vcpu 1: 200 units", "total: 300 units on 2 vcpus"])
    }
}

/// Probes every instruction of `functions` (before) with `engine`, runs, and checks that
/// every instruction of a block ran as often as the block's first and that every step-over
/// was out of line.
func everyInstructionSteppedOutOfLine(_ guest: String, _ functions: [String], vcpus: Int = 1, engine: BreakpointEngine,
                                      console: [String]) throws -> (Machine, TraceModule) {
    let m = try Machine(path: Guests.path(guest), configuration: .init(vcpuCount: vcpus, engine: .engine(engine)))
    let module = try TraceModule(target: m)
    let p = Probe("p", entries: [try reg("rsp")])
    var graphs: [FlowGraph] = []
    for f in functions {
        let g = try FlowGraph.build(function: f, in: m.image)
        graphs.append(g)
        try module.addProbes(g.blocks.flatMap(\.instructions).map { (p, $0.address, ProbeTiming.before) })
    }
    try module.enable()
    let r = try m.run(timeout: .seconds(120))
    #expect(r.ending == .exited(status: 0))
    #expect(Set(r.console.map(\.text)) == Set(console))
    var hits: [UInt64: UInt64] = [:]
    for l in module.counters.locations { hits[l.address] = l.hits }
    for g in graphs {
        for b in g.blocks {
            let counts = b.instructions.map { hits[$0.address] ?? 0 }
            #expect(Set(counts).count == 1, "\(g.name) block \(b.id): \(counts)")
        }
    }
    let steps = m.stepOvers
    #expect(steps.inPlace == 0)
    #expect(steps.outOfLine == module.counters.hitsSeen)
    return (m, module)
}

/// dispatch and finish of the switch guest, every instruction: a rip-relative lea of the
/// jump table, movsxd, the jump through a register, the loops, the tail jump.
func switchEveryInstructionSteppedOutOfLine(engine: BreakpointEngine) throws {
    let ops = switchOps
    let perCase = (0..<8).map { k in ops.filter { $0 == k }.count }
    let total = ops.enumerated().reduce(UInt64(0)) { $0 + dispatchResult(op: $1.element, x: UInt64($1.offset)) }
    _ = try everyInstructionSteppedOutOfLine("switch", ["dispatch", "finish"], engine: engine, console: [
        "switch: calls 240 cases \(perCase.map(String.init).joined(separator: " ")) default \(ops.filter { $0 >= 8 }.count) finish \(perCase[7]) total \(total)",
    ])
}
