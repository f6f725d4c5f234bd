// flowtrace-bench: figures for tools/bench. Prints a table, then one JSON line per figure.
// Parts: `core` (the flow-trace hit path, reports and memory, on an in-memory target),
// `exits` (flowtrace's cost per hit next to a raw KVM exit loop, tools/raw-exits.c), `io`
// (ns per port exit of a guest writing 100,000 bytes to COM1, flowtrace's UART vs the raw loop),
// `scaling` (traced hits/s on 1 and 2 vCPUs), `engines` (per-hit cost of every engine,
// step included, on the counter guest), `graph` (building a control-flow graph from an ELF
// file). `exits`, `io`, `scaling` and `engines` need /dev/kvm.
import FlowTrace
import FlowTraceSimulation
import Foundation
import KVM
import Sys

struct Figure {
    var label: String
    var value: String
    var json: String
}

/// Registers in an array and memory in a buffer: the cheapest context a target can offer,
/// so the figures measure the module, not the target.
struct ArrayContext: HitContext {
    let vcpu: Int
    let registers: [UInt64]
    let memory: [UInt8]
    let memoryBase: UInt64

    func read(_ register: X86Register) throws(TraceError) -> RegisterValue {
        guard case let .general(i) = register.storage else { throw .registerUnreadable(register.name, reason: "not simulated") }
        return RegisterValue(width: register.width, raw: UInt128(registers[i]), shift: register.shift)
    }

    func readInteger(_ register: X86Register) throws(TraceError) -> UInt64 {
        guard case let .general(i) = register.storage else { throw .registerUnreadable(register.name, reason: "not simulated") }
        return register.integer(fromStorage: UInt128(registers[i]))
    }

    func readMemory(at address: UInt64, into buffer: inout MutableRawSpan) throws(TraceError) {
        guard address >= memoryBase, Int(address - memoryBase) + buffer.byteCount <= memory.count else {
            throw .memoryUnreadable(address: address, size: buffer.byteCount, reason: "not mapped")
        }
        let start = Int(address - memoryBase)
        for k in 0 ..< buffer.byteCount { buffer.storeBytes(of: memory[start + k], toByteOffset: k, as: UInt8.self) }
    }
}

func probeOf4RegistersAnd16Bytes() throws -> Probe {
    Probe("bench", entries: try ["rdi", "rsi", "rax", "rbx"].map { try ProbeEntry.register(named: $0) } + [try .memory(at: 0x1000, size: 16)])
}

func seconds(_ d: Duration) -> Double { Double(d.components.seconds) + Double(d.components.attoseconds) / 1e18 }

func residentBytes() -> Int {
    guard let s = try? String(contentsOfFile: "/proc/self/statm", encoding: .utf8),
          let pages = s.split(separator: " ").dropFirst().first.flatMap({ Int($0) }) else { return 0 }
    return pages * Int(sysconf(Int32(_SC_PAGESIZE)))
}

/// `rdi > 5 && rsi < 0x10000`: two comparisons, true for the bench's registers (so the hit
/// records as it does without a condition).
func twoComparisons() throws -> ProbeCondition {
    let rdi = try X86Register.resolve("rdi"), rsi = try X86Register.resolve("rsi")
    return try ProbeCondition(.binary(.logicalAnd, .binary(.greater, .register(rdi), .constant(5)),
                                      .binary(.less, .register(rsi), .constant(0x10000))), text: "rdi > 5 && rsi < 0x10000")
}

