/// The guest-physical memory map of a kernel boot: one source, rendered as each protocol
/// wants it (Linux's e820 table, Multiboot's mmap, Multiboot 2's memory-map tag, PVH's
/// memmap). See `KernelLayout` for what the reserved ranges hold.
public struct MemoryMap: Sendable, Equatable {
    public enum Kind: UInt32, Sendable {
        /// Usable RAM (e820 type 1).
        case ram = 1
        /// Reserved (e820 type 2).
        case reserved = 2
    }

    public struct Entry: Sendable, Equatable {
        public var base: UInt64
        public var size: UInt64
        public var kind: Kind
        public var end: UInt64 { base + size }
        public init(base: UInt64, size: UInt64, kind: Kind) { self.base = base; self.size = size; self.kind = kind }
    }

    public let entries: [Entry]

    /// The PC's memory map for `ramSize` bytes of RAM: RAM below the PCI hole (3 GiB, where
    /// cloud-hypervisor puts its 32-bit device window) and the rest from 4 GiB on.
    /// `bootArea`: where flowtrace's boot structures are when a kernel loads below 1 MiB
    /// (then low RAM is usable from 0x1000 and that range above 1 MiB is reserved); nil: the
    /// standard place, the first 0x30000 bytes.
    public init(ramSize: UInt64, bootArea: Range<UInt64>? = nil) {
        let low = min(ramSize, KernelLayout.pciHoleStart)
        let lowStart = bootArea == nil ? KernelLayout.lowReservedEnd : KernelLayout.lowRAMStart
        var e: [Entry] = [
            Entry(base: 0, size: lowStart, kind: .reserved),
            Entry(base: lowStart, size: KernelLayout.mpTable - lowStart, kind: .ram),
            Entry(base: KernelLayout.mpTable, size: 0xA0000 - KernelLayout.mpTable, kind: .reserved),
            Entry(base: 0xF0000, size: 0x10000, kind: .reserved),
        ]
        if let b = bootArea, b.lowerBound >= KernelLayout.kernelLoad, b.upperBound < low {
            if b.lowerBound > KernelLayout.kernelLoad { e.append(Entry(base: KernelLayout.kernelLoad, size: b.lowerBound - KernelLayout.kernelLoad, kind: .ram)) }
            e.append(Entry(base: b.lowerBound, size: UInt64(b.count), kind: .reserved))
            e.append(Entry(base: b.upperBound, size: low - b.upperBound, kind: .ram))
        } else if low > KernelLayout.kernelLoad {
            e.append(Entry(base: KernelLayout.kernelLoad, size: low - KernelLayout.kernelLoad, kind: .ram))
        }
        if ramSize > low { e.append(Entry(base: 4 << 30, size: ramSize - low, kind: .ram)) }
        entries = e
    }

    /// End of the RAM below the hole that starts at 1 MiB (past a reserved boot area).
    public var lowRAMEnd: UInt64 {
        entries.filter { $0.kind == .ram && $0.base >= KernelLayout.kernelLoad && $0.base < KernelLayout.pciHoleStart }.map(\.end).max()
            ?? KernelLayout.kernelLoad
    }

    /// Multiboot's `mem_lower` (KiB of conventional memory, as firmware reports it: up to
    /// the EBDA) and `mem_upper` (KiB of RAM from 1 MiB to the first hole).
    public var lowerKiB: UInt32 { UInt32(KernelLayout.mpTable >> 10) }
    public var upperKiB: UInt32 { UInt32((lowRAMEnd - KernelLayout.kernelLoad) >> 10) }

    /// Linux's `boot_params.e820_table`: 20-byte {addr, size, type} entries.
    public var e820Bytes: [UInt8] {
        entries.flatMap { le($0.base) + le($0.size) + le($0.kind.rawValue) }
    }

    /// Multiboot 1's mmap: 24-byte entries {size = 20, base, length, type}.
    public var multibootBytes: [UInt8] {
        entries.flatMap { le(UInt32(20)) + le($0.base) + le($0.size) + le($0.kind.rawValue) }
    }

    /// PVH's memmap and Multiboot 2's entries: 24 bytes {base, size, type, reserved}.
    public var entryBytes24: [UInt8] {
        entries.flatMap { le($0.base) + le($0.size) + le($0.kind.rawValue) + le(UInt32(0)) }
    }
}

/// Little-endian bytes of an integer.
func le<T: FixedWidthInteger>(_ v: T) -> [UInt8] {
    (0 ..< T.bitWidth / 8).map { UInt8(truncatingIfNeeded: v >> ($0 * 8)) }
}

/// Where a kernel boot puts things in guest-physical memory (the README's "Booting kernels"
/// shows the same table):
///
/// ```
/// 0x0000_0000  reserved  (e820)     zero page 0 (no real-mode IVT or BIOS data)
/// 0x0000_1000  reserved             GDT: 0x08 code32, 0x10 code64, 0x18 data (flat)
/// 0x0000_2000  reserved             PML4, PDPT, 4 page directories: low 4 GiB identity, 2M pages
/// 0x0000_8000  reserved             out-of-line stepping slots (32 bytes per vCPU)
/// 0x0001_0000  reserved             boot information: zero page / hvm_start_info / MBI,
///                                   memory maps, module lists, command lines
/// 0x0002_F000  reserved             4 KiB boot stack (rsp/esp = 0x30000 at the entry)
/// 0x0003_0000  RAM
/// 0x0009_FC00  reserved             MP table (EBDA)
/// 0x000F_0000  reserved             BIOS area (empty)
/// 0x0010_0000  RAM                  the kernel (bzImage protected-mode code at 1 MiB; ELF
///                                   segments at their physical addresses); Multiboot modules
///                                   after it; Linux initrd / PVH modules at the top of low RAM
/// 0xC000_0000  hole (not in e820)   IOAPIC 0xFEC00000, LAPIC 0xFEE00000
/// 0x1_0000_0000 RAM                 the rest of RAM above 3 GiB
/// ```
public enum KernelLayout {
    public static let gdt: UInt64 = BootLayout.gdtAddress
    public static let lowReservedEnd: UInt64 = 0x30000
    /// Low RAM a kernel may load into (Multiboot, PVH): from here to the EBDA (`mpTable`).
    public static let lowRAMStart: UInt64 = 0x1000
    public static let bootInfo: Range<UInt64> = 0x10000 ..< 0x2F000
    public static let bootStackTop: UInt64 = 0x30000
    public static let mpTable: UInt64 = 0x9FC00
    public static let kernelLoad: UInt64 = 0x100000
    public static let pciHoleStart: UInt64 = 3 << 30
    public static let ioapicAddress: UInt32 = 0xFEC0_0000
    public static let lapicAddress: UInt32 = 0xFEE0_0000
    public static let code32Selector: UInt16 = 0x08
    public static let code64Selector: UInt16 = 0x10
    public static let dataSelector: UInt16 = 0x18
    /// RAM a kernel boot may be given: a multiple of 2 MiB, up to 64 GiB.
    public static let maximumMemory: UInt64 = 64 << 30
}
