import ELF
import KVM

/// Where the loader puts its own structures in guest-physical memory, and the checks
/// an image must pass to fit around them.
///
/// ```
/// 0x1000   GDT: null, 64-bit code (0x08), data (0x10)
/// 0x1800   the entry's return address: `mov edx, 0xF4; out dx, eax; cli; hlt` (a guest
///          whose entry function returns ends with its return value as the exit status)
/// 0x2000   PML4        0x3000  PDPT      0x4000.. one page directory per GiB
/// 0x8000   out-of-line stepping: a 32-byte slot per vCPU (up to 1024 vCPUs)
/// 0x10000  first byte an image may use
/// ...      image segments (identity-mapped: loaded at their virtual address)
/// top      one 64 KiB stack per vCPU, vCPU 0 at the very top
/// ```
/// All of RAM is identity-mapped with 2 MiB pages, so RAM is a multiple of 2 MiB, at most 4 GiB
/// (on the pc platform the whole low 4 GiB, device pages included).
public struct BootLayout: Sendable, Equatable {
    public static let gdtAddress: UInt64 = 0x1000
    /// Where a payload's entry returns to (its initial [rsp]): the return value (eax) goes
    /// to the exit port 0xF4.
    public static let entryReturnAddress: UInt64 = 0x1800
    static let entryReturnCode: [UInt8] = [0xBA, 0xF4, 0x00, 0x00, 0x00,  // mov edx, 0xf4
                                           0xEF,                          // out dx, eax
                                           0xFA, 0xF4, 0xEB, 0xFD]        // cli; hlt; jmp hlt
    public static let pml4Address: UInt64 = 0x2000
    public static let pdptAddress: UInt64 = 0x3000
    public static let pageDirectoriesAddress: UInt64 = 0x4000
    public static let outOfLineSlots: UInt64 = 0x8000
    public static let outOfLineSlotSize: UInt64 = 32
    public static let imageFloor: UInt64 = 0x10000
    public static let stackSize: UInt64 = 64 << 10
    public static let codeSelector: UInt16 = 0x08
    public static let dataSelector: UInt16 = 0x10
    public static let minimumMemory: UInt64 = 2 << 20
    public static let maximumMemory: UInt64 = 4 << 30

    public let memorySize: UInt64
    public let vcpuCount: Int

    /// The page-table root every vCPU starts with.
    public var cr3: UInt64 { Self.pml4Address }

    /// Guest-physical range images may occupy.
    public var imageRange: Range<UInt64> { Self.imageFloor ..< stacksBottom }

    /// Lowest byte of the vCPU stacks.
    public var stacksBottom: UInt64 { memorySize - UInt64(vcpuCount) * Self.stackSize }

    /// Where vCPU `index` single-steps displaced instructions (guest-physical and, on the boot
    /// page tables, guest-virtual); nil past the slots' room.
    public static func outOfLineSlot(for index: Int) -> UInt64? {
        let slot = outOfLineSlots + UInt64(index) * outOfLineSlotSize
        return slot + outOfLineSlotSize <= imageFloor ? slot : nil
    }

    /// The top of vCPU `index`'s stack (16-byte aligned).
    public func stackTop(for index: Int) -> UInt64 { memorySize - UInt64(index) * Self.stackSize }

    /// Initial rsp of vCPU `index`: the entry is called as a C function is, rsp + 8 16-byte
    /// aligned, [rsp] the return address `entryReturnAddress`.
    public func entryStackPointer(for index: Int) -> UInt64 { stackTop(for: index) - 8 }

    /// Validates the memory size against the layout's own needs.
    public init(memorySize: UInt64, vcpuCount: Int) throws(MachineError) {
        guard memorySize >= Self.minimumMemory, memorySize >= Self.imageFloor + UInt64(vcpuCount) * Self.stackSize else {
            throw MachineError.memorySize(memorySize, reason: "is too small: the loader needs at least 2M")
        }
        guard memorySize % Self.minimumMemory == 0 else {
            throw MachineError.memorySize(memorySize, reason: "must be a multiple of 2M (RAM is mapped with 2 MiB pages)")
        }
        guard memorySize <= Self.maximumMemory else {
            throw MachineError.memorySize(memorySize, reason: "is above the 4G the loader's page tables map")
        }
        self.memorySize = memorySize
        self.vcpuCount = vcpuCount
    }

