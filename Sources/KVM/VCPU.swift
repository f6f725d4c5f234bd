import CKVM
import Glibc
import Locking
import Synchronization

/// One virtual CPU: its file descriptor and its shared `kvm_run` area.
///
/// A vCPU is used by one thread at a time: its driving thread (the one that calls
/// `run()`), or a control thread while the driving thread is parked outside `KVM_RUN` (the
/// Machine's rendezvous hands it over and back, with the rendezvous' lock ordering the
/// accesses). `kick()` and `faults` may be used from any thread.
public final class VCPU: @unchecked Sendable {
    // SAFETY: `shared` points at the vCPU's kvm_run mapping, alive until deinit. All members
    // but `kick()` and `faults` are used by one thread at a time (the rule above); `kick()`
    // only stores the one-byte immediate_exit flag, which KVM defines for exactly this
    // cross-thread use, and signals the driving thread; `faults` is Sendable.
    public let id: Int
    /// The VM this vCPU belongs to (kept alive as long as the vCPU).
    public let vm: VirtualMachine
    let fd: Int32
    private let shared: UnsafeMutablePointer<kvm_run>
    private let mapSize: Int
    /// Whether registers travel in `kvm_run` (`KVM_CAP_SYNC_REGS`) instead of ioctls.
    public let usesSyncRegisters: Bool
    private let driver = Atomic<UInt>(0)
    /// Whether the sync area holds the system registers of the last exit (KVM fills it on
    /// every return from `KVM_RUN` once asked to; before the first run it holds nothing).
    private var sregsSynced = false
    private let syncsSystemRegisters: Bool
    /// Host calls of this vCPU to fail on purpose (the fault-injection suite).
    public let faults = FaultInjector()

    // SAFETY: `run` is the vCPU's kvm_run mapping of `mapSize` bytes, unmapped in deinit.
    init(vm: VirtualMachine, id: Int, fd: Int32, run: UnsafeMutableRawPointer, mapSize: Int, syncRegisters: Bool,
         syncSystemRegisters: Bool) {
        self.vm = vm
        self.id = id
        self.fd = fd
        self.shared = run.assumingMemoryBound(to: kvm_run.self)
        self.mapSize = mapSize
        self.usesSyncRegisters = syncRegisters
        self.syncsSystemRegisters = syncSystemRegisters
        // The system registers come along too: a memory probe's page walk needs cr3 at
        // every hit, and this saves a KVM_GET_SREGS per hit.
        if syncRegisters { self.shared.pointee.kvm_valid_regs = ckvm_sync_x86_regs | (syncSystemRegisters ? ckvm_sync_x86_sregs : 0) }
    }

    deinit {
        munmap(shared, mapSize)
        close(fd)
    }

    // MARK: Running

    /// Enters the guest until the next exit. EINTR/EAGAIN come back as `.interrupted`.
    /// Wraps `KVM_RUN`.
    public func run() throws(KVMError) -> VMExit {
        try faults.check(.run)
        let r = ckvm_run(fd)
        if syncsSystemRegisters { sregsSynced = r >= 0 || r == -EINTR || r == -EAGAIN }
        if r == -EINTR || r == -EAGAIN {
            ckvm_store_immediate_exit(shared, 0)
            return .interrupted
        }
        _ = try checked(r, "KVM_RUN")
        return decodeExit()
    }

    private func decodeExit() -> VMExit {
        // Field by field through the pointer: a `let` copy of `pointee` would copy the whole
        // kvm_run (its 2 KiB sync area included) at every exit.
        let run = shared
        switch Int32(run.pointee.exit_reason) {
        case KVM_EXIT_IO:
            let size = Int(run.pointee.io.size), count = Int(run.pointee.io.count), port = run.pointee.io.port
            if run.pointee.io.direction == UInt8(KVM_EXIT_IO_OUT) {
                return .ioOut(port: port, size: size, count: count, value: ioOutValue(at: 0))
            }
            return .ioIn(port: port, size: size, count: count)
        case KVM_EXIT_MMIO:
            var value: UInt64 = 0
            let n = min(Int(run.pointee.mmio.len), 8)
            let isWrite = run.pointee.mmio.is_write != 0
            if isWrite {
                // SAFETY: mmio.data is 8 bytes inside kvm_run; at most `len` (<= 8) are read.
                withUnsafeBytes(of: run.pointee.mmio.data) { raw in
                    for i in 0..<n { value |= UInt64(raw[i]) << (8 * UInt64(i)) }
                }
            }
            return .mmio(address: run.pointee.mmio.phys_addr, isWrite: isWrite, length: n, value: value)
        case KVM_EXIT_HLT:
            return .hlt
        case KVM_EXIT_DEBUG:
            let a = run.pointee.debug.arch
            return .debug(exception: a.exception, pc: a.pc, dr6: a.dr6, dr7: a.dr7)
        case KVM_EXIT_SHUTDOWN:
            return .shutdown
        case KVM_EXIT_FAIL_ENTRY:
            return .failEntry(reason: run.pointee.fail_entry.hardware_entry_failure_reason)
        case KVM_EXIT_INTERNAL_ERROR:
            return .internalError(suberror: run.pointee.internal.suberror)
        default:
            return .other(reason: run.pointee.exit_reason)
        }
    }

