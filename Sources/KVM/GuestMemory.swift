import Glibc

/// The guest's RAM: one host mapping seen by the guest as physical `0 ..< size`, or, with a
/// hole below 4 GiB (the pc platform's PCI/device window), as two ranges: `0 ..< lowSize` and
/// `4 GiB ..< 4 GiB + (size - lowSize)`, each its own memslot.
///
/// Every access is bounds-checked against `size`, including the page-table entries a
/// guest-virtual walk reads, so nothing the guest writes can make the host touch memory
/// outside its RAM.
public final class GuestMemory: @unchecked Sendable {
    // SAFETY: the mapping lives as long as this object; all accesses go through the
    // bounds checks below. Concurrent guest writes race with host reads by nature (as on
    // real hardware); host-side writers are serialized by their owners (loader, breakpoint
    // engines), which run while the affected vCPUs are out of KVM_RUN.
    let base: UnsafeMutableRawPointer
    /// Size in bytes (all of RAM).
    public let size: UInt64
    /// RAM below the hole: guest-physical `0 ..< lowSize` (all of RAM without a hole).
    public let lowSize: UInt64
    /// Where RAM above the hole starts.
    public static let highBase: UInt64 = 4 << 30
    /// Host writes into guest RAM to fail on purpose (the fault-injection suite).
    public let faults = FaultInjector()

