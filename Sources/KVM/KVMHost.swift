import CKVM
import Glibc

/// The host's KVM: an open `/dev/kvm` and what it can do.
///
/// The first link of the chain `KVMHost -> VirtualMachine -> VCPU`; each owns its file descriptor.
public final class KVMHost: Sendable {
    let fd: Int32
    /// The path that was opened.
    public let path: String
    /// `KVM_GET_API_VERSION` (always 12 for a usable host).
    public let apiVersion: Int32
    /// Size of each vCPU's shared `kvm_run` area (`KVM_GET_VCPU_MMAP_SIZE`).
    public let vcpuMapSize: Int

    /// Opens `path` (default `/dev/kvm`) and checks the API version.
    /// Wraps `open(2)`, `KVM_GET_API_VERSION` and `KVM_GET_VCPU_MMAP_SIZE`.
    public init(path: String = "/dev/kvm") throws(KVMError) {
        let fd = open(path, O_RDWR | O_CLOEXEC)
        if fd < 0 { throw KVMError.deviceUnavailable(path: path, errno: errno) }
        self.fd = fd
        self.path = path
        do throws(KVMError) {
            apiVersion = try checked(ckvm_get_api_version(fd), "KVM_GET_API_VERSION")
            if apiVersion != KVM_API_VERSION { throw KVMError.unsupportedAPIVersion(apiVersion) }
            vcpuMapSize = Int(try checked(ckvm_get_vcpu_mmap_size(fd), "KVM_GET_VCPU_MMAP_SIZE"))
        } catch {
            close(fd)
            throw error
        }
    }

    deinit { close(fd) }

    /// Whether `/dev/kvm` (or `path`) can be opened and speaks API 12: the gate for tier-2 tests.
    public static func isUsable(path: String = "/dev/kvm") -> Bool {
        unusableReason(path: path) == nil
    }

    /// Why `path` cannot be used (the error with its errno), nil when it can: the skip
    /// reason of tier-2 tests.
    public static func unusableReason(path: String = "/dev/kvm") -> String? {
        do { _ = try KVMHost(path: path); return nil } catch { return error.description }
    }

    /// The value of a capability: 0 when absent, otherwise capability-specific.
    /// Wraps `KVM_CHECK_EXTENSION`; an ioctl error is an error, not an absent capability.
    public func capability(_ cap: Capability) throws(KVMError) -> Int {
        let r = ckvm_check_extension(fd, cap.rawValue)
        if r < 0 { throw KVMError.ioctl("KVM_CHECK_EXTENSION(\(cap))", errno: -r) }
        return Int(r)
    }

    /// The recommended number of vCPUs (`KVM_CAP_NR_VCPUS`).
    public func recommendedVCPUs() throws(KVMError) -> Int { max(try capability(.nrVCPUs), 1) }
    /// The most vCPUs one VM may have (`KVM_CAP_MAX_VCPUS`, else the recommended count).
    public func maxVCPUs() throws(KVMError) -> Int {
        let m = try capability(.maxVCPUs)
        return m > 0 ? m : try recommendedVCPUs()
    }

    /// The CPUID leaves this host's KVM can give a guest. Wraps `KVM_GET_SUPPORTED_CPUID`.
    public func supportedCPUID() throws(KVMError) -> CPUIDTable {
        var capacity = 128
        while true {
            let table = CPUIDTable(capacity: capacity)
            // SAFETY: the table's header and entries live as long as `table`; KVM writes at most its capacity.
            let r = table.withUnsafeMutableHeader { ckvm_get_supported_cpuid(fd, $0) }
            if r == -E2BIG, capacity < 1 << 16 { capacity *= 2; continue }
            _ = try checked(r, "KVM_GET_SUPPORTED_CPUID")
            return table
        }
    }

    /// Creates a VM with no memory and no vCPUs. Wraps `KVM_CREATE_VM`.
    /// Whether `KVM_SET_GUEST_DEBUG` takes `KVM_GUESTDBG_BLOCKIRQ` (in the flags mask
    /// `KVM_CAP_SET_GUEST_DEBUG2` reports).
    public func blocksInterruptsWhileStepping() throws(KVMError) -> Bool {
        UInt32(truncatingIfNeeded: try capability(.setGuestDebug2)) & ckvm_guestdbg_blockirq != 0
    }

