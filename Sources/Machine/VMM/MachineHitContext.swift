import FlowTrace
import KVM

/// One vCPU's state at an exit, as probes read it. General-purpose registers come from the
/// exit (sync regs: no ioctl); system, FPU and debug registers are fetched on first use and
/// kept until the next exit. One per vCPU, reused for every hit: no allocation per hit.
final class VCPUSnapshot: @unchecked Sendable {
    // SAFETY: used only by the thread that drives `vcpu` (the Machine's rule), including
    // the callbacks run on that thread during a hit.
    let vcpu: VCPU
    let memory: GuestMemory
    var registers = Registers()
    private var sregs: SpecialRegisters?
    private var fpu: FPUState?
    private var debug: DebugRegisters?

    init(vcpu: VCPU, memory: GuestMemory) {
        self.vcpu = vcpu
        self.memory = memory
    }

    /// Starts a new exit: `registers` are the exit's; the rest is fetched again if asked for.
    func reset(_ regs: Registers) {
        registers = regs
        sregs = nil
        fpu = nil
        debug = nil
    }

    func special() throws(KVMError) -> SpecialRegisters {
        if let s = sregs { return s }
        let s = try vcpu.specialRegisters()
        sregs = s
        return s
    }

    /// The paging mode for memory reads: from the system registers when this exit has read
    /// them already, else straight from the vCPU (no segment conversion).
    func paging() throws(KVMError) -> PagingMode {
        if let s = sregs { return s.paging }
        return try vcpu.paging()
    }

    func fpuState() throws(KVMError) -> FPUState {
        if let f = fpu { return f }
        let f = try vcpu.fpu()
        fpu = f
        return f
    }

    func debugRegisters() throws(KVMError) -> DebugRegisters {
        if let d = debug { return d }
        let d = try vcpu.debugRegisters()
        debug = d
        return d
    }
}

/// The `HitContext` a machine hands to trace modules.
struct MachineHitContext: HitContext {
    let snapshot: VCPUSnapshot

    var vcpu: Int { snapshot.vcpu.id }

    func read(_ register: X86Register) throws(TraceError) -> RegisterValue {
        let raw: UInt128
        do throws(KVMError) {
            raw = try rawValue(register.storage)
        } catch {
            throw TraceError.registerUnreadable(register.name, reason: error.description)
        }
        return RegisterValue(width: register.width, raw: raw, shift: register.shift)
    }

    func readInteger(_ register: X86Register) throws(TraceError) -> UInt64 {
        do throws(KVMError) {
            return register.integer(fromStorage: try rawValue(register.storage))
        } catch {
            throw TraceError.registerUnreadable(register.name, reason: error.description)
        }
    }

    private func rawValue(_ storage: X86Register.Storage) throws(KVMError) -> UInt128 {
        let r = snapshot.registers
        switch storage {
        case let .general(i): return UInt128(r.general(i))
        case .rip: return UInt128(r.rip)
        case .rflags: return UInt128(r.rflags)
        case let .segmentSelector(i): return UInt128(try segment(i).selector)
        case let .segmentBase(i): return UInt128(try segment(i).base)
        case let .control(n):
            let s = try snapshot.special()
            switch n {
            case 0: return UInt128(s.cr0)
            case 2: return UInt128(s.cr2)
            case 3: return UInt128(s.cr3)
            case 4: return UInt128(s.cr4)
            default: return UInt128(s.cr8)
            }
        case .efer: return UInt128(try snapshot.special().efer)
        case let .debug(n):
            let d = try snapshot.debugRegisters()
            switch n {
            case 0...3: return UInt128(d.db[n])
            case 6: return UInt128(d.dr6)
            default: return UInt128(d.dr7)
            }
        case .gdtr:
            let t = try snapshot.special().gdt
            return UInt128(t.limit) << 64 | UInt128(t.base)
        case .idtr:
            let t = try snapshot.special().idt
            return UInt128(t.limit) << 64 | UInt128(t.base)
        case let .xmm(i): return try snapshot.fpuState().xmm[i]
        }
    }

    private func segment(_ i: Int) throws(KVMError) -> Segment {
        let s = try snapshot.special()
        switch i {
        case 0: return s.es
        case 1: return s.cs
        case 2: return s.ss
        case 3: return s.ds
        case 4: return s.fs
        default: return s.gs
        }
    }

    func readMemory(at address: UInt64, into buffer: inout MutableRawSpan) throws(TraceError) {
        do throws(KVMError) {
            let paging = try snapshot.paging()
            try snapshot.memory.read(virtual: address, into: &buffer, paging: paging)
        } catch {
            throw TraceError.memoryUnreadable(address: address, size: buffer.byteCount, reason: error.description)
        }
    }
}