    /// Maps `size` bytes of zeroed anonymous memory. With `holeStart` (page-aligned, at most
    /// 4 GiB) RAM past it is seen at 4 GiB and up. Wraps `mmap(2)`.
    public init(size: UInt64, holeStart: UInt64? = nil) throws(KVMError) {
        guard size > 0, size % 4096 == 0 else {
            throw KVMError.invalidArgument("guest RAM size \(size) must be a positive multiple of 4096")
        }
        if let h = holeStart, h % 4096 != 0 || h > Self.highBase || h == 0 {
            throw KVMError.invalidArgument("guest RAM hole start \(hex(h)) must be a page-aligned address in 4K..4G")
        }
        lowSize = min(size, holeStart ?? size)
        let p = mmap(nil, Int(size), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
        guard let p, p != MAP_FAILED else { throw KVMError.system("mmap of \(size) bytes of guest RAM", errno: errno) }
        base = p
        self.size = size
    }

    deinit { munmap(base, Int(size)) }

    /// The host address of guest RAM, for `KVM_SET_USER_MEMORY_REGION`.
    var hostAddress: UInt64 { UInt64(UInt(bitPattern: base)) }

    /// The memslots: guest-physical start, size, and offset into the host mapping.
    public var regions: [(guestPhysical: UInt64, size: UInt64, offset: UInt64)] {
        lowSize == size ? [(0, size, 0)] : [(0, lowSize, 0), (Self.highBase, size - lowSize, lowSize)]
    }

    /// The guest-physical ranges that are RAM.
    public var ranges: [Range<UInt64>] { regions.map { $0.guestPhysical ..< $0.guestPhysical + $0.size } }

    /// Whether `count` bytes at `address` are all RAM (in one range).
    public func contains(physical address: UInt64, count: Int) -> Bool {
        (try? offset(address, count)) != nil
    }

    /// The offset into the host mapping of `count` bytes at guest-physical `address`, which
    /// must lie in one RAM range.
    @inline(__always)
    private func offset(_ address: UInt64, _ count: Int) throws(KVMError) -> Int {
        let (end, o) = address.addingReportingOverflow(UInt64(count))
        if count >= 0, !o {
            if end <= lowSize { return Int(address) }
            if address >= Self.highBase, end - Self.highBase <= size - lowSize { return Int(address - Self.highBase + lowSize) }
        }
        throw KVMError.physicalOutOfRange(address: address, count: count, ram: ranges)
    }

    /// Reads `count` bytes at guest-physical `address`.
    public func read(physical address: UInt64, count: Int) throws(KVMError) -> [UInt8] {
        let at = try offset(address, count)
        // SAFETY: [at, at+count) is inside the mapping (checked by offset()).
        return [UInt8](UnsafeRawBufferPointer(start: base + at, count: count))
    }

    /// Copies `buffer.count` bytes at guest-physical `address` into `buffer`.
    public func read(physical address: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws(KVMError) {
        let at = try offset(address, buffer.count)
        guard let dst = buffer.baseAddress else { return }
        // SAFETY: source range checked by offset(); the destination is the caller's buffer.
        dst.copyMemory(from: base + at, byteCount: buffer.count)
    }

    /// Writes `bytes` at guest-physical `address`.
    public func write(physical address: UInt64, bytes: [UInt8]) throws(KVMError) {
        let at = try offset(address, bytes.count)
        try faults.check(.memoryWrite)
        // SAFETY: destination range checked by offset().
        bytes.withUnsafeBytes { src in
            if let s = src.baseAddress { (base + at).copyMemory(from: s, byteCount: src.count) }
        }
    }

    /// Fills `count` bytes at guest-physical `address` with `value`.
    public func fill(physical address: UInt64, count: Int, with value: UInt8 = 0) throws(KVMError) {
        let at = try offset(address, count)
        // SAFETY: range checked by offset().
        (base + at).initializeMemory(as: UInt8.self, repeating: value, count: count)
    }

    /// Reads a little-endian 64-bit value at guest-physical `address`.
    public func readUInt64(physical address: UInt64) throws(KVMError) -> UInt64 {
        let at = try offset(address, 8)
        // SAFETY: 8 bytes checked by offset(); unaligned load allowed.
        return UInt64(littleEndian: (base + at).loadUnaligned(as: UInt64.self))
    }

    /// Writes a little-endian 64-bit value at guest-physical `address`.
    public func writeUInt64(physical address: UInt64, _ value: UInt64) throws(KVMError) {
        let at = try offset(address, 8)
        try faults.check(.memoryWrite)
        // SAFETY: 8 bytes checked by offset(); unaligned store allowed.
        (base + at).storeBytes(of: value.littleEndian, as: UInt64.self)
    }

    /// A guest-virtual to guest-physical translation.
    public struct Translation: Sendable, Equatable {
        /// The physical address of the virtual address given.
        public var physical: UInt64
        /// The size of the page that maps it: 4 KiB, 2 MiB or 1 GiB.
        public var pageSize: UInt64
        public init(physical: UInt64, pageSize: UInt64) { self.physical = physical; self.pageSize = pageSize }
    }

    private static let frameMask: UInt64 = 0x000F_FFFF_FFFF_F000

    /// Translates `virtual` through the 4-level (long-mode) page tables rooted at `cr3`.
    /// Handles 4 KiB, 2 MiB and 1 GiB pages; a non-present entry, a non-canonical address
    /// or a table outside guest RAM is an error naming the address.
    public func translate(virtual: UInt64, cr3: UInt64) throws(KVMError) -> Translation {
        try translate(virtual: virtual, paging: .level4(cr3: cr3))
    }

    /// Translates `virtual` as the MMU does in `paging` (off: the address itself; 32-bit
    /// paging with 4 MiB pages when `pse`; PAE; 4- and 5-level long mode with 2 MiB and 1 GiB
    /// pages). Every table entry read is bounds-checked; a non-present entry, a
    /// non-canonical address or a table outside RAM is an error naming the address.
    public func translate(virtual: UInt64, paging: PagingMode) throws(KVMError) -> Translation {
        switch paging {
        case .off:
            return Translation(physical: virtual, pageSize: 4096)
        case let .legacy(cr3, pse):
            let va = virtual & 0xFFFF_FFFF
            let pde = try readUInt32(physical: (cr3 & 0xFFFF_F000) + ((va >> 22) & 0x3FF) * 4)
            guard pde & 1 != 0 else { throw KVMError.unmapped(virtual: virtual, cr3: cr3, level: 2) }
            if pse, pde & 0x80 != 0 {
                // 4 MiB page: bits 31:22 of the frame, bits 39:32 in entry bits 20:13.
                let frame = UInt64(pde & 0xFFC0_0000) | UInt64((pde >> 13) & 0xFF) << 32
                return Translation(physical: frame | (va & 0x3F_FFFF), pageSize: 4 << 20)
            }
            let pte = try readUInt32(physical: UInt64(pde & 0xFFFF_F000) + ((va >> 12) & 0x3FF) * 4)
            guard pte & 1 != 0 else { throw KVMError.unmapped(virtual: virtual, cr3: cr3, level: 1) }
            return Translation(physical: UInt64(pte & 0xFFFF_F000) | (va & 0xFFF), pageSize: 4096)
        case let .pae(cr3):
            let va = virtual & 0xFFFF_FFFF
            let pdpte = try readUInt64(physical: (cr3 & 0xFFFF_FFE0) + (va >> 30) * 8)
            guard pdpte & 1 != 0 else { throw KVMError.unmapped(virtual: virtual, cr3: cr3, level: 3) }
            return try walk(va, table: pdpte & Self.frameMask, level: 2, cr3: cr3)
        case let .level4(cr3):
            // Bits 63:48 must copy bit 47 (canonical form).
            let top = Int64(bitPattern: virtual) >> 47
            guard top == 0 || top == -1 else { throw KVMError.unmapped(virtual: virtual, cr3: cr3, level: 4) }
            return try walk(virtual, table: cr3 & Self.frameMask, level: 4, cr3: cr3)
        case let .level5(cr3):
            let top = Int64(bitPattern: virtual) >> 56
            guard top == 0 || top == -1 else { throw KVMError.unmapped(virtual: virtual, cr3: cr3, level: 5) }
            return try walk(virtual, table: cr3 & Self.frameMask, level: 5, cr3: cr3)
        }
    }

    /// The 8-byte-entry walk from `level` down: large pages at levels 3 (1 GiB) and 2 (2 MiB).
    private func walk(_ virtual: UInt64, table start: UInt64, level top: Int, cr3: UInt64) throws(KVMError) -> Translation {
        var table = start, level = top
        while true {
            let shift = UInt64(12 + 9 * (level - 1))
            let index = (virtual >> shift) & 0x1FF
            let entry = try readUInt64(physical: table + index * 8)
            guard entry & 1 != 0 else { throw KVMError.unmapped(virtual: virtual, cr3: cr3, level: level) }
            let isLarge = (level == 3 || level == 2) && entry & 0x80 != 0
            if level == 1 || isLarge {
                let pageSize: UInt64 = 1 << shift
                let frame = entry & Self.frameMask & ~(pageSize - 1)
                return Translation(physical: frame | (virtual & (pageSize - 1)), pageSize: pageSize)
            }
            table = entry & Self.frameMask
            level -= 1
        }
    }

    /// Reads a little-endian 32-bit value at guest-physical `address`.
    public func readUInt32(physical address: UInt64) throws(KVMError) -> UInt32 {
        let at = try offset(address, 4)
        // SAFETY: 4 bytes checked by offset(); unaligned load allowed.
        return UInt32(littleEndian: (base + at).loadUnaligned(as: UInt32.self))
    }

    /// Reads `count` bytes at guest-virtual `address`, crossing pages as needed.
    public func read(virtual address: UInt64, count: Int, cr3: UInt64) throws(KVMError) -> [UInt8] {
        try read(virtual: address, count: count, paging: .level4(cr3: cr3))
    }

    /// Reads `count` bytes at guest-virtual `address` as `paging` maps it, crossing pages as needed.
    public func read(virtual address: UInt64, count: Int, paging: PagingMode) throws(KVMError) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: count)
        var failure: KVMError?
        // SAFETY: `out` has `count` bytes, written by the bounds-checked read.
        out.withUnsafeMutableBytes { buf in
            do throws(KVMError) { try read(virtual: address, into: buf, paging: paging) } catch { failure = error }
        }
        if let failure { throw failure }
        return out
    }

