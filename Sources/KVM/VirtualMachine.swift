import CKVM
import Glibc
import Locking


/// A KVM virtual machine: guest RAM slots and vCPUs.
public final class VirtualMachine: Sendable {
    let fd: Int32
    /// The host this VM was created on (kept alive as long as the VM).
    public let host: KVMHost
    private let slots = Locked<[GuestMemory]>([])

    init(host: KVMHost, fd: Int32) {
        self.host = host
        self.fd = fd
    }

    deinit { close(fd) }

    /// Makes `memory` the guest's physical RAM: one memslot per range (`GuestMemory.regions`),
    /// numbered from `slot`. Wraps `KVM_SET_USER_MEMORY_REGION`.
    public func map(_ memory: GuestMemory, slot: UInt32 = 0) throws(KVMError) {
        for (i, r) in memory.regions.enumerated() {
            var region = kvm_userspace_memory_region(
                slot: slot + UInt32(i), flags: 0, guest_phys_addr: r.guestPhysical,
                memory_size: r.size, userspace_addr: memory.hostAddress + r.offset)
            _ = try checked(ckvm_set_user_memory_region(fd, &region), "KVM_SET_USER_MEMORY_REGION")
        }
        // The VM must keep the mapping alive while the guest can touch it.
        slots.withLock { $0.append(memory) }
    }

    // MARK: The in-kernel platform (the pc platform)

    /// Creates the in-kernel interrupt controllers: PIC pair, IOAPIC, and a local APIC per
    /// vCPU created afterwards. Wraps `KVM_CREATE_IRQCHIP`; call before creating vCPUs.
    public func createInterruptController() throws(KVMError) {
        _ = try checked(ckvm_create_irqchip(fd), "KVM_CREATE_IRQCHIP")
    }

    /// Creates the in-kernel 8254 PIT (ports 0x40-0x43, IRQ 0) with the speaker port 0x61
    /// handled in the kernel too. Wraps `KVM_CREATE_PIT2`; needs the irqchip.
    public func createPIT() throws(KVMError) {
        var config = kvm_pit_config()
        config.flags = ckvm_pit_speaker_dummy
        _ = try checked(ckvm_create_pit2(fd, &config), "KVM_CREATE_PIT2")
    }

    /// Where KVM keeps the three pages of its real-mode TSS (Intel needs them; outside RAM).
    /// Wraps `KVM_SET_TSS_ADDR`.
    public func setTSSAddress(_ address: UInt64) throws(KVMError) {
        _ = try checked(ckvm_set_tss_addr(fd, UInt(address)), "KVM_SET_TSS_ADDR")
    }

    /// Where KVM keeps its identity-map page table page (Intel, for unpaged real mode).
    /// Wraps `KVM_SET_IDENTITY_MAP_ADDR`.
    public func setIdentityMapAddress(_ address: UInt64) throws(KVMError) {
        var a = address
        _ = try checked(ckvm_set_identity_map_addr(fd, &a), "KVM_SET_IDENTITY_MAP_ADDR")
    }

    /// Drives interrupt line `irq` (0-15: ISA lines through PIC and IOAPIC; 16-23: IOAPIC).
    /// Wraps `KVM_IRQ_LINE`.
    public func setInterruptLine(_ irq: UInt32, level: Bool) throws(KVMError) {
        var l = kvm_irq_level()
        l.irq = irq
        l.level = level ? 1 : 0
        _ = try checked(ckvm_irq_line(fd, &l), "KVM_IRQ_LINE")
    }

    /// Creates vCPU `id` and maps its `kvm_run` area. Wraps `KVM_CREATE_VCPU` and `mmap(2)`.
    /// Registers are exchanged through `KVM_CAP_SYNC_REGS` when the host has it and
    /// `syncRegisters` allows it (false: always the register ioctls).
    public func makeVCPU(id: Int, syncRegisters allowSync: Bool = true) throws(KVMError) -> VCPU {
        let vfd = try checked(ckvm_create_vcpu(fd, UInt(id)), "KVM_CREATE_VCPU")
        let size = host.vcpuMapSize
        let p = mmap(nil, size, PROT_READ | PROT_WRITE, MAP_SHARED, vfd, 0)
        guard let p, p != MAP_FAILED else {
            let e = errno
            close(vfd)
            throw KVMError.system("mmap of vCPU \(id)'s kvm_run", errno: e)
        }
        let sync: Int
        do { sync = try host.capability(.syncRegs) } catch {
            munmap(p, size)
            close(vfd)
            throw error
        }
        let useSync = allowSync && UInt64(sync) & ckvm_sync_x86_regs != 0
        let useSyncSregs = useSync && UInt64(sync) & ckvm_sync_x86_sregs != 0
        return VCPU(vm: self, id: id, fd: vfd, run: p, mapSize: size, syncRegisters: useSync, syncSystemRegisters: useSyncSregs)
    }
}
