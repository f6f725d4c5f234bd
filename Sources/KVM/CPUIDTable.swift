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

    deinit { buffer.deallocate() }

    func withUnsafeMutableHeader<R>(_ body: (UnsafeMutablePointer<kvm_cpuid2>) -> R) -> R {
        body(buffer.assumingMemoryBound(to: kvm_cpuid2.self))
    }

    /// The number of leaves in the table.
    public var count: Int { Int(buffer.assumingMemoryBound(to: kvm_cpuid2.self).pointee.nent) }

    /// One leaf: function, index, and the four result registers.
    public struct Entry: Sendable, Equatable {
        public var function: UInt32, index: UInt32, eax: UInt32, ebx: UInt32, ecx: UInt32, edx: UInt32
    }

    /// The leaves, in the kernel's order.
    public var entries: [Entry] {
        // SAFETY: entries start right after the header and `count` of them were filled.
        let base = (buffer + MemoryLayout<kvm_cpuid2>.size).assumingMemoryBound(to: kvm_cpuid_entry2.self)
        return (0..<count).map { i in
            let e = base[i]
            return Entry(function: e.function, index: e.index, eax: e.eax, ebx: e.ebx, ecx: e.ecx, edx: e.edx)
        }
    }
}
