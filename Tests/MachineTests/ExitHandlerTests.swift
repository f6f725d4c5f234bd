import Devices
import FlowGraph
import FlowTrace
import KVM
import Locking
@testable import Machine
import Testing

/// A vCPU for exit handling without /dev/kvm: registers set by the test, the pending
/// exit's port data as an array, answers recorded.
final class FakeVCPU: ExitVCPU {
    let id: Int
    var regs = Registers()
    var registerFailure: KVMError?
    var registerReads = 0
    var outValues: [UInt32] = []
    var inAnswers: [Int: UInt32] = [:]
    var mmioAnswer: UInt64?

    init(id: Int = 0, rip: UInt64 = 0x100000) { self.id = id; regs.rip = rip }

    func registers() throws(KVMError) -> Registers {
        registerReads += 1
        if let registerFailure { throw registerFailure }
        return regs
    }
    func ioOutValue(at index: Int) -> UInt32 { index < outValues.count ? outValues[index] : 0 }
    func completeIOIn(at index: Int, value: UInt32) { inAnswers[index] = value }
    func completeMMIORead(_ value: UInt64) { mmioAnswer = value }
}

/// The exit handler with each platform's devices, a console collecting lines.
struct Rig {
    let handler: ExitHandler
    let lines = Locked<[ConsoleLine]>([])
    let devices: PlatformDevices

    init(_ platform: Platform) throws {
        let lines = self.lines
        let console = Console(vcpuCount: 2) { l in lines.withLock { $0.append(l) } }
        devices = try PlatformDevices(platform: platform, console: console, serial: .console, memorySize: 64 << 20, vm: nil)
        handler = ExitHandler(platform: platform, ports: devices.ports, mmio: devices.mmio, unknown: devices.unknown, interruptLines: nil)
    }

    func handle(_ exit: VMExit, _ vcpu: FakeVCPU, table: Breakpoints = Breakpoints(), stepping: Stepping? = nil) -> ExitOutcome {
        handler.handle(exit, vcpu: vcpu, table: table, stepping: stepping)
    }
}

/// A breakpoint table with `engine` and patches at `addresses`.
func table(_ engine: BreakpointEngine?, patched addresses: [UInt64] = []) -> Breakpoints {
    var b = Breakpoints()
    b.engine = engine
    b.patches = PatchTable(trap: engine?.trapByte ?? X86Opcode.hlt)
    for a in addresses { _ = b.patches.insert(a, physical: a, current: 0x55) }
    return b
}