    /// Element `index` of the pending port-output exit (0 for a plain `out`), read in place;
    /// 0 past the data KVM provided.
    public func ioOutValue(at index: Int) -> UInt32 {
        let size = Int(shared.pointee.io.size), offset = Int(shared.pointee.io.data_offset) + index * size
        guard size <= 4, index >= 0, index < Int(shared.pointee.io.count), offset + size <= mapSize else { return 0 }
        // SAFETY: `size` bytes at data_offset + index * size, inside the kvm_run mapping (checked above).
        let p = UnsafeRawPointer(shared) + offset
        var v: UInt32 = 0
        for i in 0..<size { v |= UInt32(p.load(fromByteOffset: i, as: UInt8.self)) << (8 * UInt32(i)) }
        return v
    }

    /// Answers element `index` of a pending `.ioIn` exit (little-endian, `size` bytes); call
    /// for each element before the next `run()`.
    public func completeIOIn(at index: Int, value: UInt32) {
        let size = Int(shared.pointee.io.size), offset = Int(shared.pointee.io.data_offset) + index * size
        guard size <= 4, index >= 0, index < Int(shared.pointee.io.count), offset + size <= mapSize else { return }
        // SAFETY: `size` bytes at data_offset + index * size, inside the kvm_run mapping (checked above).
        let p = UnsafeMutableRawPointer(shared) + offset
        for i in 0..<size { p.storeBytes(of: UInt8(truncatingIfNeeded: value >> (8 * UInt32(i))), toByteOffset: i, as: UInt8.self) }
    }

    /// Answers a pending `.mmio` read with `value` (its low `length` bytes).
    public func completeMMIORead(_ value: UInt64) {
        // SAFETY: mmio.data is 8 bytes inside kvm_run, written whole.
        withUnsafeMutableBytes(of: &shared.pointee.mmio.data) { raw in
            for i in 0..<8 { raw[i] = UInt8(truncatingIfNeeded: value >> (8 * UInt64(i))) }
        }
    }

    /// Records the calling thread as the one that drives this vCPU, for `kick()`, and
    /// unblocks the kick signal on it: threads inherit their creator's mask, and dispatch
    /// worker threads (where tests and async callers start machines) block every signal.
    public func bindToCurrentThread() {
        var set = sigset_t()
        sigemptyset(&set)
        sigaddset(&set, Self.kickSignal)
        pthread_sigmask(SIG_UNBLOCK, &set, nil)
        driver.store(UInt(pthread_self()), ordering: .releasing)
    }

    /// The OS thread that drives this vCPU (the last one bound), nil before any was bound.
    public var drivingThread: pthread_t? {
        let t = driver.load(ordering: .acquiring)
        return t == 0 ? nil : pthread_t(t)
    }

    /// Makes the driving thread leave (or not enter) `KVM_RUN` soon: sets `immediate_exit`
    /// and sends `signal` to it. Its next `run()` returns `.interrupted`.
    /// The signal must have a handler installed without `SA_RESTART` (see `VCPU.installKickHandler`).
    public func kick() {
        kick(signal: VCPU.kickSignal)
    }

    /// `kick()` with another signal than `kickSignal` (it must have a handler).
    public func kick(signal: Int32) {
        // SAFETY: an atomic single-byte store into the shared kvm_run; KVM reads it on entry.
        ckvm_store_immediate_exit(shared, 1)
        let t = driver.load(ordering: .acquiring)
        if t != 0 { pthread_kill(pthread_t(t), signal) }
    }

