import Glibc
import Locking
import Synchronization

/// A host call that tests (and `FLOWTRACE_FAULT`) can make fail: the seam of the fault-
/// injection suite. Each names the call as messages do.
public enum HostCall: String, Sendable, CaseIterable, CustomStringConvertible {
    case run = "KVM_RUN"
    case setGuestDebug = "KVM_SET_GUEST_DEBUG"
    case setRegisters = "KVM_SET_REGS"
    case getRegisters = "KVM_GET_REGS"
    case getSpecialRegisters = "KVM_GET_SREGS"
    /// A write into guest RAM by flowtrace (patching a probe, an out-of-line copy).
    case memoryWrite = "guest-memory write"

    public var description: String { rawValue }
}

/// Makes chosen host calls of one vCPU or one guest memory fail on their Nth use, with an
/// errno, as if the kernel had refused them. Nothing is injected unless asked; the check on
/// each call is one relaxed atomic load.
public final class FaultInjector: Sendable {
    private struct Plan {
        var failAt: [HostCall: (call: Int, errno: Int32)] = [:]
        var calls: [HostCall: Int] = [:]
    }

    private let armed = Atomic<Bool>(false)
    private let plan = Locked(Plan())

    public init() {}

    /// The `call`'s `nth` use from now on (1 = the next one) fails with `errno`; later uses
    /// succeed again.
    public func fail(_ call: HostCall, onCall nth: Int, errno: Int32 = EIO) {
        plan.withLock { p in
            p.failAt[call] = (max(1, nth), errno)
            p.calls[call] = 0
        }
        armed.store(true, ordering: .releasing)
    }

    /// Throws the injected error when this use of `call` is the one to fail.
    @inline(__always)
    func check(_ call: HostCall) throws(KVMError) {
        guard armed.load(ordering: .relaxed) else { return }
        if let errno = hit(call) {
            if call == .memoryWrite { throw KVMError.system(call.rawValue, errno: errno) }
            throw KVMError.ioctl(call.rawValue, errno: errno)
        }
    }

    private func hit(_ call: HostCall) -> Int32? {
        plan.withLock { p -> Int32? in
            guard let f = p.failAt[call] else { return nil }
            let n = (p.calls[call] ?? 0) + 1
            p.calls[call] = n
            guard n == f.call else { return nil }
            p.failAt[call] = nil
            return f.errno
        }
    }
}

/// A fault to inject, as `FLOWTRACE_FAULT` spells it: `CALL:N[:ERRNO][@VCPU]`, e.g.
/// `KVM_RUN:5`, `KVM_SET_GUEST_DEBUG:3:22@1`, `guest-memory write:2`.
public struct FaultSpec: Sendable, Equatable {
    public var call: HostCall
    public var nth: Int
    public var errno: Int32
    /// The vCPU whose calls count (ignored for guest-memory writes).
    public var vcpu: Int

    public init(call: HostCall, nth: Int, errno: Int32 = EIO, vcpu: Int = 0) {
        self.call = call; self.nth = nth; self.errno = errno; self.vcpu = vcpu
    }

    /// Parses `text`; the error names what is wrong.
    public init(parsing text: String) throws(KVMError) {
        var body = Substring(text)
        var vcpu = 0
        if let at = body.lastIndex(of: "@") {
            guard let v = Int(body[body.index(after: at)...]), v >= 0 else {
                throw KVMError.invalidArgument("FLOWTRACE_FAULT '\(text)': expected a vCPU number after '@'")
            }
            vcpu = v
            body = body[..<at]
        }
        let parts = body.split(separator: ":", omittingEmptySubsequences: false)
        let names = HostCall.allCases.map(\.rawValue).joined(separator: ", ")
        guard parts.count == 2 || parts.count == 3, let call = HostCall(rawValue: String(parts[0])) else {
            throw KVMError.invalidArgument("FLOWTRACE_FAULT '\(text)': expected CALL:N[:ERRNO][@VCPU] with CALL one of \(names)")
        }
        guard let n = Int(parts[1]), n >= 1 else {
            throw KVMError.invalidArgument("FLOWTRACE_FAULT '\(text)': N must be a call number from 1")
        }
        var e = EIO
        if parts.count == 3 {
            guard let v = Int32(parts[2]), v > 0 else { throw KVMError.invalidArgument("FLOWTRACE_FAULT '\(text)': ERRNO must be a positive number") }
            e = v
        }
        self.init(call: call, nth: n, errno: e, vcpu: vcpu)
    }
}
