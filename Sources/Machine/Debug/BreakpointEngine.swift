import FlowTrace

/// How probe locations become exits.
public enum BreakpointEngine: String, Sendable, CaseIterable, CustomStringConvertible {
    /// Patch 0xCC; `KVM_GUESTDBG_USE_SW_BP`; `KVM_EXIT_DEBUG` exception 3 at the address.
    case int3
    /// The same patching engine with 0xF4: `KVM_EXIT_HLT` one past the address. Needs the
    /// code at CPL0 and no in-kernel irqchip (the payload platform).
    case hlt
    /// DR0-DR3 execute breakpoints (`KVM_GUESTDBG_USE_HW_BP`): at most 4 locations.
    case hw
    /// `KVM_GUESTDBG_SINGLESTEP` on every traced vCPU, comparing rip with the probe set.
    case step

    public var description: String { rawValue }

    /// The most distinct addresses the engine can arm (nil: no limit).
    public var capacity: Int? { self == .hw ? 4 : nil }

    /// The byte a patching engine writes, nil for the others.
    public var trapByte: UInt8? {
        switch self {
        case .int3: 0xCC
        case .hlt: X86Opcode.hlt
        case .hw, .step: nil
        }
    }
}

/// The engine a user asks for.
public enum EngineRequest: Sendable, Equatable, CustomStringConvertible {
    /// The best engine that works here for the number of locations (see `resolve`).
    case auto
    case engine(BreakpointEngine)

    public var description: String {
        switch self {
        case .auto: "auto"
        case let .engine(e): e.rawValue
        }
    }

    /// The engine to use for `locations` distinct addresses given what works on this host,
    /// and why. `auto` prefers int3, then hlt, then hw when the locations fit in 4, then step.
    public func resolve(locations: Int, support: EngineSupport) throws(MachineError) -> (BreakpointEngine, reason: String) {
        switch self {
        case let .engine(e):
            if case let .unavailable(why) = support.status(e) {
                let working = BreakpointEngine.allCases.filter { support.works($0) }.map(\.rawValue)
                throw MachineError.engineUnavailable(e, reason: why, working: working)
            }
            if let cap = e.capacity, locations > cap {
                throw MachineError.tooManyLocations(e, count: locations, capacity: cap)
            }
            return (e, "requested")
        case .auto:
            var skipped: [String] = []
            for e in [BreakpointEngine.int3, .hlt, .hw, .step] {
                if case let .unavailable(why) = support.status(e) { skipped.append("\(e): \(why)"); continue }
                if let cap = e.capacity, locations > cap { skipped.append("\(e): \(locations) locations exceed its \(cap)"); continue }
                let why = skipped.isEmpty ? "the fastest engine, and it works on this host"
                                          : "the fastest that works here (\(skipped.joined(separator: "; ")))"
                return (e, why)
            }
            throw MachineError.engineUnavailable(.step, reason: skipped.joined(separator: "; "), working: [])
        }
    }
}

/// Which engines work on this host, from the self-test.
public struct EngineSupport: Sendable, Equatable {
    public enum Status: Sendable, Equatable {
        case works
        /// With the exit or error that showed it.
        case unavailable(String)
    }

    public var statuses: [BreakpointEngine: Status]

    public init(statuses: [BreakpointEngine: Status]) { self.statuses = statuses }

    public func status(_ e: BreakpointEngine) -> Status { statuses[e] ?? .unavailable("not tested") }

    /// What works on `platform`: the host's results, less what the platform rules out.
    public func restricted(to platform: Platform) -> EngineSupport {
        var s = self
        for e in BreakpointEngine.allCases {
            if let why = platform.restriction(e) { s.statuses[e] = .unavailable(why) }
        }
        return s
    }
    public func works(_ e: BreakpointEngine) -> Bool { status(e) == .works }
}

/// The patched bytes of the software-breakpoint engine: pure bookkeeping, no KVM, so its
/// rules are unit-tested anywhere.
public struct PatchTable: Sendable, Equatable {
    public struct Patch: Sendable, Equatable {
        /// Guest-physical address of the patched byte.
        public var physical: UInt64
        /// The byte that was there before the trap byte.
        public var original: UInt8
    }

    /// The trap byte this table writes.
    public let trap: UInt8
    /// Guest-virtual address -> patch.
    public private(set) var patches: [UInt64: Patch] = [:]

    public init(trap: UInt8) { self.trap = trap }

    public func isPatched(_ address: UInt64) -> Bool { patches[address] != nil }

    /// Records a patch at `address` whose current byte is `current`; returns the byte to
    /// write, or nil when the address is already patched (shared by another owner).
    public mutating func insert(_ address: UInt64, physical: UInt64, current: UInt8) -> UInt8? {
        guard patches[address] == nil else { return nil }
        patches[address] = Patch(physical: physical, original: current)
        return trap
    }

    /// Forgets the patch at `address` and returns the byte to write back: the original, but
    /// only when the trap byte is still there (the guest may have rewritten its code since);
    /// nil when nothing should be written.
    public mutating func remove(_ address: UInt64, current: UInt8) -> UInt8? {
        guard let p = patches.removeValue(forKey: address) else { return nil }
        return current == trap ? p.original : nil
    }

    /// The original byte at a patched address (for stepping over it).
    public func original(at address: UInt64) -> UInt8? { patches[address]?.original }

    /// Whether a trap at `address` is ours or the guest's own (an int3 we must re-inject,
    /// or a hlt that ends its vCPU).
    public func owns(trapAt address: UInt64) -> Bool { patches[address] != nil }
}

/// RFLAGS bits the engines look at.
enum X86Flags {
    /// TF: the CPU traps (#DB) after each instruction.
    static let trap: UInt64 = 0x100
    /// IF: maskable interrupts are taken.
    static let interrupts: UInt64 = 0x200
}

/// One-byte x86 opcodes the engines write and look for.
enum X86Opcode {
    static let hlt: UInt8 = 0xF4
    static let int3: UInt8 = 0xCC
}