@Suite("exit handling without KVM: synthetic exits, a fake vCPU")
struct ExitHandlerTests {
    @Test func consoleAndExitPorts() throws {
        let rig = try Rig(.payload)
        let v = FakeVCPU(id: 1)
        for c in "hi\n".utf8 { #expect(rig.handle(.ioOut(port: 0xE9, size: 1, count: 1, value: UInt32(c)), v) == .resume) }
        #expect(rig.lines.withLock { $0 } == [ConsoleLine(vcpu: 1, text: "hi")])
        #expect(rig.handle(.ioOut(port: 0xF4, size: 4, count: 1, value: 7), v) == .end(.exited(status: 7)))
        // A byte to 0xF4 is not an exit (only a 32-bit write is).
        #expect(rig.handle(.ioOut(port: 0xF4, size: 1, count: 1, value: 7), v) == .resume)
        #expect(v.registerReads == 0)   // known ports need no registers
    }

    /// `rep outsb` to the console: every element, read in place through the vCPU.
    @Test func stringOutputUsesEveryElement() throws {
        let rig = try Rig(.payload)
        let v = FakeVCPU()
        v.outValues = Array("rep\n".utf8).map(UInt32.init)
        #expect(rig.handle(.ioOut(port: 0xE9, size: 1, count: 4, value: v.outValues[0]), v) == .resume)
        #expect(rig.lines.withLock { $0 }.map(\.text) == ["rep"])
    }

    @Test func unknownPortsReadAllOnesAndAreNotedOnce() throws {
        let rig = try Rig(.payload)
        let v = FakeVCPU(rip: 0x100123)
        #expect(rig.handle(.ioIn(port: 0x2FD, size: 1, count: 1), v) == .resume)
        #expect(v.inAnswers == [0: 0xFF])
        #expect(rig.handle(.ioIn(port: 0x2FC, size: 2, count: 2), v) == .resume)
        #expect(v.inAnswers == [0: 0xFFFF, 1: 0xFFFF])
        v.regs.rip = 0x200000
        #expect(rig.handle(.ioIn(port: 0x2FD, size: 4, count: 1), v) == .resume)
        #expect(v.inAnswers[0] == 0xFFFF_FFFF)
        let u = rig.devices.unknown.all
        #expect(u.map(\.address) == [0x2FC, 0x2FD])
        #expect(u.map(\.rip) == [0x100123, 0x100123])
        #expect(u.map(\.count) == [1, 2])
        #expect(v.registerReads == 2)   // once per new address
    }

    @Test func unknownMMIOReadAnswersAllOnes() throws {
        let rig = try Rig(.pc)
        let v = FakeVCPU()
        #expect(rig.handle(.mmio(address: 0xFED0_0000, isWrite: false, length: 4, value: 0), v) == .resume)
        #expect(v.mmioAnswer == UInt64.max)
        #expect(rig.handle(.mmio(address: 0xFED0_0010, isWrite: true, length: 8, value: 1), v) == .resume)
        #expect(rig.devices.unknown.all.map(\.isWrite) == [false, true])
    }

    @Test func aFailedRegisterReadIsAHostFailure() throws {
        let rig = try Rig(.payload)
        let v = FakeVCPU()
        v.registerFailure = .ioctl("KVM_GET_REGS", errno: 5)
        #expect(rig.handle(.ioIn(port: 0x2FD, size: 1, count: 1), v)
                == .hostFailure(.ioctl("KVM_GET_REGS", errno: 5), while: "reading rip at an access to an unknown port"))
        #expect(rig.handle(.hlt, v) == .hostFailure(.ioctl("KVM_GET_REGS", errno: 5), while: "reading the registers at an exit"))
    }

    @Test func resetsAndTripleFaults() throws {
        let pc = try Rig(.pc), payload = try Rig(.payload)
        let v = FakeVCPU()
        #expect(pc.handle(.ioOut(port: 0x64, size: 1, count: 1, value: 0xFE), v) == .end(.reset("i8042")))
        #expect(payload.handle(.ioOut(port: 0x64, size: 1, count: 1, value: 0xFE), v) == .end(.reset("i8042")))
        #expect(pc.handle(.shutdown, v) == .end(.reset("triple fault")))
        #expect(payload.handle(.shutdown, v) == .fault(.exit(.shutdown)))
        #expect(pc.handle(.internalError(suberror: 1), v) == .fault(.exit(.internalError(suberror: 1))))
        #expect(pc.handle(.interrupted, v) == .resume)
    }

    /// The UART answers on both platforms; port 0x61 only where KVM's PIT does not.
    @Test func platformDeviceMaps() throws {
        let pc = try Rig(.pc), payload = try Rig(.payload)
        let v = FakeVCPU()
        for rig in [pc, payload] {
            #expect(rig.handle(.ioIn(port: 0x3FD, size: 1, count: 1), v) == .resume)
            #expect(v.inAnswers[0] == 0x60)   // LSR: THRE | TEMT
        }
        _ = payload.handle(.ioIn(port: 0x61, size: 1, count: 1), v)
        _ = pc.handle(.ioIn(port: 0x61, size: 1, count: 1), v)
        #expect(payload.devices.unknown.all.isEmpty)
        #expect(pc.devices.unknown.all.map(\.address) == [0x61])
        #expect(pc.devices.ports.device(at: 0x40) == nil)   // the PIT is in the kernel
    }

    @Test func hltIsOursOnlyAtAPatch() throws {
        let rig = try Rig(.payload)
        let v = FakeVCPU(rip: 0x100011)
        let t = table(.hlt, patched: [0x100010])
        #expect(rig.handle(.hlt, v, table: t) == .trapHit(address: 0x100010, registers: v.regs))
        // The guest's own hlt, or a trap while stepping over: the vCPU halts.
        #expect(rig.handle(.hlt, v, table: table(.hlt, patched: [0x100020])) == .vcpuHalted)
        #expect(rig.handle(.hlt, v, table: t, stepping: .over(address: 0x100010, held: true)) == .vcpuHalted)
        #expect(rig.handle(.hlt, v, table: table(.int3, patched: [0x100010])) == .vcpuHalted)
    }

