import Glibc

/// The guest's RAM: one host mapping seen by the guest as physical `0 ..< size`.
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
    /// Size in bytes.
    public let size: UInt64
    /// Host writes into guest RAM to fail on purpose (the fault-injection suite).
    public let faults = FaultInjector()

    /// Maps `size` bytes of zeroed anonymous memory. Wraps `mmap(2)`.
    public init(size: UInt64) throws(KVMError) {
        guard size > 0, size % 4096 == 0 else {
            throw KVMError.invalidArgument("guest RAM size \(size) must be a positive multiple of 4096")
        }
        let p = mmap(nil, Int(size), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
        guard let p, p != MAP_FAILED else { throw KVMError.system("mmap of \(size) bytes of guest RAM", errno: errno) }
        base = p
        self.size = size
    }

    deinit { munmap(base, Int(size)) }

    /// The host address of guest RAM, for `KVM_SET_USER_MEMORY_REGION`.
    var hostAddress: UInt64 { UInt64(UInt(bitPattern: base)) }

    @inline(__always)
    private func check(_ address: UInt64, _ count: Int) throws(KVMError) {
        let (end, o) = address.addingReportingOverflow(UInt64(count))
        if count < 0 || o || end > size {
            throw KVMError.physicalOutOfRange(address: address, count: count, ramSize: size)
        }
    }

    /// Reads `count` bytes at guest-physical `address`.
    public func read(physical address: UInt64, count: Int) throws(KVMError) -> [UInt8] {
        try check(address, count)
        // SAFETY: [address, address+count) is inside the mapping (checked above).
        return [UInt8](UnsafeRawBufferPointer(start: base + Int(address), count: count))
    }

    /// Copies `buffer.count` bytes at guest-physical `address` into `buffer`.
    public func read(physical address: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws(KVMError) {
        try check(address, buffer.count)
        guard let dst = buffer.baseAddress else { return }
        // SAFETY: source range checked above; the destination is the caller's buffer.
        dst.copyMemory(from: base + Int(address), byteCount: buffer.count)
    }

    /// Writes `bytes` at guest-physical `address`.
    public func write(physical address: UInt64, bytes: [UInt8]) throws(KVMError) {
        try check(address, bytes.count)
        try faults.check(.memoryWrite)
        // SAFETY: destination range checked above.
        bytes.withUnsafeBytes { src in
            if let s = src.baseAddress { (base + Int(address)).copyMemory(from: s, byteCount: src.count) }
        }
    }

    /// Fills `count` bytes at guest-physical `address` with `value`.
    public func fill(physical address: UInt64, count: Int, with value: UInt8 = 0) throws(KVMError) {
        try check(address, count)
        // SAFETY: range checked above.
        (base + Int(address)).initializeMemory(as: UInt8.self, repeating: value, count: count)
    }

    /// Reads a little-endian 64-bit value at guest-physical `address`.
    public func readUInt64(physical address: UInt64) throws(KVMError) -> UInt64 {
        try check(address, 8)
        // SAFETY: 8 bytes checked above; unaligned load allowed.
        return UInt64(littleEndian: (base + Int(address)).loadUnaligned(as: UInt64.self))
    }

    /// Writes a little-endian 64-bit value at guest-physical `address`.
    public func writeUInt64(physical address: UInt64, _ value: UInt64) throws(KVMError) {
        try check(address, 8)
        try faults.check(.memoryWrite)
        // SAFETY: 8 bytes checked above; unaligned store allowed.
        (base + Int(address)).storeBytes(of: value.littleEndian, as: UInt64.self)
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
        // Bits 63:48 must copy bit 47 (canonical form).
        let top = Int64(bitPattern: virtual) >> 47
        guard top == 0 || top == -1 else { throw KVMError.unmapped(virtual: virtual, cr3: cr3, level: 4) }
        var table = cr3 & Self.frameMask
        var level = 4
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

    /// Reads `count` bytes at guest-virtual `address`, crossing pages as needed.
    public func read(virtual address: UInt64, count: Int, cr3: UInt64) throws(KVMError) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: count)
        var failure: KVMError?
        // SAFETY: `out` has `count` bytes, written by the bounds-checked read.
        out.withUnsafeMutableBytes { buf in
            do throws(KVMError) { try read(virtual: address, into: buf, cr3: cr3) } catch { failure = error }
        }
        if let failure { throw failure }
        return out
    }

    /// Copies guest-virtual memory at `address` into `buffer`, crossing pages as needed.
    // SAFETY: every byte goes through the bounds-checked physical read into the caller's buffer.
    public func read(virtual address: UInt64, into buffer: UnsafeMutableRawBufferPointer, cr3: UInt64) throws(KVMError) {
        var done = 0
        while done < buffer.count {
            let va = address &+ UInt64(done)
            let t = try translate(virtual: va, cr3: cr3)
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
        // SAFETY: the buffer is the span's own memory, used only during this call.
        try span.withUnsafeMutableBytes { (buffer) throws(KVMError) in try read(virtual: address, into: buffer, cr3: cr3) }
    }
}