    /// The layout of a kernel boot (`KernelLayout`): the same loader tables and stepping
    /// slots, no payload stacks; RAM a multiple of 2 MiB up to `KernelLayout.maximumMemory`.
    public init(kernelMemory memorySize: UInt64, vcpuCount: Int) throws(MachineError) {
        guard memorySize >= Self.minimumMemory * 2 else {
            throw MachineError.memorySize(memorySize, reason: "is too small: a kernel boot needs at least 4M")
        }
        guard memorySize % Self.minimumMemory == 0 else {
            throw MachineError.memorySize(memorySize, reason: "must be a multiple of 2M")
        }
        guard memorySize <= KernelLayout.maximumMemory else {
            throw MachineError.memorySize(memorySize, reason: "is above the \(formatSize(KernelLayout.maximumMemory)) flowtrace gives a kernel")
        }
        self.memorySize = memorySize
        self.vcpuCount = vcpuCount
    }

    /// Checks that every segment of `image` fits between the loader's tables and the stacks.
    public func check(_ image: ELFImage) throws(MachineError) {
        for (i, seg) in image.segments.enumerated() {
            let start = seg.virtualAddress, end = seg.virtualAddress + seg.memorySize
            if start >= Self.imageFloor, end <= stacksBottom { continue }
            // Past the end of RAM but placeable in a bigger one: say how much to ask for.
            if start >= Self.imageFloor, end <= Self.maximumMemory - UInt64(vcpuCount) * Self.stackSize {
                let needed = roundUp(end + UInt64(vcpuCount) * Self.stackSize, to: Self.minimumMemory)
                throw MachineError.memoryTooSmall(path: image.path, given: memorySize, needed: needed)
            }
            throw MachineError.segmentOutsideRAM(path: image.path, index: i, start: start, end: end, usable: imageRange)
        }
    }

    /// Writes the GDT and the identity page tables into `memory`: RAM only, or with
    /// `mapLow4G` all of the first 4 GiB (RAM and the device pages above it; the pc platform).
    func writeTables(into memory: GuestMemory, mapLow4G: Bool = false) throws(KVMError) {
        try memory.write(physical: Self.entryReturnAddress, bytes: Self.entryReturnCode)
        try memory.writeUInt64(physical: Self.gdtAddress, 0)
        try memory.writeUInt64(physical: Self.gdtAddress + 8, 0x00AF_9A00_0000_FFFF)   // code: L=1, P, DPL0, exec/read
        try memory.writeUInt64(physical: Self.gdtAddress + 16, 0x00CF_9200_0000_FFFF)  // data: P, DPL0, read/write
        let mapped = mapLow4G ? Self.maximumMemory : memorySize
        let gib = Int((mapped + (1 << 30) - 1) >> 30)
        try memory.writeUInt64(physical: Self.pml4Address, Self.pdptAddress | 0x3)
        for g in 0..<gib {
            let pd = Self.pageDirectoriesAddress + UInt64(g) * 0x1000
            try memory.writeUInt64(physical: Self.pdptAddress + UInt64(g) * 8, pd | 0x3)
            for e in 0..<512 {
                let phys = (UInt64(g) << 30) | (UInt64(e) << 21)
                guard phys < mapped else { break }
                try memory.writeUInt64(physical: pd + UInt64(e) * 8, phys | 0x83)  // P, RW, PS (2 MiB)
            }
        }
    }

    /// The 64-bit CPL0 system state every vCPU starts with.
    func specialRegisters(from base: SpecialRegisters) -> SpecialRegisters {
        var s = base
        s.cs = .code64(selector: Self.codeSelector)
        let data = Segment.data(selector: Self.dataSelector)
        s.ds = data; s.es = data; s.fs = data; s.gs = data; s.ss = data
        s.gdt = DescriptorTable(base: Self.gdtAddress, limit: 3 * 8 - 1)
        // No IDT: an exception the guest cannot handle becomes a triple fault we report.
        s.idt = DescriptorTable(base: 0, limit: 0)
        s.cr0 = 0x8005_0033      // PE MP ET NE WP AM PG
        s.cr3 = cr3
        s.cr4 = 0x620            // PAE OSFXSR OSXMMEXCPT
        s.efer = 0x500           // LME LMA
        return s
    }
}

func roundUp(_ v: UInt64, to m: UInt64) -> UInt64 { (v + m - 1) / m * m }
