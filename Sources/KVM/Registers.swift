import CKVM

/// The general-purpose registers of a vCPU (`struct kvm_regs`).
public struct Registers: Sendable, Equatable {
    public var rax: UInt64 = 0, rbx: UInt64 = 0, rcx: UInt64 = 0, rdx: UInt64 = 0
    public var rsi: UInt64 = 0, rdi: UInt64 = 0, rsp: UInt64 = 0, rbp: UInt64 = 0
    public var r8: UInt64 = 0, r9: UInt64 = 0, r10: UInt64 = 0, r11: UInt64 = 0
    public var r12: UInt64 = 0, r13: UInt64 = 0, r14: UInt64 = 0, r15: UInt64 = 0
    public var rip: UInt64 = 0, rflags: UInt64 = 0x2

    public init() {}

    init(_ r: kvm_regs) {
        rax = r.rax; rbx = r.rbx; rcx = r.rcx; rdx = r.rdx
        rsi = r.rsi; rdi = r.rdi; rsp = r.rsp; rbp = r.rbp
        r8 = r.r8; r9 = r.r9; r10 = r.r10; r11 = r.r11
        r12 = r.r12; r13 = r.r13; r14 = r.r14; r15 = r.r15
        rip = r.rip; rflags = r.rflags
    }

    var kvm: kvm_regs {
        kvm_regs(rax: rax, rbx: rbx, rcx: rcx, rdx: rdx, rsi: rsi, rdi: rdi, rsp: rsp, rbp: rbp,
                 r8: r8, r9: r9, r10: r10, r11: r11, r12: r12, r13: r13, r14: r14, r15: r15,
                 rip: rip, rflags: rflags)
    }

    /// General-purpose register `index` in encoding order (0 rax, 1 rcx, 2 rdx, 3 rbx,
    /// 4 rsp, 5 rbp, 6 rsi, 7 rdi, 8-15 r8-r15).
    public func general(_ index: Int) -> UInt64 {
        switch index {
        case 0: rax
        case 1: rcx
        case 2: rdx
        case 3: rbx
        case 4: rsp
        case 5: rbp
        case 6: rsi
        case 7: rdi
        case 8: r8
        case 9: r9
        case 10: r10
        case 11: r11
        case 12: r12
        case 13: r13
        case 14: r14
        default: r15
        }
    }
}

/// A segment register's hidden state (`struct kvm_segment`).
public struct Segment: Sendable, Equatable {
    public var base: UInt64 = 0
    public var limit: UInt32 = 0
    public var selector: UInt16 = 0
    public var type: UInt8 = 0
    public var present = false, dpl: UInt8 = 0, defaultSize32 = false, system = false
    public var long = false, granularity4K = false, available = false, unusable = false

    public init() {}

    /// A flat 64-bit code segment (L=1) at privilege `dpl`.
    public static func code64(selector: UInt16, dpl: UInt8 = 0) -> Segment {
        var s = Segment()
        s.limit = 0xFFFF_FFFF; s.selector = selector; s.type = 0xB; s.present = true
        s.dpl = dpl; s.system = true; s.long = true; s.granularity4K = true
        return s
    }

    /// A flat 32-bit execute/read code segment (protected mode).
    public static func code32(selector: UInt16) -> Segment {
        var s = Segment()
        s.limit = 0xFFFF_FFFF; s.selector = selector; s.type = 0xB; s.present = true
        s.system = true; s.defaultSize32 = true; s.granularity4K = true
        return s
    }

    /// A flat read/write data segment at privilege `dpl`.
    public static func data(selector: UInt16, dpl: UInt8 = 0) -> Segment {
        var s = Segment()
        s.limit = 0xFFFF_FFFF; s.selector = selector; s.type = 0x3; s.present = true
        s.dpl = dpl; s.system = true; s.defaultSize32 = true; s.granularity4K = true
        return s
    }

    init(_ k: kvm_segment) {
        base = k.base; limit = k.limit; selector = k.selector; type = k.type
        present = k.present != 0; dpl = k.dpl; defaultSize32 = k.db != 0; system = k.s != 0
        long = k.l != 0; granularity4K = k.g != 0; available = k.avl != 0; unusable = k.unusable != 0
    }

    func apply(to k: inout kvm_segment) {
        k.base = base; k.limit = limit; k.selector = selector; k.type = type
        k.present = present ? 1 : 0; k.dpl = dpl; k.db = defaultSize32 ? 1 : 0; k.s = system ? 1 : 0
        k.l = long ? 1 : 0; k.g = granularity4K ? 1 : 0; k.avl = available ? 1 : 0; k.unusable = unusable ? 1 : 0
    }
}

/// A descriptor-table register (GDTR/IDTR): base and limit.
public struct DescriptorTable: Sendable, Equatable {
    public var base: UInt64
    public var limit: UInt16
    public init(base: UInt64, limit: UInt16) { self.base = base; self.limit = limit }
}

/// The system registers of a vCPU (`struct kvm_sregs`, without the pending-interrupt bitmap).
public struct SpecialRegisters: Sendable, Equatable {
    public var cs = Segment(), ds = Segment(), es = Segment(), fs = Segment()
    public var gs = Segment(), ss = Segment(), tr = Segment(), ldt = Segment()
    public var gdt = DescriptorTable(base: 0, limit: 0), idt = DescriptorTable(base: 0, limit: 0)
    public var cr0: UInt64 = 0, cr2: UInt64 = 0, cr3: UInt64 = 0, cr4: UInt64 = 0, cr8: UInt64 = 0
    public var efer: UInt64 = 0, apicBase: UInt64 = 0

