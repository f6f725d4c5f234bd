import Machine
import Testing

/// The software-breakpoint engine's bookkeeping and the engine choice, without KVM.
@Suite("breakpoint engine bookkeeping")
struct EngineBookkeepingTests {
    @Test func patchTableSavesAndRestoresOriginalBytes() {
        var t = PatchTable(trap: 0xCC)
        #expect(t.insert(0x1000, physical: 0x1000, current: 0x55) == 0xCC)
        // A second owner of the same address writes nothing and keeps the first original.
        #expect(t.insert(0x1000, physical: 0x1000, current: 0xCC) == nil)
        #expect(t.original(at: 0x1000) == 0x55)
        #expect(t.owns(trapAt: 0x1000))
        #expect(!t.owns(trapAt: 0x1001))
        // Removal restores the original only while our trap byte is still there.
        #expect(t.remove(0x1000, current: 0xCC) == 0x55)
        #expect(!t.isPatched(0x1000))
        #expect(t.insert(0x2000, physical: 0x2000, current: 0x90) == 0xCC)
        #expect(t.remove(0x2000, current: 0x48) == nil)  // the guest rewrote its code
        #expect(t.remove(0x3000, current: 0xCC) == nil)  // never patched
    }

    @Test func hltTrapUsesTheSameTable() {
        var t = PatchTable(trap: 0xF4)
        #expect(t.insert(0x100000, physical: 0x100000, current: 0x31) == 0xF4)
        // A guest hlt at an address we did not patch is the guest's own.
        #expect(!t.owns(trapAt: 0x100010))
        #expect(t.owns(trapAt: 0x100000))
    }

    @Test func trapBytes() {
        #expect(BreakpointEngine.int3.trapByte == 0xCC)
        #expect(BreakpointEngine.hlt.trapByte == 0xF4)
        #expect(BreakpointEngine.hw.trapByte == nil)
        #expect(BreakpointEngine.hw.capacity == 4)
    }

    static let pvm = EngineSupport(statuses: [
        .int3: .unavailable("guest ends in KVM_EXIT_INTERNAL_ERROR"), .hlt: .works, .hw: .works, .step: .works,
    ])
    static let vmx = EngineSupport(statuses: [.int3: .works, .hlt: .works, .hw: .works, .step: .works])
    static let stepOnly = EngineSupport(statuses: [
        .int3: .unavailable("a"), .hlt: .unavailable("b"), .hw: .works, .step: .works,
    ])

    @Test func autoChoosesInOrderAndSaysWhy() throws {
        #expect(try EngineRequest.auto.resolve(locations: 10, support: Self.vmx).0 == .int3)
        let (e, why) = try EngineRequest.auto.resolve(locations: 10, support: Self.pvm)
        #expect(e == .hlt)
        #expect(why.contains("int3: guest ends in KVM_EXIT_INTERNAL_ERROR"))
        #expect(try EngineRequest.auto.resolve(locations: 4, support: Self.stepOnly).0 == .hw)
        let (five, reason) = try EngineRequest.auto.resolve(locations: 5, support: Self.stepOnly)
        #expect(five == .step)
        #expect(reason.contains("hw: 5 locations exceed its 4"))
    }

    @Test func explicitEnginesAreChecked() {
        #expect(throws: MachineError.engineUnavailable(.int3, reason: "guest ends in KVM_EXIT_INTERNAL_ERROR", working: ["hlt", "hw", "step"])) {
            try EngineRequest.engine(.int3).resolve(locations: 1, support: Self.pvm)
        }
        #expect(throws: MachineError.tooManyLocations(.hw, count: 5, capacity: 4)) {
            try EngineRequest.engine(.hw).resolve(locations: 5, support: Self.pvm)
        }
        let message = MachineError.engineUnavailable(.int3, reason: "x", working: ["hlt"]).description
        #expect(message == "--engine int3: does not work on this host (x); engines that work here: hlt")
    }
}
