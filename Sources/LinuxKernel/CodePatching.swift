import ELF

/// Where a Linux kernel rewrites its own code, read from the kernel's tables, so that a
/// probe never sits where the kernel patches.
///
/// - ftrace: `__mcount_loc` lists every `call __fentry__` at a function's start (after an
///   `endbr64` with IBT); `ftrace_init` turns each into a 5-byte NOP while the kernel boots,
///   and enabling a tracer rewrites it again, both after checking the old bytes. A probe
///   on such a function's entry goes just past the call: the registers are the entry's.
/// - jump labels (`__jump_table`: s32 code, s32 target, s64 key; 2- or 5-byte sites) and
///   static calls (`static_call_sites`: s32 address, s32 key; 5-byte calls; `__SCT__*`
///   trampolines) are rewritten at any time, with a BUG when the bytes are not what the
///   kernel expects: probes there are refused.
/// - alternatives, paravirt, retpolines and returns are applied once, before `rest_init`:
///   software probes wait for that (`ProbeGate`).
/// - init memory (`__init_begin` .. `__init_end`) is freed, poisoned and reused once the
///   kernel has booted: software probes there are refused.
public struct LinuxCodePatching: Sendable {
    public struct Site: Sendable, Equatable {
        public var range: Range<UInt64>
        public var what: String
    }

    /// Addresses of `call __fentry__` sites.
    public let fentrySites: Set<UInt64>
    /// Runtime-patched sites, sorted by start.
    public let sites: [Site]
    public let initMemory: Range<UInt64>?
    /// What could not be read (a table missing from the symbols), in words.
    public let unknown: [String]

    public init(vmlinux: ELFImage, symbols: Symbolizer) {
        @Sendable func read(_ address: UInt64, _ count: Int) -> [UInt8]? {
            for s in vmlinux.segments where s.virtualAddress <= address && address &+ UInt64(count) <= s.virtualAddress &+ s.fileSize {
                let o = Int(address - s.virtualAddress)
                return Array(s.data[o..<(o + count)])
            }
            return nil
        }
        func le(_ b: [UInt8], _ at: Int, _ n: Int) -> UInt64 { (0..<n).reduce(0) { $0 | UInt64(b[at + $1]) << (8 * UInt64($1)) } }
        func table(_ name: String, entry: Int) -> (start: UInt64, bytes: [UInt8])? {
            guard let a = symbols.address(of: "__start_" + name), let b = symbols.address(of: "__stop_" + name), b >= a,
                  (b - a) % UInt64(entry) == 0, b - a < 64 << 20, let bytes = read(a, Int(b - a)) else { return nil }
            return (a, bytes)
        }
        var unknown: [String] = []
        var fentry = Set<UInt64>()
        if let (_, b) = table("mcount_loc", entry: 8) {
            for i in stride(from: 0, to: b.count, by: 8) { fentry.insert(le(b, i, 8)) }
        } else {
            unknown.append("ftrace call sites (__mcount_loc)")
        }
        var sites: [Site] = []
        if let (start, b) = table("__jump_table", entry: 16) {
            for i in stride(from: 0, to: b.count, by: 16) {
                let code = start &+ UInt64(i) &+ UInt64(bitPattern: Int64(Int32(truncatingIfNeeded: le(b, i, 4))))
                sites.append(Site(range: code ..< code + 5, what: "a jump label"))
            }
        } else {
            unknown.append("jump labels (__jump_table)")
        }
        if let (start, b) = table("static_call_sites", entry: 8) {
            for i in stride(from: 0, to: b.count, by: 8) {
                let code = start &+ UInt64(i) &+ UInt64(bitPattern: Int64(Int32(truncatingIfNeeded: le(b, i, 4))))
                sites.append(Site(range: code ..< code + 5, what: "a static call"))
            }
        }
        for s in vmlinux.symbols where s.name.hasPrefix("__SCT__") && s.size > 0 {
            sites.append(Site(range: s.address ..< s.address + min(s.size, 16), what: "the static call trampoline \(s.name)"))
        }
        self.fentrySites = fentry
        self.sites = sites.sorted { $0.range.lowerBound < $1.range.lowerBound }
        if let a = symbols.address(of: "__init_begin"), let b = symbols.address(of: "__init_end"), b > a {
            initMemory = a ..< b
        } else {
            initMemory = nil
        }
        self.unknown = unknown
        self.readCode = { a in read(a, 9) }
    }

    private let readCode: @Sendable (UInt64) -> [UInt8]?

    public enum Placement: Sendable, Equatable {
        /// At the address asked for.
        case at(UInt64)
        /// Just past the function's ftrace call site at `site`.
        case afterFentry(UInt64, site: UInt64)
        /// Nowhere: the reason.
        case refused(String)
    }

    /// Where a probe asked for at `address` goes.
    public func place(_ address: UInt64) -> Placement {
        // The site may follow an endbr64 (F3 0F 1E FA) at the function's start.
        var call = address
        if let b = readCode(address), b.count >= 4, b[0] == 0xF3, b[1] == 0x0F, b[2] == 0x1E, b[3] == 0xFA, fentrySites.contains(address + 4) {
            call = address + 4
        }
        if fentrySites.contains(call) { return .afterFentry(call + 5, site: call) }
        if let s = site(containing: address) { return .refused("it is in \(s.what) at 0x\(String(s.range.lowerBound, radix: 16)), code the kernel rewrites while it runs") }
        return .at(address)
    }

    /// The runtime-patched site `address` lies in.
    public func site(containing address: UInt64) -> Site? {
        var lo = 0, hi = sites.count
        while lo < hi {
            let mid = (lo + hi) / 2
            if sites[mid].range.lowerBound <= address { lo = mid + 1 } else { hi = mid }
        }
        // Sites may overlap (a trampoline symbol and a site): look a few back.
        for s in sites[max(0, lo - 4)..<lo].reversed() where s.range.contains(address) { return s }
        return nil
    }
}