    @Test func int3OursOrTheGuests() throws {
        let rig = try Rig(.pc)
        let v = FakeVCPU(rip: 0x100010)
        let t = table(.int3, patched: [0x100010])
        #expect(rig.handle(.debug(exception: 3, pc: 0x100010, dr6: 0, dr7: 0), v, table: t) == .trapHit(address: 0x100010, registers: v.regs))
        #expect(rig.handle(.debug(exception: 3, pc: 0x100018, dr6: 0, dr7: 0), v, table: t) == .reinjectBreakpoint(address: 0x100018))
        #expect(rig.handle(.debug(exception: 3, pc: 0x100010, dr6: 0, dr7: 0), v, table: t, stepping: .over(address: 0x100010, held: true)) == .reinjectBreakpoint(address: 0x100010))
    }

    @Test func singleStepsOverProbes() throws {
        let rig = try Rig(.payload)
        let v = FakeVCPU(rip: 0x100010)
        let t = table(.hlt, patched: [0x100010])
        let step = VMExit.debug(exception: 1, pc: 0x100010, dr6: 0x4000, dr7: 0)
        // In place: rip unchanged means the instruction did not retire.
        #expect(rig.handle(step, v, table: t, stepping: .over(address: 0x100010, held: true)) == .stepAgain)
        v.regs.rip = 0x100015
        #expect(rig.handle(step, v, table: t, stepping: .over(address: 0x100010, held: true))
                == .stepOverDone(address: 0x100010, held: true, registers: v.regs))
        // Out of line: rip still on the slot, or past the copy.
        let d = try DisplacedInstruction.plan(X86Decoder().decode([0x48, 0x89, 0xC3], at: 0x100010).get()).get()
        v.regs.rip = 0x8000
        #expect(rig.handle(step, v, table: t, stepping: .outOfLine(address: 0x100010, slot: 0x8000, displaced: d)) == .stepAgain)
        v.regs.rip = 0x8003
        #expect(rig.handle(step, v, table: t, stepping: .outOfLine(address: 0x100010, slot: 0x8000, displaced: d))
                == .outOfLineDone(address: 0x100010, slot: 0x8000, displaced: d, registers: v.regs))
    }

    @Test func hardwareAndStepEnginesAndTheGuestsOwnDebugExceptions() throws {
        let rig = try Rig(.pc)
        let v = FakeVCPU(rip: 0x100010)
        #expect(rig.handle(.debug(exception: 1, pc: 0x100010, dr6: 0x1, dr7: 1), v, table: table(.hw))
                == .hardwareHit(address: 0x100010, registers: v.regs))
        #expect(rig.handle(.debug(exception: 1, pc: 0x100010, dr6: 0x4000, dr7: 0), v, table: table(.step)) == .stepEngine(registers: v.regs))
        // A #DB no engine of ours asked for (the guest's own TF single-step): the guest's.
        #expect(rig.handle(.debug(exception: 1, pc: 0x100010, dr6: 0x4000, dr7: 0), v, table: table(.hw)) == .reinjectDebug(dr6: 0x4000))
        #expect(rig.handle(.debug(exception: 1, pc: 0x100010, dr6: 0x4000, dr7: 0), v, table: table(.int3)) == .reinjectDebug(dr6: 0x4000))
        // Nothing to explain it: a fault naming the exit.
        let odd = VMExit.debug(exception: 1, pc: 0x100010, dr6: 0, dr7: 0)
        #expect(rig.handle(odd, v, table: table(.int3)) == .fault(.exit(odd)))
    }

    /// #BP comes out to flowtrace only while one of its int3s is written: with probes
    /// waiting behind a gate (only DR0 at the gate) the guest's own int3s stay in the guest.
    @Test func int3ExitsOnlyWhileATrapIsWritten() {
        #expect(table(.int3, patched: [0x100010]).baseDebug(for: 0).softwareBreakpoints)
        #expect(table(.int3, patched: [0x100010]).stepOverDebug(for: 0).softwareBreakpoints)
        #expect(!table(.int3).baseDebug(for: 0).softwareBreakpoints)
        #expect(!table(.hlt, patched: [0x100010]).baseDebug(for: 0).softwareBreakpoints)
        var gated = table(.int3)
        gated.gate = 0xFFFF_FFFF_8100_0000
        gated.pending = [0xFFFF_FFFF_8100_0100]
        let d = gated.baseDebug(for: 1)
        #expect(!d.softwareBreakpoints)
        #expect(d.hardwareBreakpoints && d.addresses[0] == 0xFFFF_FFFF_8100_0000 && d.dr7 & 1 == 1)
    }
}