    /// The signal that kicks vCPU threads out of `KVM_RUN`: a real-time signal, chosen by
    /// `installKickHandler()` (the first from SIGRTMIN+2 up with no handler of the process's
    /// own), or the one given to `useKickSignal`. 0 before either ran.
    public static var kickSignal: Int32 { chosenKickSignal.load(ordering: .acquiring) }
    private static let chosenKickSignal = Atomic<Int32>(0)
    private static let kickSetup = Locked<Result<Int32, KVMError>?>(nil)

    /// Installs a do-nothing handler without `SA_RESTART` for the kick signal, so a blocked
    /// `KVM_RUN` returns EINTR. Idempotent; never replaces a handler the program installed:
    /// it takes a real-time signal nobody handles. Throws when every one is taken.
    public static func installKickHandler() throws(KVMError) {
        try kickSetup.withLock { (r: inout Result<Int32, KVMError>?) throws(KVMError) in
            if let r { _ = try r.get(); return }
            let low = __libc_current_sigrtmin() + 2, high = __libc_current_sigrtmax()
            for s in low ..< max(low, high + 1) where isUnhandled(s) {
                r = install(s)
                _ = try r!.get()
                return
            }
            r = .failure(.invalidArgument("no free real-time signal (SIGRTMIN+2 to SIGRTMAX all have handlers) to kick vCPU threads with; choose one with VCPU.useKickSignal"))
            _ = try r!.get()
        }
    }

    /// Makes `signal` the kick signal (before the first machine runs): for programs that
    /// keep the real-time signals for themselves. Installs its handler, replacing the one
    /// there: the caller gives the signal away.
    public static func useKickSignal(_ signal: Int32) throws(KVMError) {
        try kickSetup.withLock { (r: inout Result<Int32, KVMError>?) throws(KVMError) in
            if case let .success(s)? = r, s != signal {
                throw KVMError.invalidArgument("the kick signal is \(s) already: choose it before the first machine runs")
            }
            r = install(signal)
            _ = try r!.get()
        }
    }

    private static func isUnhandled(_ s: Int32) -> Bool {
        var old = sigaction()
        guard sigaction(s, nil, &old) == 0 else { return false }
        // SAFETY: reading the handler field of a sigaction(2) result.
        let h = unsafeBitCast(old.__sigaction_handler.sa_handler, to: Int.self)
        return h == 0 /* SIG_DFL */ && old.sa_flags & SA_SIGINFO == 0
    }

    private static func install(_ s: Int32) -> Result<Int32, KVMError> {
        var action = sigaction()
        action.__sigaction_handler.sa_handler = { _ in }
        sigemptyset(&action.sa_mask)
        action.sa_flags = 0
        guard sigaction(s, &action, nil) == 0 else { return .failure(.system("sigaction(\(s))", errno: errno)) }
        chosenKickSignal.store(s, ordering: .releasing)
        return .success(s)
    }

    // MARK: State

    /// The general-purpose registers, from the sync area after an exit when available.
    /// Wraps `KVM_GET_REGS`.
    /// rip as KVM left it in the sync area at the last exit, without an ioctl; nil without
    /// register sync. For this vCPU's thread, right after `run()` (a progress display).
    public var syncedRIP: UInt64? {
        guard usesSyncRegisters else { return nil }
        // SAFETY: the shared kvm_run page, mapped for the vCPU's life; read on its own thread.
        return shared.pointee.s.regs.regs.rip
    }

    public func registers() throws(KVMError) -> Registers {
        try faults.check(.getRegisters)
        if usesSyncRegisters { return Registers(shared.pointee.s.regs.regs) }
        var r = kvm_regs()
        _ = try checked(ckvm_get_regs(fd, &r), "KVM_GET_REGS")
        return Registers(r)
    }

    /// The general-purpose registers as KVM holds them (`KVM_GET_REGS`, never the sync
    /// area): what `flushRegisters` or the last run left.
    public func registersFromKernel() throws(KVMError) -> Registers {
        try faults.check(.getRegisters)
        var r = kvm_regs()
        _ = try checked(ckvm_get_regs(fd, &r), "KVM_GET_REGS")
        return Registers(r)
    }

    /// Sets the general-purpose registers. With `KVM_CAP_SYNC_REGS` they go into the shared
    /// area, marked dirty, and KVM loads them on the next `run()` (no ioctl); otherwise
    /// wraps `KVM_SET_REGS`.
    public func setRegisters(_ regs: Registers) throws(KVMError) {
        try faults.check(.setRegisters)
        var r = regs.kvm
        if usesSyncRegisters {
            shared.pointee.s.regs.regs = r
            shared.pointee.kvm_dirty_regs |= ckvm_sync_x86_regs
            return
        }
        _ = try checked(ckvm_set_regs(fd, &r), "KVM_SET_REGS")
    }

