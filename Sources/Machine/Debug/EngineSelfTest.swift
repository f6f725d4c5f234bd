import Dispatch
import KVM
import Locking

/// Finds out which breakpoint engines work on this host by running a four-instruction
/// guest once per mechanism: once per process, then cached.
public enum EngineSelfTest {
    private static let cache = Locked<EngineSupport?>(nil)

    /// What works on `host` (cached after the first call).
    public static func support(host: KVMHost) -> EngineSupport {
        cache.withLock { c in
            if let c { return c }
            let s = run(host: host)
            c = s
            return s
        }
    }

    /// Where the test code sits.
    static let code: UInt64 = BootLayout.imageFloor

    private static func run(host: KVMHost) -> EngineSupport {
        var statuses: [BreakpointEngine: EngineSupport.Status] = [:]
        // int3 at code+1 with USE_SW_BP: must exit KVM_EXIT_DEBUG, exception 3, pc code+1.
        statuses[.int3] = check(host, bytes: [0x90, 0xCC, 0x90, 0xF4], debug: { var d = GuestDebug(); d.softwareBreakpoints = true; return d }()) { exit, regs in
            if case let .debug(3, pc, _, _) = exit, pc == code + 1 { return nil }
            return exit.name
        }
        // hlt patched at code+1: must exit KVM_EXIT_HLT with rip just past it.
        statuses[.hlt] = check(host, bytes: [0x90, 0xF4, 0x90, 0xF4], debug: GuestDebug()) { exit, regs in
            if case .hlt = exit, regs?.rip == code + 2 { return nil }
            return exit.name
        }
        // DR0 execute breakpoint at code+1.
        var hw = GuestDebug()
        hw.hardwareBreakpoints = true
        hw.addresses = [code + 1, 0, 0, 0]
        hw.dr7 = 1
        statuses[.hw] = check(host, bytes: [0x90, 0x90, 0x90, 0xF4], debug: hw) { exit, _ in
            if case let .debug(1, pc, dr6, _) = exit, pc == code + 1, dr6 & 1 != 0 { return nil }
            return exit.name
        }
        // One single step from code: exception 1 at code+1.
        var step = GuestDebug()
        step.singleStep = true
        statuses[.step] = check(host, bytes: [0x90, 0x90, 0x90, 0xF4], debug: step) { exit, _ in
            if case let .debug(1, pc, _, _) = exit, pc == code + 1 { return nil }
            return exit.name
        }
        return EngineSupport(statuses: statuses)
    }

    /// Boots `bytes` at `code` in a fresh 2 MiB VM, runs once with `debug`, and asks
    /// `verdict` (nil = works, else what was seen instead).
    private static func check(_ host: KVMHost, bytes: [UInt8], debug: GuestDebug,
                              verdict: (VMExit, Registers?) -> String?) -> EngineSupport.Status {
        do throws(KVMError) {
            let layout: BootLayout
            do { layout = try BootLayout(memorySize: BootLayout.minimumMemory, vcpuCount: 1) } catch {
                return .unavailable(error.description)
            }
            let vm = try host.makeVirtualMachine()
            let memory = try GuestMemory(size: layout.memorySize)
            try layout.writeTables(into: memory)
            try memory.write(physical: code, bytes: bytes)
            try vm.map(memory)
            let vcpu = try vm.makeVCPU(id: 0)
            try vcpu.setCPUID(host.supportedCPUID())
            try vcpu.setSpecialRegisters(layout.specialRegisters(from: vcpu.specialRegisters()))
            var regs = Registers()
            regs.rip = code
            regs.rsp = layout.stackTop(for: 0)
            try vcpu.setRegisters(regs)
            try vcpu.setGuestDebug(debug)
            try VCPU.installKickHandler()
            vcpu.bindToCurrentThread()
            // A mechanism that never exits must not hang the caller.
            let watchdog = DispatchWorkItem { vcpu.kick() }
            DispatchQueue.global().asyncAfter(deadline: .now() + 2, execute: watchdog)
            let exit = try vcpu.run()
            watchdog.cancel()
            let after: Registers?
            do { after = try vcpu.registers() } catch { after = nil }
            if exit == .interrupted { return .unavailable("no exit within 2 s") }
            return verdict(exit, after).map { .unavailable("guest ends in \($0)") } ?? .works
        } catch {
            return .unavailable(error.description)
        }
    }
}