    /// Copies guest-virtual memory at `address` into `buffer`, crossing pages as needed.
    // SAFETY: every byte goes through the bounds-checked physical read into the caller's buffer.
    public func read(virtual address: UInt64, into buffer: UnsafeMutableRawBufferPointer, cr3: UInt64) throws(KVMError) {
        try read(virtual: address, into: buffer, paging: .level4(cr3: cr3))
    }

    /// Copies guest-virtual memory at `address`, as `paging` maps it, into `buffer`.
    // SAFETY: every byte goes through the bounds-checked physical read into the caller's buffer.
    public func read(virtual address: UInt64, into buffer: UnsafeMutableRawBufferPointer, paging: PagingMode) throws(KVMError) {
        var done = 0
        while done < buffer.count {
            let va = address &+ UInt64(done)
            let t = try translate(virtual: va, paging: paging)
            let inPage = Int(t.pageSize - (va & (t.pageSize - 1)))
            let n = min(inPage, buffer.count - done)
            try read(physical: t.physical, into: UnsafeMutableRawBufferPointer(rebasing: buffer[done ..< done + n]))
            done += n
        }
    }
}

extension GuestMemory {
    /// Copies guest-virtual memory at `address` into all of `span`, crossing pages as needed.
    public func read(virtual address: UInt64, into span: inout MutableRawSpan, cr3: UInt64) throws(KVMError) {
        try read(virtual: address, into: &span, paging: .level4(cr3: cr3))
    }

