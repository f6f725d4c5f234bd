import KVM

/// Where flowtrace puts its own structures for a kernel boot: below 1 MiB (`standard`:
/// GDT at 0x1000, boot information 0x10000-0x2f000, stack top 0x30000), or, for a kernel
/// loaded there, in the 136 KiB after the kernel (`after`), reserved in the memory map.
public struct KernelBootArea: Sendable, Equatable {
    public var gdt: UInt64
    public var bootInfo: Range<UInt64>
    public var stackTop: UInt64
    /// All of it, for the memory map and the placement of what follows.
    public var range: Range<UInt64>

    public static let standard = KernelBootArea(gdt: KernelLayout.gdt, bootInfo: KernelLayout.bootInfo,
                                                stackTop: KernelLayout.bootStackTop, range: 0 ..< KernelLayout.lowReservedEnd)

    /// From the first 64 KiB boundary at or after `address`: GDT, boot information, stack.
    public static func after(_ address: UInt64) -> KernelBootArea {
        let base = (address + 0xFFFF) & ~0xFFFF
        let info = base + 0x1000 ..< base + 0x1000 + UInt64(KernelLayout.bootInfo.count)
        return KernelBootArea(gdt: base, bootInfo: info, stackTop: info.upperBound + 0x1000, range: base ..< info.upperBound + 0x1000)
    }
}

/// Bump allocation of boot information in a `KernelBootArea`.
struct BootInfoArea {
    let range: Range<UInt64>
    var next: UInt64
    var writes: [(address: UInt64, bytes: [UInt8])] = []

    init(range: Range<UInt64>) { self.range = range; next = range.lowerBound }

    mutating func place(_ bytes: [UInt8], align: UInt64 = 16) throws(MachineError) -> UInt64 {
        let at = roundUp(next, to: align)
        guard at + UInt64(bytes.count) <= range.upperBound else {
            throw MachineError.bootFile("the boot information (command lines, memory map, module list) is over the \(range.count / 1024) KiB flowtrace reserves for it; shorten --append or the module arguments")
        }
        writes.append((at, bytes))
        next = at + UInt64(bytes.count)
        return at
    }
}
