import FlowTrace
import Locking
import Synchronization

/// A `TraceTarget` with no machine behind it: registers and memory are plain values, and
/// `fire` plays the part of a breakpoint exit. For unit tests and the core benchmark.
public final class InMemoryTarget: TraceTarget {
    public let vcpuCount: Int
    private let armed = Locked<[UInt64: [(module: TraceModule, index: Int, vcpus: VCPUSelection)]]>([:])
    private let limitReports = Atomic<Int>(0)
    /// Registers, by storage, as 128 bits; absent storage reads as unreadable.
    public let registers: [X86Register.Storage: UInt128]
    /// Guest memory `memoryBase ..< memoryBase + memory.count`.
    public let memoryBase: UInt64
    public let memory: [UInt8]

    public init(vcpuCount: Int = 1, registers: [X86Register.Storage: UInt128] = [:], memoryBase: UInt64 = 0x1000,
                memory: [UInt8] = []) {
        self.vcpuCount = vcpuCount
        self.registers = registers
        self.memoryBase = memoryBase
        self.memory = memory
    }

    public func arm(_ module: TraceModule, locations: [ArmedLocation], vcpus: VCPUSelection) throws(TraceError) {
        armed.withLock { a in
            for l in locations { a[l.address, default: []].append((module, l.index, vcpus)) }
        }
    }

    public func disarm(_ module: TraceModule) throws(TraceError) { remove(module) }

    public func moduleReachedHitLimit(_ module: TraceModule) {
        limitReports.add(1, ordering: .relaxed)
        remove(module)
    }

    private func remove(_ module: TraceModule) {
        armed.withLock { a in
            for k in a.keys { a[k]!.removeAll { $0.module === module } }
        }
    }

    /// How many times a module reported reaching its hit limit.
    public var hitLimitReports: Int { limitReports.load(ordering: .relaxed) }

    /// Whether any module is armed at `address`.
    public func isArmed(_ address: UInt64) -> Bool { armed.withLock { !($0[address]?.isEmpty ?? true) } }

    /// Delivers a hit at `address` on `vcpu` to every module armed there, with this
    /// target's registers (overridden by `overrides`). Returns nil when nothing is armed
    /// there, else `.halt` if any module asked to halt.
    @discardableResult
    public func fire(at address: UInt64, vcpu: Int, overrides: [X86Register.Storage: UInt128] = [:]) -> HitAction? {
        let modules = armed.withLock { $0[address] ?? [] }
        guard !modules.isEmpty else { return nil }
        let context = Context(vcpu: vcpu, target: self, overrides: overrides)
        var action = HitAction.continue
        for m in modules where m.module.hit(location: m.index, context: context) == .halt { action = .halt }
        return action
    }

    /// The hit context `fire` delivers, for evaluating something against this target's
    /// registers and memory directly.
    public func context(vcpu: Int = 0, overrides: [X86Register.Storage: UInt128] = [:]) -> Context {
        Context(vcpu: vcpu, target: self, overrides: overrides)
    }

    public struct Context: HitContext {
        public let vcpu: Int
        let target: InMemoryTarget
        let overrides: [X86Register.Storage: UInt128]

        public func read(_ register: X86Register) throws(TraceError) -> RegisterValue {
            guard let raw = overrides[register.storage] ?? target.registers[register.storage] else {
                throw TraceError.registerUnreadable(register.name, reason: "not available in this target")
            }
            return RegisterValue(width: register.width, raw: raw, shift: register.shift)
        }

        public func readInteger(_ register: X86Register) throws(TraceError) -> UInt64 {
            guard let raw = overrides[register.storage] ?? target.registers[register.storage] else {
                throw TraceError.registerUnreadable(register.name, reason: "not available in this target")
            }
            return register.integer(fromStorage: raw)
        }

        public func readMemory(at address: UInt64, into buffer: inout MutableRawSpan) throws(TraceError) {
            let t = target
            guard address >= t.memoryBase, address - t.memoryBase + UInt64(buffer.byteCount) <= UInt64(t.memory.count) else {
                throw TraceError.memoryUnreadable(address: address, size: buffer.byteCount, reason: "not mapped")
            }
            let start = Int(address - t.memoryBase)
            for k in 0 ..< buffer.byteCount { buffer.storeBytes(of: t.memory[start + k], toByteOffset: k, as: UInt8.self) }
        }
    }
}
