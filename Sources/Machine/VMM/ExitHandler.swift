import Devices
import KVM

/// What a vCPU is doing about a probe besides running.
enum Stepping: Sendable, Equatable {
    /// Single-stepping the instruction at `address` (the original byte is back for the
    /// patching engines, the DRs are off for hw); `held`: this vCPU holds the rendezvous.
    case over(address: UInt64, held: Bool)
    /// Single-stepping a copy of the instruction at `address` in the vCPU's slot; the
    /// trap byte stays and the other vCPUs run on.
    case outOfLine(address: UInt64, slot: UInt64, displaced: DisplacedInstruction)
}

/// What exit handling needs of a vCPU: its registers and the data of the pending exit.
/// `VCPU` is one; the tests use a fake.
protocol ExitVCPU {
    var id: Int { get }
    func registers() throws(KVMError) -> Registers
    func ioOutValue(at index: Int) -> UInt32
    func completeIOIn(at index: Int, value: UInt32)
    func completeMMIORead(_ value: UInt64)
}

extension VCPU: ExitVCPU {}

/// What the runner must do after an exit.
enum ExitOutcome: Equatable {
    /// Enter the guest again.
    case resume
    /// The run ends (the exit port, a reset).
    case end(RunEnding)
    /// The guest's own `hlt` (payload platform): this vCPU is done.
    case vcpuHalted
    /// The guest stopped on something nothing handles.
    case fault(GuestFault.Cause)
    /// A host call failed while handling the exit.
    case hostFailure(KVMError, while: String)
    /// A patching engine's trap at `address` (rip is past it for hlt, on it for int3):
    /// rip back to `address`, hits before execution, then step over it.
    case trapHit(address: UInt64, registers: Registers)
    /// A hardware breakpoint at `address` (rip on it): hits before, then step over.
    case hardwareHit(address: UInt64, registers: Registers)
    /// The single step over a probed instruction ended (rip past it): hits after.
    case stepOverDone(address: UInt64, held: Bool, registers: Registers)
    /// The out-of-line copy in `slot` ran: fix rip (and a call's return address) up, hits after.
    case outOfLineDone(address: UInt64, slot: UInt64, displaced: DisplacedInstruction, registers: Registers)
    /// The stepped instruction did not retire (restarted, a rep iteration): step again.
    case stepAgain
    /// The step engine's step: `registers.rip` is the next instruction.
    case stepEngine(registers: Registers)
    /// A vCPU reached the probe gate: the pending software probes are armed.
    case gateReached
    /// The guest's own int3: deliver #BP to it.
    case reinjectBreakpoint(address: UInt64)
    /// The guest's own #DB (its single-step or its breakpoints): deliver it with `dr6`.
    case reinjectDebug(dr6: UInt64)
}

/// Turns an exit into an outcome: devices answered through the buses, debug exits
/// classified against the breakpoint table and the vCPU's stepping state. No effect on the
/// vCPU beyond answering the exit's data (the runner performs the outcome), so it is tested
/// with synthetic exits and a fake vCPU.
struct ExitHandler: Sendable {
    let platform: Platform
    let ports: PortBus
    let mmio: MMIOBus
    let unknown: UnknownAccesses
    let interruptLines: KVMInterruptLines?

