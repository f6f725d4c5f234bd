import CKVM

/// A `struct kvm_cpuid2` with its trailing entries, as `KVM_GET_SUPPORTED_CPUID` fills it
/// and `KVM_SET_CPUID2` takes it.
public final class CPUIDTable: @unchecked Sendable {
    // SAFETY: the buffer is written only by `KVMHost.supportedCPUID()` before the table is
    // handed out; afterwards it is only read, so sharing it between threads is safe.
    private let buffer: UnsafeMutableRawPointer
    private let capacity: Int

    init(capacity: Int) {
        self.capacity = capacity
        let size = MemoryLayout<kvm_cpuid2>.size + capacity * MemoryLayout<kvm_cpuid_entry2>.stride
        // SAFETY: a fresh allocation of the exact size the kernel may write, zeroed, with nent set.
        buffer = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: 8)
        buffer.initializeMemory(as: UInt8.self, repeating: 0, count: size)
        buffer.assumingMemoryBound(to: kvm_cpuid2.self).pointee.nent = UInt32(capacity)
    }

    /// A table of exactly `entries` (e.g. a normalised copy of the host's).
    public convenience init(entries: [Entry]) {
        self.init(capacity: entries.count)
        // SAFETY: `capacity` entries follow the header (allocated by init(capacity:)); this
        // runs before the table is shared.
        let base = (buffer + MemoryLayout<kvm_cpuid2>.size).assumingMemoryBound(to: kvm_cpuid_entry2.self)
        for (i, e) in entries.enumerated() {
            var k = kvm_cpuid_entry2()
            k.function = e.function; k.index = e.index
            k.eax = e.eax; k.ebx = e.ebx; k.ecx = e.ecx; k.edx = e.edx
            k.flags = e.flags
            base[i] = k
        }
    }

    deinit { buffer.deallocate() }

    // SAFETY: hands the header (with its entries after it) to one ioctl call.
    func withUnsafeMutableHeader<R>(_ body: (UnsafeMutablePointer<kvm_cpuid2>) -> R) -> R {
        body(buffer.assumingMemoryBound(to: kvm_cpuid2.self))
    }

    /// The number of leaves in the table.
    public var count: Int { Int(buffer.assumingMemoryBound(to: kvm_cpuid2.self).pointee.nent) }

    /// One leaf: function, index, and the four result registers.
    public struct Entry: Sendable, Equatable {
        public var function: UInt32, index: UInt32, eax: UInt32, ebx: UInt32, ecx: UInt32, edx: UInt32
        /// `KVM_CPUID_FLAG_*` (bit 0: the leaf has sub-leaves selected by `index`).
        public var flags: UInt32 = 0
        public init(function: UInt32, index: UInt32, eax: UInt32, ebx: UInt32, ecx: UInt32, edx: UInt32, flags: UInt32 = 0) {
            self.function = function; self.index = index
            self.eax = eax; self.ebx = ebx; self.ecx = ecx; self.edx = edx
            self.flags = flags
        }
    }

    /// The leaves, in the kernel's order.
    public var entries: [Entry] {
        // SAFETY: entries start right after the header and `count` of them were filled.
        let base = (buffer + MemoryLayout<kvm_cpuid2>.size).assumingMemoryBound(to: kvm_cpuid_entry2.self)
        return (0..<count).map { i in
            let e = base[i]
            return Entry(function: e.function, index: e.index, eax: e.eax, ebx: e.ebx, ecx: e.ecx, edx: e.edx, flags: e.flags)
        }
    }
}