    /// Hands registers set through the sync area to KVM now (`KVM_SET_REGS`) instead of on
    /// the next `run()`. Needed before an ioctl that reads rip: `KVM_SET_GUEST_DEBUG` with
    /// single-step records the rip it steps from, and a rip changed only in the sync area
    /// would not be stepped (seen on SVM). No ioctl when nothing is pending.
    public func flushRegisters() throws(KVMError) {
        guard usesSyncRegisters, shared.pointee.kvm_dirty_regs & ckvm_sync_x86_regs != 0 else { return }
        var r = shared.pointee.s.regs.regs
        _ = try checked(ckvm_set_regs(fd, &r), "KVM_SET_REGS")
        shared.pointee.kvm_dirty_regs &= ~ckvm_sync_x86_regs
    }

    /// The system registers: from the sync area after an exit when available, else
    /// `KVM_GET_SREGS`.
    public func specialRegisters() throws(KVMError) -> SpecialRegisters {
        try faults.check(.getSpecialRegisters)
        if sregsSynced { return SpecialRegisters(shared.pointee.s.regs.sregs) }
        var s = kvm_sregs()
        _ = try checked(ckvm_get_sregs(fd, &s), "KVM_GET_SREGS")
        return SpecialRegisters(s)
    }

    /// How the vCPU translates linear addresses now (CR0, CR3, CR4 and EFER), for a page
    /// walk at a probe hit: read from the sync area after an exit when available, without
    /// converting the segments as `specialRegisters()` does; else `KVM_GET_SREGS`.
    public func paging() throws(KVMError) -> PagingMode {
        guard sregsSynced else { return try specialRegisters().paging }
        try faults.check(.getSpecialRegisters)
        // SAFETY: the sync area is this vCPU's kvm_run mapping; KVM wrote it at the last exit
        // and does not touch it outside KVM_RUN, which this (the driving) thread is not in.
        let run = shared
        return PagingMode(cr0: run.pointee.s.regs.sregs.cr0, cr3: run.pointee.s.regs.sregs.cr3,
                          cr4: run.pointee.s.regs.sregs.cr4, efer: run.pointee.s.regs.sregs.efer)
    }

    /// CR3 alone, as `paging()` reads it.
    public func cr3() throws(KVMError) -> UInt64 {
        guard sregsSynced else { return try specialRegisters().cr3 }
        try faults.check(.getSpecialRegisters)
        // SAFETY: as in paging().
        return shared.pointee.s.regs.sregs.cr3
    }

    /// Sets the system registers, keeping the pending-interrupt bitmap.
    /// Wraps `KVM_GET_SREGS` + `KVM_SET_SREGS`.
    public func setSpecialRegisters(_ sregs: SpecialRegisters) throws(KVMError) {
        var s = kvm_sregs()
        _ = try checked(ckvm_get_sregs(fd, &s), "KVM_GET_SREGS")
        sregs.apply(to: &s)
        sregsSynced = false
        _ = try checked(ckvm_set_sregs(fd, &s), "KVM_SET_SREGS")
    }

    /// x87 control word, MXCSR and xmm0-15. Wraps `KVM_GET_FPU`.
    public func fpu() throws(KVMError) -> FPUState {
        var f = kvm_fpu()
        _ = try checked(ckvm_get_fpu(fd, &f), "KVM_GET_FPU")
        var out = FPUState()
        out.fcw = f.fcw
        out.mxcsr = f.mxcsr
        // SAFETY: xmm is 16 x 16 bytes inside kvm_fpu.
        withUnsafeBytes(of: f.xmm) { raw in
            for i in 0..<16 { out.xmm[i] = raw.loadUnaligned(fromByteOffset: i * 16, as: UInt128.self) }
        }
        return out
    }

