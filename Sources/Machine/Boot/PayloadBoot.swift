import ELF
import KVM

/// flowtrace's payload boot protocol: a static x86-64 ELF executable loaded at its
/// segments' addresses, every vCPU started at the entry in 64-bit mode at CPL0 with
/// interrupts off, on the loader's identity page tables, with its own stack, rdi = its
/// index and rsi = the vCPU count (see `BootLayout` for where everything goes).
struct PayloadBoot {
    let image: ELFImage
    let layout: BootLayout

    /// The platform this protocol needs.
    let platform = Platform.payload

    init(image: ELFImage, memorySize: UInt64, vcpuCount: Int) throws(MachineError) {
        let layout = try BootLayout(memorySize: memorySize, vcpuCount: vcpuCount)
        try layout.check(image)
        self.image = image
        self.layout = layout
    }

    /// Writes the loader's tables and the image's segments. On the pc platform the page
    /// tables identity-map all of the low 4 GiB, so the LAPIC and IOAPIC pages are reachable.
    func load(into memory: GuestMemory, platform: Platform) throws(KVMError) {
        try layout.writeTables(into: memory, mapLow4G: platform == .pc)
        for seg in image.segments {
            try memory.write(physical: seg.virtualAddress, bytes: seg.data)
            try memory.fill(physical: seg.virtualAddress + seg.fileSize, count: Int(seg.memorySize - seg.fileSize))
        }
        // Each vCPU's entry returns to the exit stub: a return from it ends the guest with its value.
        for i in 0..<layout.vcpuCount {
            try memory.writeUInt64(physical: layout.entryStackPointer(for: i), BootLayout.entryReturnAddress)
        }
    }

    /// vCPU `index`'s state at the entry.
    func setInitialState(of vcpu: VCPU, index: Int) throws(KVMError) {
        try vcpu.setSpecialRegisters(layout.specialRegisters(from: vcpu.specialRegisters()))
        var regs = Registers()
        regs.rip = image.entry
        // Entered as a C function is called (the return address written by `load`).
        regs.rsp = layout.entryStackPointer(for: index)
        regs.rdi = UInt64(index)
        regs.rsi = UInt64(layout.vcpuCount)
        try vcpu.setRegisters(regs)
        try vcpu.setFPU(FPUState())
    }
}

/// How a machine is booted: flowtrace's payload protocol or a kernel protocol.
enum Boot {
    case payload(PayloadBoot)
    case kernel(KernelBoot)

    var platform: Platform {
        switch self {
        case let .payload(b): b.platform
        case let .kernel(b): b.platform
        }
    }

    var layout: BootLayout {
        switch self {
        case let .payload(b): b.layout
        case let .kernel(b): b.layout
        }
    }

    var image: ELFImage {
        switch self {
        case let .payload(b): b.image
        case let .kernel(b): b.image
        }
    }

    var bootProtocol: BootProtocol {
        switch self {
        case .payload: .payload
        case let .kernel(b): b.bootProtocol
        }
    }

    /// Where a kernel boot moved flowtrace's own structures (a kernel loaded below 1 MiB).
    var movedBootArea: KernelBootArea? {
        if case let .kernel(b) = self, b.area != .standard { return b.area }
        return nil
    }

    func load(into memory: GuestMemory, platform: Platform) throws(KVMError) {
        switch self {
        case let .payload(b): try b.load(into: memory, platform: platform)
        case let .kernel(b): try b.load(into: memory)
        }
    }

    func setInitialState(of vcpu: VCPU, index: Int) throws(KVMError) {
        switch self {
        case let .payload(b): try b.setInitialState(of: vcpu, index: index)
        case let .kernel(b): try b.setInitialState(of: vcpu, index: index)
        }
    }
}