/// CPUID as the guest sees it.
@Suite struct CPUIDNormalizationTests {
    let host: [CPUIDTable.Entry] = [
        .init(function: 1, index: 0, eax: 0x806F8, ebx: 0x2A_10_0800, ecx: 0x7FFA_3203 | 1 << 21 | 1 << 24, edx: 0x178B_FBFF),
        .init(function: 6, index: 0, eax: 0x77, ebx: 2, ecx: 9, edx: 0),
        .init(function: 0xB, index: 0, eax: 1, ebx: 2, ecx: 0x100, edx: 0x2A, flags: 1),
        .init(function: 0xB, index: 1, eax: 7, ebx: 96, ecx: 0x201, edx: 0x2A, flags: 1),
        .init(function: 0xB, index: 2, eax: 0, ebx: 0, ecx: 2, edx: 0x2A, flags: 1),
        .init(function: 0x8000_0008, index: 0, eax: 0x3030, ebx: 0, ecx: 0x705F, edx: 0),
    ]

    @Test func topologyAndHypervisorBit() {
        let e = CPUIDNormalization.normalize(host, vcpu: 2, count: 3, platform: .pc)
        #expect(e[0].ebx >> 24 == 2 && (e[0].ebx >> 16) & 0xFF == 3 && e[0].ebx & 0xFFFF == 0x0800)
        #expect(e[0].ecx & (1 << 31) != 0)
        #expect(e[0].edx & (1 << 28) != 0)            // HTT with 3 logical processors
        #expect(e[0].edx & (1 << 9) != 0)             // APIC on the pc platform
        #expect(e[1].eax == 0 && e[1].ebx == 0 && e[1].ecx == 0)   // no host power management
        #expect(e[2].edx == 2 && e[2].ebx == 1 && e[2].ecx == 0x100)
        #expect(e[3].edx == 2 && e[3].ebx == 3 && e[3].eax == 2 && e[3].ecx == 0x201)
        #expect(e[4].ebx == 0 && e[4].ecx == 2 && e[4].flags == 1)
        #expect(e[5].ecx & 0xFF == 2)
    }

    @Test func payloadHasNoAPIC() {
        let e = CPUIDNormalization.normalize(host, vcpu: 0, count: 1, platform: .payload)
        #expect(e[0].edx & (1 << 9) == 0 && e[0].ecx & (1 << 21 | 1 << 24) == 0)
        #expect(e[0].edx & (1 << 28) == 0)
        #expect(e[0].ebx >> 24 == 0 && (e[0].ebx >> 16) & 0xFF == 1)
    }
}

/// Where popf and iret find the RFLAGS image they load (the guest's own TF after a step).
@Suite struct OwnTrapFlagTests {
    @Test func flagsSlots() {
        #expect(OwnTrapFlag.flagsSlot([0x9D]) == 0)              // popfq
        #expect(OwnTrapFlag.flagsSlot([0x66, 0x9D]) == 0)        // popf (16-bit)
        #expect(OwnTrapFlag.flagsSlot([0x48, 0xCF]) == 16)       // iretq: rip, cs, rflags
        #expect(OwnTrapFlag.flagsSlot([0xCF]) == 8)              // iretd
        #expect(OwnTrapFlag.flagsSlot([0x66, 0xCF]) == 4)        // iret (16-bit)
        #expect(OwnTrapFlag.flagsSlot([0x90]) == nil)
        #expect(OwnTrapFlag.flagsSlot([0x48, 0x89, 0xC3]) == nil)
        #expect(OwnTrapFlag.flagsSlot([0x48]) == nil)            // truncated
    }
}