    /// Sets x87 control word, MXCSR and xmm0-15. Wraps `KVM_GET_FPU` + `KVM_SET_FPU`.
    public func setFPU(_ state: FPUState) throws(KVMError) {
        var f = kvm_fpu()
        _ = try checked(ckvm_get_fpu(fd, &f), "KVM_GET_FPU")
        f.fcw = state.fcw
        f.mxcsr = state.mxcsr
        // SAFETY: xmm is 16 x 16 bytes inside kvm_fpu.
        withUnsafeMutableBytes(of: &f.xmm) { raw in
            for i in 0..<min(16, state.xmm.count) { raw.storeBytes(of: state.xmm[i], toByteOffset: i * 16, as: UInt128.self) }
        }
        _ = try checked(ckvm_set_fpu(fd, &f), "KVM_SET_FPU")
    }

    /// DR0-DR3, DR6, DR7 as the guest sees them. Wraps `KVM_GET_DEBUGREGS`.
    public func debugRegisters() throws(KVMError) -> DebugRegisters {
        var d = kvm_debugregs()
        _ = try checked(ckvm_get_debugregs(fd, &d), "KVM_GET_DEBUGREGS")
        var out = DebugRegisters()
        out.db = [d.db.0, d.db.1, d.db.2, d.db.3]
        out.dr6 = d.dr6
        out.dr7 = d.dr7
        return out
    }

    /// Sets the guest-visible debug registers. Wraps `KVM_SET_DEBUGREGS`.
    public func setDebugRegisters(_ regs: DebugRegisters) throws(KVMError) {
        var d = kvm_debugregs()
        d.db = (regs.db[0], regs.db[1], regs.db[2], regs.db[3])
        d.dr6 = regs.dr6
        d.dr7 = regs.dr7
        _ = try checked(ckvm_set_debugregs(fd, &d), "KVM_SET_DEBUGREGS")
    }

    /// Sets what debug events exit to us. Wraps `KVM_SET_GUEST_DEBUG`.
    public func setGuestDebug(_ debug: GuestDebug) throws(KVMError) {
        try faults.check(.setGuestDebug)
        var g = kvm_guest_debug()
        var control: UInt32 = 0
        if debug.isEnabled { control |= ckvm_guestdbg_enable }
        if debug.singleStep { control |= ckvm_guestdbg_singlestep }
        if debug.softwareBreakpoints { control |= ckvm_guestdbg_use_sw_bp }
        if debug.hardwareBreakpoints { control |= ckvm_guestdbg_use_hw_bp }
        if debug.injectBreakpoint { control |= ckvm_guestdbg_inject_bp }
        if debug.blockInterrupts { control |= ckvm_guestdbg_blockirq }
        if debug.injectDebug { control |= ckvm_guestdbg_inject_db }
        g.control = control
        if debug.hardwareBreakpoints {
            let a = debug.addresses
            g.arch.debugreg = (a[0], a[1], a[2], a[3], 0, 0, 0, debug.dr7)
        }
        _ = try checked(ckvm_set_guest_debug(fd, &g), "KVM_SET_GUEST_DEBUG")
    }

    /// Gives the guest these CPUID leaves. Wraps `KVM_SET_CPUID2`.
    public func setCPUID(_ table: CPUIDTable) throws(KVMError) {
        // SAFETY: the table's header and entries live as long as `table` (KVM only reads them).
        _ = try checked(table.withUnsafeMutableHeader { ckvm_set_cpuid2(fd, $0) }, "KVM_SET_CPUID2")
    }

    /// The local APIC's register page. Wraps `KVM_GET_LAPIC` (in-kernel irqchip only).
    public func localAPIC() throws(KVMError) -> LocalAPICState {
        var s = kvm_lapic_state()
        _ = try checked(ckvm_get_lapic(fd, &s), "KVM_GET_LAPIC")
        var out = LocalAPICState()
        // SAFETY: regs is KVM_APIC_REG_SIZE (1024) bytes inside kvm_lapic_state.
        withUnsafeBytes(of: &s.regs) { raw in for i in 0..<LocalAPICState.size { out.bytes[i] = raw[i] } }
        return out
    }

    /// Sets the local APIC's register page. Wraps `KVM_SET_LAPIC`.
    public func setLocalAPIC(_ state: LocalAPICState) throws(KVMError) {
        var s = kvm_lapic_state()
        // SAFETY: regs is KVM_APIC_REG_SIZE (1024) bytes inside kvm_lapic_state.
        withUnsafeMutableBytes(of: &s.regs) { raw in for i in 0..<LocalAPICState.size { raw[i] = state.bytes[i] } }
        _ = try checked(ckvm_set_lapic(fd, &s), "KVM_SET_LAPIC")
    }