    func handle(_ exit: VMExit, vcpu: some ExitVCPU, table: Breakpoints, stepping: Stepping?) -> ExitOutcome {
        switch exit {
        case .interrupted:
            return .resume
        case let .ioOut(port, size, count, first):
            let context = IOContext(vcpu: vcpu.id)
            guard let device = ports.device(at: port) else {
                return noteUnknown(.port, UInt64(port), isWrite: true, size: size, vcpu: vcpu)
            }
            for i in 0..<max(count, 1) {
                let value = i == 0 ? first : vcpu.ioOutValue(at: i)
                if let event = device.write(port: port, size: size, value: value, context: context) { return outcome(event) }
            }
            return lineFailure() ?? .resume
        case let .ioIn(port, size, count):
            let context = IOContext(vcpu: vcpu.id)
            let device = ports.device(at: port)
            for i in 0..<max(count, 1) {
                vcpu.completeIOIn(at: i, value: device?.read(port: port, size: size, context: context) ?? allOnes(size))
            }
            if device == nil { return noteUnknown(.port, UInt64(port), isWrite: false, size: size, vcpu: vcpu) }
            return lineFailure() ?? .resume
        case let .mmio(address, isWrite, length, value):
            let context = IOContext(vcpu: vcpu.id)
            guard let (device, offset) = mmio.device(at: address) else {
                if !isWrite { vcpu.completeMMIORead(UInt64.max) }
                return noteUnknown(.mmio, address, isWrite: isWrite, size: length, vcpu: vcpu)
            }
            if isWrite {
                if let event = device.write(offset: offset, size: length, value: value, context: context) { return outcome(event) }
            } else {
                vcpu.completeMMIORead(device.read(offset: offset, size: length, context: context))
            }
            return lineFailure() ?? .resume
        case .hlt:
            let regs: Registers
            do { regs = try vcpu.registers() } catch { return .hostFailure(error, while: "reading the registers at an exit") }
            if stepping == nil, case let .trap(address)? = table.engine?.mechanism.hit(exit, rip: regs.rip, table: table) {
                return .trapHit(address: address, registers: regs)
            }
            return .vcpuHalted
        case let .debug(exception, pc, dr6, _):
            let regs: Registers
            do { regs = try vcpu.registers() } catch { return .hostFailure(error, while: "reading the registers at an exit") }
            return debugOutcome(exit, exception: exception, pc: pc, dr6: dr6, regs: regs, table: table, stepping: stepping)
        case .shutdown:
            return platform == .pc ? .end(.reset("triple fault")) : .fault(.exit(exit))
        default:
            return .fault(.exit(exit))
        }
    }

    private func debugOutcome(_ exit: VMExit, exception: UInt32, pc: UInt64, dr6: UInt64, regs: Registers,
                              table: Breakpoints, stepping: Stepping?) -> ExitOutcome {
        if exception == 1, case let .outOfLine(address, slot, displaced)? = stepping {
            // A restarted instruction leaves rip on the copy: step again.
            if regs.rip == slot { return .stepAgain }
            return .outOfLineDone(address: address, slot: slot, displaced: displaced, registers: regs)
        }
        if exception == 1, case let .over(address, held)? = stepping {
            // An instruction that did not retire (a locked one the emulator restarted, a
            // rep iteration) leaves rip in place: step again.
            if regs.rip == address { return .stepAgain }
            return .stepOverDone(address: address, held: held, registers: regs)
        }
        if exception == 1, stepping == nil, let gate = table.gate, pc == gate, dr6 & 1 != 0 { return .gateReached }
        if stepping == nil, let hit = table.engine?.mechanism.hit(exit, rip: regs.rip, table: table) {
            switch hit {
            case let .trap(address): return .trapHit(address: address, registers: regs)
            case let .hardware(address): return .hardwareHit(address: address, registers: regs)
            case .step: return .stepEngine(registers: regs)
            }
        }
        // A #BP that is not ours (or the guest's own int3 inside a step-over): the guest's.
        if exception == 3 { return .reinjectBreakpoint(address: pc) }
        if exception == 1, stepping == nil {
            // No single step or DR of ours was armed to give this #DB: the guest's own.
            if dr6 & 0x4000 != 0 || dr6 & 0xF != 0 { return .reinjectDebug(dr6: dr6) }
        }
        return .fault(.exit(exit))
    }

    private func outcome(_ event: DeviceEvent) -> ExitOutcome {
        switch event {
        case let .exit(status): .end(.exited(status: status))
        case let .reset(why): .end(.reset(why))
        }
    }

    private func lineFailure() -> ExitOutcome? {
        guard let error = interruptLines?.firstFailure else { return nil }
        return .hostFailure(error, while: "raising a device's interrupt line")
    }

    private func noteUnknown(_ space: UnknownAccesses.Space, _ address: UInt64, isWrite: Bool, size: Int, vcpu: some ExitVCPU) -> ExitOutcome {
        var failure: KVMError?
        unknown.note(space, address: address, isWrite: isWrite, size: size, vcpu: vcpu.id) {
            do throws(KVMError) { return try vcpu.registers().rip } catch { failure = error; return 0 }
        }
        if let failure { return .hostFailure(failure, while: "reading rip at an access to an unknown \(space == .port ? "port" : "MMIO address")") }
        return .resume
    }
}
