import ELF
import FlowTrace
import KVM
@testable import Machine
import Testing
import TestSupport

/// flowtrace delivering a guest's own #BP itself (OwnBreakpointDelivery), checked where the
/// guest's int3 never runs: own-traps is stopped by a hw-engine halt probe on each of its
/// int3s, and the #BP is delivered there by hand, as the runner does for an int3 of the
/// guest's that exited while traps of ours are armed. The guest's own handler counts them
/// and returns past the int3; the guest checks its counts and exits 0x42 only if all is as
/// without flowtrace (on PVM, where a guest int3 cannot run at all, the same 5 breakpoints).
@Suite("the guest's own #BP delivered by flowtrace", .serialized, .enabled(if: workingEngines.contains(.hw), "the hw engine does not work here"),
       .timeLimit(.minutes(3)))
struct OwnBreakpointTests {
    @Test func ownInt3sDeliveredByFlowtrace() throws {
        let path = try Guests.path("own-traps")
        let image = try ELFImage(path: path)
        let site = try #require(image.symbol(named: "own_int3")).address
        let entry = try #require(image.symbol(named: "bp_entry")).address
        let m = try Machine(path: path, configuration: .init(engine: .engine(.hw)))
        let module = try TraceModule(target: m)
        try module.addProbe(Probe("int3", entries: [.halt]), at: site)
        try module.enable()
        let delivery = OwnBreakpointDelivery(memory: m.memory)
        var r = try m.run(timeout: .seconds(60))
        var delivered = 0
        while case let .halted(stop) = r.ending, stop.address == site {
            let v = m.vcpus[stop.vcpu]
            let before = try v.registers()
            let plan = try #require(try delivery.plan(at: site, registers: before, special: v.specialRegisters()))
            // The handler the guest's IDT names, the frame the CPU pushes, interrupts off
            // (an interrupt gate), the stack aligned to 16 below the frame.
            #expect(plan.registers.rip == entry)
            #expect(plan.frame == [site + 1, UInt64(try v.specialRegisters().cs.selector), before.rflags, before.rsp, UInt64(try v.specialRegisters().ss.selector)])
            #expect(plan.registers.rsp == (before.rsp & ~0xF) - 40)
            #expect(plan.registers.rflags & 0x200 == 0)
            #expect(try delivery.deliver(v, at: site))
            delivered += 1
            r = try m.resume(timeout: .seconds(60))
        }
        #expect(delivered == 5)
        #expect(r.ending == .exited(status: 0x42), "\(r.ending)")
        #expect(r.console.map(\.text) == ["own-traps: 5 breakpoints, 13 single steps"])
    }

    /// Where it does not apply, nothing is planned and the runner injects through KVM.
    @Test func notPlannedOutsideKernelMode64() throws {
        let path = try Guests.path("own-traps")
        let m = try Machine(path: path, configuration: .init(engine: .engine(.hw)))
        let site = try #require(m.symbolizer.address(of: "own_int3"))
        let module = try TraceModule(target: m)
        try module.addProbe(Probe("int3", entries: [.halt]), at: site)
        try module.enable()
        let r = try m.run(timeout: .seconds(60))
        guard case let .halted(stop) = r.ending else { Issue.record("expected a halt, got \(r.ending)"); return }
        let v = m.vcpus[stop.vcpu]
        let regs = try v.registers(), s = try v.specialRegisters()
        let delivery = OwnBreakpointDelivery(memory: m.memory)
        #expect(try delivery.plan(at: site, registers: regs, special: s) != nil)
        var user = s
        user.cs.selector |= 3
        user.cs.dpl = 3
        #expect(try delivery.plan(at: site, registers: regs, special: user) == nil)
        var compatibility = s
        compatibility.cs.long = false
        #expect(try delivery.plan(at: site, registers: regs, special: compatibility) == nil)
        var fred = s
        fred.cr4 |= 1 << 32
        #expect(try delivery.plan(at: site, registers: regs, special: fred) == nil)
        var shortIDT = s
        shortIDT.idt.limit = 3 * 16 + 14
        #expect(try delivery.plan(at: site, registers: regs, special: shortIDT) == nil)
        // Not at the int3 (rip moved on): nothing.
        #expect(try delivery.plan(at: site + 1, registers: regs, special: s) == nil)
        try module.disable()
        m.stop()
    }
}