    /// The vCPU's multiprocessing state (`KVM_MP_STATE_*`: 0 runnable, 1 waiting for
    /// INIT/SIPI, 3 halted). Wraps `KVM_GET_MP_STATE`.
    /// The guest-physical address KVM's own MMU gives `linear` in the vCPU's current paging
    /// mode (nil: not mapped). Wraps `KVM_TRANSLATE`; flowtrace's page walk is checked against it.
    public func translate(linear: UInt64) throws(KVMError) -> UInt64? {
        var t = kvm_translation()
        t.linear_address = linear
        _ = try checked(ckvm_translate(fd, &t), "KVM_TRANSLATE")
        return t.valid != 0 ? t.physical_address : nil
    }

    public func mpState() throws(KVMError) -> UInt32 {
        var s = kvm_mp_state()
        _ = try checked(ckvm_get_mp_state(fd, &s), "KVM_GET_MP_STATE")
        return s.mp_state
    }

    /// Sets the vCPU's multiprocessing state (3: halted, waiting for an interrupt in the
    /// in-kernel LAPIC). Wraps `KVM_SET_MP_STATE`.
    public func setMPState(_ state: UInt32) throws(KVMError) {
        var s = kvm_mp_state()
        s.mp_state = state
        _ = try checked(ckvm_set_mp_state(fd, &s), "KVM_SET_MP_STATE")
    }

    /// Writes model-specific registers. Wraps `KVM_SET_MSRS`; every entry must be taken.
    public func setMSRs(_ msrs: [(index: UInt32, value: UInt64)]) throws(KVMError) {
        guard !msrs.isEmpty else { return }
        let header = MemoryLayout<kvm_msrs>.size, entry = MemoryLayout<kvm_msr_entry>.stride
        // SAFETY: a buffer sized for the header and its entries, alive for the ioctl; entries
        // written through the typed pointer at their offsets.
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: header + msrs.count * entry, alignment: 8)
        defer { buffer.deallocate() }
        buffer.initializeMemory(as: UInt8.self, repeating: 0, count: header + msrs.count * entry)
        let h = buffer.assumingMemoryBound(to: kvm_msrs.self)
        h.pointee.nmsrs = UInt32(msrs.count)
        let entries = (buffer + header).assumingMemoryBound(to: kvm_msr_entry.self)
        for (i, m) in msrs.enumerated() { entries[i].index = m.index; entries[i].data = m.value }
        let n = try checked(ckvm_set_msrs(fd, h), "KVM_SET_MSRS")
        guard n == msrs.count else {
            throw KVMError.invalidArgument("KVM_SET_MSRS took \(n) of \(msrs.count) MSRs: MSR 0x\(String(msrs[Int(n)].index, radix: 16)) was refused")
        }
    }

    /// Pending exception and interrupt-shadow state. Wraps `KVM_GET_VCPU_EVENTS`.
    public func events() throws(KVMError) -> VCPUEvents {
        var e = kvm_vcpu_events()
        _ = try checked(ckvm_get_vcpu_events(fd, &e), "KVM_GET_VCPU_EVENTS")
        var out = VCPUEvents()
        out.exceptionInjected = e.exception.injected != 0
        out.exceptionNumber = e.exception.nr
        out.exceptionHasErrorCode = e.exception.has_error_code != 0
        out.exceptionErrorCode = e.exception.error_code
        out.interruptShadow = e.interrupt.shadow
        out.nmiPending = e.nmi.pending != 0
        return out
    }

    /// Sets pending exception and interrupt-shadow state, keeping the rest.
    /// Wraps `KVM_GET_VCPU_EVENTS` + `KVM_SET_VCPU_EVENTS`.
    public func setEvents(_ events: VCPUEvents) throws(KVMError) {
        var e = kvm_vcpu_events()
        _ = try checked(ckvm_get_vcpu_events(fd, &e), "KVM_GET_VCPU_EVENTS")
        e.exception.injected = events.exceptionInjected ? 1 : 0
        e.exception.nr = events.exceptionNumber
        e.exception.has_error_code = events.exceptionHasErrorCode ? 1 : 0
        e.exception.error_code = events.exceptionErrorCode
        e.interrupt.shadow = events.interruptShadow
        e.nmi.pending = events.nmiPending ? 1 : 0
        e.flags = UInt32(KVM_VCPUEVENT_VALID_NMI_PENDING | KVM_VCPUEVENT_VALID_SHADOW)
        _ = try checked(ckvm_set_vcpu_events(fd, &e), "KVM_SET_VCPU_EVENTS")
    }
}