func hitBench(threads: Int, hitsPerThread: Int, condition: ProbeCondition? = nil) throws -> Double {
    let target = InMemoryTarget(vcpuCount: threads)
    let module = try TraceModule(target: target)
    try module.addProbe(probeOf4RegistersAnd16Bytes(), at: 0x100, condition: condition)
    try module.enable(maxRecords: 100_000)
    let mem = [UInt8](repeating: 0x5A, count: 4096)
    let group = DispatchGroup()
    let start = ContinuousClock.now
    for k in 0..<threads {
        group.enter()
        Thread {
            let ctx = ArrayContext(vcpu: k, registers: (0..<16).map { UInt64($0) * 0x1111 }, memory: mem, memoryBase: 0x1000)
            for _ in 0..<hitsPerThread { _ = module.hit(location: 0, context: ctx) }
            group.leave()
        }.start()
    }
    group.wait()
    let elapsed = seconds(ContinuousClock.now - start)
    precondition(module.counters.recordsTaken == UInt64(threads * hitsPerThread))
    // Wall time per hit per thread: what one vCPU pays.
    return elapsed * 1e9 / Double(hitsPerThread)
}

func reportBench(records: Int) throws -> (reportMs: Double, filterMs: Double, kept: Int, bytesPerRecord: Double, slotPayload: Int) {
    let target = InMemoryTarget()
    let module = try TraceModule(target: target)
    try module.addProbe(probeOf4RegistersAnd16Bytes(), at: 0x100)
    try module.addProbe(probeOf4RegistersAnd16Bytes(), at: 0x200)
    try module.enable()
    var ctx = ArrayContext(vcpu: 0, registers: (0..<16).map { UInt64($0) }, memory: [UInt8](repeating: 0x5A, count: 4096), memoryBase: 0x1000)
    let before = residentBytes()
    for i in 0..<records {
        if i % 1024 == 0 { ctx = ArrayContext(vcpu: (i / 1024) % 2, registers: (0..<16).map { UInt64($0 + i) }, memory: ctx.memory, memoryBase: 0x1000) }
        _ = module.hit(location: i & 1, context: ctx)
    }
    let after = residentBytes()
    let t0 = ContinuousClock.now
    let report = module.report()
    let t1 = ContinuousClock.now
    let filtered = report.filtered(by: [.address(0x200...0x200), .vcpu(1...1)], combining: .all)
    let t2 = ContinuousClock.now
    precondition(report.count == records && filtered.count > 0)
    return (seconds(t1 - t0) * 1e3, seconds(t2 - t1) * 1e3, filtered.count, Double(after - before) / Double(records), 0)
}

/// Median and spread (min, max) of `runs` measurements.
func repeated(_ runs: Int, _ measure: () throws -> Double) rethrows -> (median: Double, min: Double, max: Double) {
    var xs: [Double] = []
    for _ in 0..<runs { xs.append(try measure()) }
    xs.sort()
    return (xs[xs.count / 2], xs.first!, xs.last!)
}

func f1(_ x: Double) -> String { String(format: "%.1f", x) }

let runs = Int(ProcessInfo.processInfo.environment["BENCH_RUNS"] ?? "") ?? 5