    public init() {}

    init(_ s: kvm_sregs) {
        cs = Segment(s.cs); ds = Segment(s.ds); es = Segment(s.es); fs = Segment(s.fs)
        gs = Segment(s.gs); ss = Segment(s.ss); tr = Segment(s.tr); ldt = Segment(s.ldt)
        gdt = DescriptorTable(base: s.gdt.base, limit: s.gdt.limit)
        idt = DescriptorTable(base: s.idt.base, limit: s.idt.limit)
        cr0 = s.cr0; cr2 = s.cr2; cr3 = s.cr3; cr4 = s.cr4; cr8 = s.cr8
        efer = s.efer; apicBase = s.apic_base
    }

    /// Writes these values into `s`, keeping its interrupt bitmap.
    func apply(to s: inout kvm_sregs) {
        cs.apply(to: &s.cs); ds.apply(to: &s.ds); es.apply(to: &s.es); fs.apply(to: &s.fs)
        gs.apply(to: &s.gs); ss.apply(to: &s.ss); tr.apply(to: &s.tr); ldt.apply(to: &s.ldt)
        s.gdt.base = gdt.base; s.gdt.limit = gdt.limit
        s.idt.base = idt.base; s.idt.limit = idt.limit
        s.cr0 = cr0; s.cr2 = cr2; s.cr3 = cr3; s.cr4 = cr4; s.cr8 = cr8
        s.efer = efer; s.apic_base = apicBase
    }
}

/// The x87/SSE state of a vCPU that the project uses (`struct kvm_fpu`).
public struct FPUState: Sendable, Equatable {
    public var fcw: UInt16 = 0x37F
    public var mxcsr: UInt32 = 0x1F80
    /// xmm0 ... xmm15.
    public var xmm: [UInt128] = Array(repeating: 0, count: 16)
    public init() {}
}

/// The debug registers of a vCPU (`struct kvm_debugregs`).
public struct DebugRegisters: Sendable, Equatable {
    /// DR0 ... DR3.
    public var db: [UInt64] = [0, 0, 0, 0]
    public var dr6: UInt64 = 0xFFFF0FF0
    public var dr7: UInt64 = 0x400
    public init() {}
}

/// What `KVM_SET_GUEST_DEBUG` should make the vCPU do.
public struct GuestDebug: Sendable, Equatable {
    /// Exit with `KVM_EXIT_DEBUG` after every instruction.
    public var singleStep = false
    /// Exit on guest int3 (`KVM_GUESTDBG_USE_SW_BP`).
    public var softwareBreakpoints = false
    /// Use the hardware breakpoints below (`KVM_GUESTDBG_USE_HW_BP`).
    public var hardwareBreakpoints = false
    /// Inject a #BP into the guest on the next entry (re-delivers a guest's own int3).
    public var injectBreakpoint = false
    /// Inject a #DB into the guest on the next entry (re-delivers a guest's own #DB).
    public var injectDebug = false
    /// No interrupt is taken while single-stepping (`KVM_GUESTDBG_BLOCKIRQ`; only where
    /// `KVM_CAP_SET_GUEST_DEBUG2` offers it).
    public var blockInterrupts = false
    /// DR0 ... DR3 addresses, used with `hardwareBreakpoints`.
    public var addresses: [UInt64] = [0, 0, 0, 0]
    /// DR7, used with `hardwareBreakpoints`.
    public var dr7: UInt64 = 0

    public init() {}

    /// True when any debug feature is on.
    public var isEnabled: Bool { singleStep || softwareBreakpoints || hardwareBreakpoints || injectBreakpoint || injectDebug }
}

/// Pending-exception state of a vCPU (part of `struct kvm_vcpu_events`).
public struct VCPUEvents: Sendable, Equatable {
    public var exceptionInjected = false
    public var exceptionNumber: UInt8 = 0
    public var exceptionHasErrorCode = false
    public var exceptionErrorCode: UInt32 = 0
    public var interruptShadow: UInt8 = 0
    public var nmiPending = false
    public init() {}
}

/// A local APIC's 1 KiB register page as `KVM_GET_LAPIC` gives it (registers at their MMIO
/// offsets, 32 bits each at 16-byte spacing).
public struct LocalAPICState: Sendable, Equatable {
    public static let size = 1024
    public var bytes = [UInt8](repeating: 0, count: LocalAPICState.size)
    public init() {}

    public static let lvtLINT0 = 0x350, lvtLINT1 = 0x360
    /// LVT delivery modes (bits 8-10).
    public static let deliveryExtINT: UInt32 = 7, deliveryNMI: UInt32 = 4

    public subscript(register offset: Int) -> UInt32 {
        get { (0..<4).reduce(0) { $0 | UInt32(bytes[offset + $1]) << (8 * UInt32($1)) } }
        set { for i in 0..<4 { bytes[offset + i] = UInt8(truncatingIfNeeded: newValue >> (8 * UInt32(i))) } }
    }

    /// Sets an LVT entry's delivery mode, unmasked (mask bit 16 clear), the rest kept.
    public mutating func setDelivery(_ mode: UInt32, lvt offset: Int) {
        self[register: offset] = self[register: offset] & ~0x1_0700 | mode << 8
    }
}

extension SpecialRegisters {
    /// How this vCPU translates linear addresses now.
    public var paging: PagingMode { PagingMode(cr0: cr0, cr3: cr3, cr4: cr4, efer: efer) }
}