    /// Copies guest-virtual memory at `address`, as `paging` maps it, into all of `span`.
    public func read(virtual address: UInt64, into span: inout MutableRawSpan, paging: PagingMode) throws(KVMError) {
        // SAFETY: the buffer is the span's own memory, used only during this call.
        try span.withUnsafeMutableBytes { (buffer) throws(KVMError) in try read(virtual: address, into: buffer, paging: paging) }
    }
}

/// How a vCPU turns linear addresses into physical ones (from CR0, CR4, EFER and CR3).
public enum PagingMode: Sendable, Equatable, CustomStringConvertible {
    /// CR0.PG clear: linear addresses are physical.
    case off
    /// 32-bit paging (CR4.PAE clear); 4 MiB pages when CR4.PSE is set.
    case legacy(cr3: UInt64, pse: Bool)
    /// PAE paging outside long mode: 4 PDPTEs, then 2 MiB or 4 KiB pages.
    case pae(cr3: UInt64)
    /// Long mode, 4 levels (48-bit addresses).
    case level4(cr3: UInt64)
    /// Long mode with CR4.LA57: 5 levels (57-bit addresses).
    case level5(cr3: UInt64)

    public init(cr0: UInt64, cr3: UInt64, cr4: UInt64, efer: UInt64) {
        if cr0 & (1 << 31) == 0 { self = .off }
        else if cr4 & (1 << 5) == 0 { self = .legacy(cr3: cr3, pse: cr4 & (1 << 4) != 0) }
        else if efer & (1 << 10) == 0 { self = .pae(cr3: cr3) }
        else if cr4 & (1 << 12) != 0 { self = .level5(cr3: cr3) }
        else { self = .level4(cr3: cr3) }
    }

    public var description: String {
        switch self {
        case .off: "paging off"
        case let .legacy(cr3, pse): "32-bit paging\(pse ? " with 4M pages" : "") from cr3 \(hex(cr3))"
        case let .pae(cr3): "PAE paging from cr3 \(hex(cr3))"
        case let .level4(cr3): "4-level paging from cr3 \(hex(cr3))"
        case let .level5(cr3): "5-level paging from cr3 \(hex(cr3))"
        }
    }
}
