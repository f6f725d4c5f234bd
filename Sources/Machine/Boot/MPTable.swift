/// An Intel MultiProcessor Specification 1.4 table describing the pc platform: one
/// processor entry per vCPU (APIC id = vCPU index, vCPU 0 the BSP), one ISA bus, KVM's
/// IOAPIC at 0xFEC00000 with ISA IRQ n on pin n (KVM's default routing), LINT0 as ExtINT
/// and LINT1 as NMI. Kernels without ACPI (Linux with CONFIG_X86_MPPARSE) find their CPUs
/// in it. The floating pointer goes in the EBDA's first KiB, the table in the BIOS area.
enum MPTable {
    static let pointerAddress = KernelLayout.mpTable
    static let tableAddress: UInt64 = 0xF0000

    /// The floating pointer ("_MP_") and the configuration table ("PCMP") for `vcpus` CPUs.
    static func bytes(vcpus: Int) -> (pointer: [UInt8], table: [UInt8]) {
        let ioapicID = UInt8(truncatingIfNeeded: vcpus)
        var entries: [UInt8] = []
        for i in 0..<vcpus {
            entries += [0, UInt8(truncatingIfNeeded: i), 0x14, i == 0 ? 3 : 1]   // processor: id, LAPIC version, enabled (+BSP)
            entries += le(UInt32(0x600)) + le(UInt32(0x201)) + [UInt8](repeating: 0, count: 8)   // family 6; FPU, APIC
        }
        entries += [1, 0] + Array("ISA   ".utf8)                                  // bus 0: ISA
        entries += [2, ioapicID, 0x11, 1] + le(KernelLayout.ioapicAddress)         // IOAPIC, enabled
        for irq in 0 ..< 16 {
            entries += [3, 0] + le(UInt16(0)) + [0, UInt8(irq), ioapicID, UInt8(irq)]   // INT, conforming, bus 0 irq -> pin
        }
        entries += [4, 3] + le(UInt16(0)) + [0, 0, 0xFF, 0]                        // LINT0: ExtINT, every LAPIC
        entries += [4, 1] + le(UInt16(0)) + [0, 0, 0xFF, 1]                        // LINT1: NMI
        let count = UInt16(vcpus + 1 + 1 + 16 + 2)
        var table = Array("PCMP".utf8) + le(UInt16(44 + entries.count)) + [4, 0]
        table += Array("FLOWTRCE".utf8) + Array("PC          ".utf8)
        table += le(UInt32(0)) + le(UInt16(0)) + le(count) + le(KernelLayout.lapicAddress) + le(UInt16(0)) + [0, 0]
        table += entries
        table[7] = checksum(table)
        var pointer = Array("_MP_".utf8) + le(UInt32(tableAddress)) + [1, 4, 0] + [0, 0, 0, 0, 0]
        pointer[10] = checksum(pointer)
        return (pointer, table)
    }

    /// The byte that makes `bytes` sum to zero (mod 256).
    static func checksum(_ bytes: [UInt8]) -> UInt8 {
        0 &- bytes.reduce(0, &+)
    }
}