func core() throws -> [Figure] {
    var figures: [Figure] = []
    for threads in [1, 2] {
        let r = try repeated(runs) { try hitBench(threads: threads, hitsPerThread: 1_000_000) }
        figures.append(Figure(label: "core hit, \(threads) thread\(threads == 1 ? "" : "s") (ns/hit, median [min-max] of \(runs))",
                              value: "\(f1(r.median)) [\(f1(r.min))-\(f1(r.max))]",
                              json: #"{"bench":"core.hit","threads":\#(threads),"ns_per_hit":\#(f1(r.median)),"min":\#(f1(r.min)),"max":\#(f1(r.max)),"runs":\#(runs)}"#))
    }
    // The same hit with a two-comparison condition that holds, alternating with the plain
    // hit so drift hits both alike; the goal is at most 1.2x.
    var plain: [Double] = [], conditional: [Double] = [], ratios: [Double] = []
    let condition = try twoComparisons()
    for _ in 0..<runs {
        let a = try hitBench(threads: 1, hitsPerThread: 1_000_000)
        let b = try hitBench(threads: 1, hitsPerThread: 1_000_000, condition: condition)
        plain.append(a); conditional.append(b); ratios.append(b / a)
    }
    let q = median(ratios)
    figures.append(Figure(label: "core hit with 'rdi > 5 && rsi < 0x10000' / without (ns/hit, ratio; median of \(runs), ratio min-max)",
                          value: "\(f1(median(conditional))) / \(f1(median(plain))), \(String(format: "%.3f", q)) [\(String(format: "%.3f", ratios.min()!))-\(String(format: "%.3f", ratios.max()!))]",
                          json: #"{"bench":"core.condition","ns_per_hit":\#(f1(median(conditional))),"plain_ns_per_hit":\#(f1(median(plain))),"ratio":\#(String(format: "%.3f", q)),"ratio_min":\#(String(format: "%.3f", ratios.min()!)),"ratio_max":\#(String(format: "%.3f", ratios.max()!)),"runs":\#(runs)}"#))
    let n = 1_000_000
    var last = (reportMs: 0.0, filterMs: 0.0, kept: 0, bytesPerRecord: 0.0, slotPayload: 0)
    let total = try repeated(runs) {
        last = try reportBench(records: n)
        return last.reportMs + last.filterMs
    }
    let r = last
    figures.append(Figure(label: "report + filter of 1M records (ms, median [min-max] of \(runs))",
                          value: "\(f1(total.median)) [\(f1(total.min))-\(f1(total.max))]",
                          json: #"{"bench":"core.report_filter","records":\#(n),"ms":\#(f1(total.median)),"min":\#(f1(total.min)),"max":\#(f1(total.max)),"runs":\#(runs)}"#))
    // Payload: 4 registers x 8 bytes + 16 bytes of memory.
    let payload = 4 * 8 + 16
    figures.append(Figure(label: "bytes per kept record (payload \(payload))", value: String(format: "%.1f", r.bytesPerRecord),
                          json: #"{"bench":"core.memory","bytes_per_record":\#(String(format: "%.1f", r.bytesPerRecord)),"payload_bytes":\#(payload)}"#))
    return figures
}

let parts = CommandLine.arguments.dropFirst()
var figures: [Figure] = []
let kvm = KVMHost.isUsable()
for part in parts.isEmpty ? ["core", "exits", "io", "scaling", "engines", "graph"] : Array(parts) {
    if part != "core", !kvm, ["exits", "io", "scaling", "engines", "stream"].contains(part) {
        figures.append(Figure(label: "\(part)", value: "skipped: needs a usable /dev/kvm", json: #"{"bench":"\#(part)","skipped":"needs a usable /dev/kvm"}"#))
        continue
    }
    do {
        switch part {
        case "core": figures += try core()
        case "exits": figures += try exits()
        case "io": figures += try io()
        case "scaling": figures += try scaling()
        case "engines": figures += try engines(guests: ProcessInfo.processInfo.environment["GUESTS"] ?? "guests/build")
        case "graph": figures += try graphs(guests: ProcessInfo.processInfo.environment["GUESTS"] ?? "guests/build")
        case "stream": figures += try stream()
        default:
            say("flowtrace-bench: unknown part '\(part)'; parts: core, exits, io, scaling, engines, graph, stream", to: STDERR_FILENO)
            exit(64)
        }
    } catch {
        say("flowtrace-bench: \(part): \(error)", to: STDERR_FILENO)
        exit(1)
    }
}
let width = figures.map(\.label.count).max() ?? 0
for f in figures { say(f.label.padding(toLength: width, withPad: " ", startingAt: 0) + "  " + f.value, to: STDOUT_FILENO) }
for f in figures { say(f.json, to: STDOUT_FILENO) }

/// A line to `fd`; a failed write (a full disk, a closed pipe) exits 74.
func say(_ line: String, to fd: Int32) {
    do throws(SystemError) { try writeAll(fd, Array((line + "\n").utf8)) } catch { exit(74) }
}
