import Devices
import KVM

/// What a VM is built with around the guest's RAM and vCPUs.
public enum Platform: String, Sendable, CaseIterable, CustomStringConvertible {
    /// flowtrace's payloads: no interrupt controller, interrupts never arrive, a guest `hlt`
    /// exits to flowtrace and ends its vCPU.
    case payload
    /// A PC: KVM's in-kernel irqchip (PIC pair, IOAPIC, a local APIC per vCPU) and 8254
    /// PIT, CPUID and boot MSRs set as a PC's firmware leaves them. `hlt` waits inside KVM
    /// for the next interrupt and never exits.
    case pc

    public var description: String { rawValue }

    /// Whether the VM has the in-kernel irqchip.
    public var hasInterruptController: Bool { self == .pc }

    /// Why an engine cannot work on this platform whatever the host does (nil: it can).
    public func restriction(_ engine: BreakpointEngine) -> String? {
        if self == .pc, engine == .hlt {
            return "on the pc platform: KVM's in-kernel irqchip handles hlt itself and never exits"
        }
        return nil
    }
}

/// The platform a user asks for.
public enum PlatformRequest: Sendable, Equatable, CustomStringConvertible {
    /// What the image's boot protocol needs (flowtrace's payload ELF files: `payload`).
    case auto
    case platform(Platform)

    public var description: String {
        switch self {
        case .auto: "auto"
        case let .platform(p): p.rawValue
        }
    }

    /// The platform for an image whose boot protocol needs `needed`.
    public func resolve(needed: Platform) -> Platform {
        if case let .platform(p) = self { return p }
        return needed
    }
}

/// The VM- and vCPU-level set-up of a platform (nothing here for `payload`).
enum PlatformSetup {
    /// Guest-physical addresses KVM needs for its own pages on Intel hosts (real-mode TSS,
    /// identity-map page table): just below the BIOS area at the top of 4 GiB, never RAM.
    static let tssAddress: UInt64 = 0xFFFB_D000
    static let identityMapAddress: UInt64 = 0xFFFB_C000

    /// VM-level: TSS and identity-map addresses, irqchip, PIT. Before any vCPU exists.
    static func configure(_ vm: VirtualMachine, for platform: Platform) throws(KVMError) {
        guard platform == .pc else { return }
        try vm.setTSSAddress(tssAddress)
        try vm.setIdentityMapAddress(identityMapAddress)
        try vm.createInterruptController()
        try vm.createPIT()
    }

    /// vCPU-level: CPUID (normalised for every platform), and for `pc` the LAPIC's LINT0
    /// as ExtINT (the PIC's output) and LINT1 as NMI, as firmware programs them, and the
    /// MSRs a PC's firmware leaves set.
    static func configure(_ vcpu: VCPU, index: Int, count: Int, hostCPUID: [CPUIDTable.Entry], platform: Platform) throws(KVMError) {
        try vcpu.setCPUID(CPUIDTable(entries: CPUIDNormalization.normalize(hostCPUID, vcpu: index, count: count, platform: platform)))
        guard platform == .pc else { return }
        var lapic = try vcpu.localAPIC()
        lapic.setDelivery(LocalAPICState.deliveryExtINT, lvt: LocalAPICState.lvtLINT0)
        lapic.setDelivery(LocalAPICState.deliveryNMI, lvt: LocalAPICState.lvtLINT1)
        try vcpu.setLocalAPIC(lapic)
        try vcpu.setMSRs(bootMSRs)
    }

    /// The MSRs set at boot: the fast-syscall MSRs cleared, fast strings on, MTRRs on with
    /// write-back as the default memory type.
    static let bootMSRs: [(index: UInt32, value: UInt64)] = [
        (0x174, 0), (0x175, 0), (0x176, 0),                 // IA32_SYSENTER_CS/ESP/EIP
        (0xC000_0081, 0), (0xC000_0082, 0), (0xC000_0083, 0), (0xC000_0084, 0),  // STAR LSTAR CSTAR SFMASK
        (0xC000_0102, 0),                                   // KERNEL_GS_BASE
        (0x1A0, 1),                                         // IA32_MISC_ENABLE: fast strings
        (0x2FF, 1 << 11 | 6),                               // MTRRdefType: enabled, WB
    ]
}

/// CPUID as the guest sees it: the host's supported leaves with the topology of this VM
/// (APIC ids, logical processor counts), the hypervisor bit set, and what the platform
/// does not provide removed. Pure, so it is tested without KVM.
public enum CPUIDNormalization {
    public static func normalize(_ host: [CPUIDTable.Entry], vcpu: Int, count: Int, platform: Platform) -> [CPUIDTable.Entry] {
        let apicID = UInt32(vcpu)
        return host.map { e in
            var e = e
            switch e.function {
            case 1:
                // EBX: APIC id (31:24), logical processors per package (23:16).
                e.ebx = e.ebx & 0x0000_FFFF | apicID << 24 | UInt32(min(count, 255)) << 16
                if count > 1 { e.edx |= 1 << 28 } else { e.edx &= ~(1 << 28) }   // HTT
                e.ecx |= 1 << 31                                                   // hypervisor
                if !platform.hasInterruptController {
                    e.edx &= ~(1 << 9)                    // no APIC
                    e.ecx &= ~(1 << 21 | 1 << 24)         // no x2APIC, no TSC deadline
                }
            case 4:
                // Cores per package - 1 (31:26); one thread per cache.
                e.eax = e.eax & 0x03FF_FFFF | UInt32(min(count, 64) - 1) << 26
                e.eax &= ~(0xFFF << 14)
            case 6:
                // Thermal and power management: the host's, not the guest's.
                e.eax = 0; e.ebx = 0; e.ecx = 0; e.edx = 0
            case 0xB, 0x1F:
                e.edx = apicID
                switch e.index {
                case 0: e.eax = 0; e.ebx = 1; e.ecx = 1 << 8                     // SMT level: 1 thread
                case 1: e.eax = bits(count); e.ebx = UInt32(count); e.ecx = 2 << 8 | 1   // core level
                default: e.eax = 0; e.ebx = 0; e.ecx = e.index                   // no more levels
                }
            case 0x8000_0008:
                e.ecx = e.ecx & ~0xFF | UInt32(min(count, 256) - 1)           // AMD: cores - 1
            default:
                break
            }
            return e
        }
    }

    /// Bits an APIC id needs for `n` processors.
    static func bits(_ n: Int) -> UInt32 {
        var b: UInt32 = 0
        while (1 << b) < n { b += 1 }
        return b
    }
}