    public func makeVirtualMachine() throws(KVMError) -> VirtualMachine {
        let vmfd = try checked(ckvm_create_vm(fd), "KVM_CREATE_VM")
        return VirtualMachine(host: self, fd: vmfd)
    }
}

/// KVM capabilities the project asks about (`KVM_CAP_*`).
public enum Capability: Int32, Sendable, CaseIterable, CustomStringConvertible {
    case nrVCPUs = 9
    case syncMMU = 16
    case setGuestDebug = 23
    case maxVCPUs = 66
    case syncRegs = 74
    case debugRegs = 50
    case vcpuEvents = 41
    case immediateExit = 136
    case x86RobustSinglestep = 51
    case setGuestDebug2 = 195
    case irqchip = 0
    case setTSSAddress = 4
    case mpState = 14
    case pit2 = 33
    case setIdentityMapAddress = 37
    case tscDeadlineTimer = 72

    public var description: String {
        switch self {
        case .nrVCPUs: "KVM_CAP_NR_VCPUS"
        case .syncMMU: "KVM_CAP_SYNC_MMU"
        case .setGuestDebug: "KVM_CAP_SET_GUEST_DEBUG"
        case .maxVCPUs: "KVM_CAP_MAX_VCPUS"
        case .syncRegs: "KVM_CAP_SYNC_REGS"
        case .debugRegs: "KVM_CAP_DEBUGREGS"
        case .vcpuEvents: "KVM_CAP_VCPU_EVENTS"
        case .immediateExit: "KVM_CAP_IMMEDIATE_EXIT"
        case .x86RobustSinglestep: "KVM_CAP_X86_ROBUST_SINGLESTEP"
        case .setGuestDebug2: "KVM_CAP_SET_GUEST_DEBUG2"
        case .irqchip: "KVM_CAP_IRQCHIP"
        case .setTSSAddress: "KVM_CAP_SET_TSS_ADDR"
        case .mpState: "KVM_CAP_MP_STATE"
        case .pit2: "KVM_CAP_PIT2"
        case .setIdentityMapAddress: "KVM_CAP_SET_IDENTITY_MAP_ADDR"
        case .tscDeadlineTimer: "KVM_CAP_TSC_DEADLINE_TIMER"
        }
    }
}

/// Which KVM implementation the host runs, from the modules it has loaded (or built in):
/// `/sys/module/kvm_intel`, `kvm_amd`, `kvm_pvm`.
public enum KVMFlavor: String, Sendable, Equatable {
    /// Intel VMX (`kvm_intel`): guests run natively at every privilege level.
    case vmx
    /// AMD SVM (`kvm_amd`): likewise.
    case svm
    /// PVM (`kvm_pvm`, KVM without hardware virtualisation, for hosts that are themselves
    /// guests): CPL3 guest code runs natively, CPL0 code is emulated instruction by
    /// instruction (about 1 µs each), and a guest's int3 cannot be trapped.
    case pvm
    case unknown

    /// The flavor of this host's KVM; `modules` is where loaded modules appear.
    public static func current(modules: String = "/sys/module") -> KVMFlavor {
        func has(_ name: String) -> Bool { access("\(modules)/\(name)", F_OK) == 0 }
        if has("kvm_pvm") { return .pvm }
        if has("kvm_intel") { return .vmx }
        if has("kvm_amd") { return .svm }
        return .unknown
    }

    /// The module's name and what it means for flowtrace, one line.
    public var summary: String {
        switch self {
        case .vmx: "VMX (kvm_intel): guests run natively at every privilege level; every engine can work"
        case .svm: "SVM (kvm_amd): guests run natively at every privilege level; every engine can work"
        case .pvm:
            "PVM (kvm_pvm): CPL3 guest code runs natively but CPL0 code (kernels, firmware, flowtrace's payloads) is emulated, about 1 µs per instruction, and a guest's int3 cannot be trapped: a stock kernel does not boot in useful time and the int3 engine does not work; use hlt (payloads) or hw (up to 4 probes), or a host with VMX/SVM (tools/test-nested runs one inside QEMU)"
        case .unknown: "unknown (neither kvm_intel, kvm_amd nor kvm_pvm is loaded): the self-test below says what works"
        }
    }
}
