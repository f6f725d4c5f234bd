import Foundation
import KVM
import Locking
import Machine

/// The programs and guest the `exits` and `scaling` parts run (tools/bench builds them).
struct ExitBenchSetup {
    /// `tools/raw-exits.c`, built.
    let rawExits: String
    /// The release `flowtrace`.
    let flowtrace: String
    /// `guests/build/loop-N.elf`.
    let guest: String
    let calls: Int
    /// `tick`'s address in the guest.
    let tick: UInt64

    static func fromEnvironment() throws -> ExitBenchSetup {
        let env = ProcessInfo.processInfo.environment
        let calls = Int(env["LOOP_CALLS"] ?? "") ?? 20000
        let guest = (env["GUESTS"] ?? "guests/build") + "/loop-\(calls).elf"
        guard let raw = env["RAW_EXITS"], let ft = env["FLOWTRACE"] else {
            throw BenchError("the exits and scaling parts need RAW_EXITS and FLOWTRACE: run them through tools/bench")
        }
        let m = try Machine(path: guest)
        guard let tick = m.symbolizer.address(of: "tick") else { throw BenchError("\(guest) has no symbol tick") }
        return ExitBenchSetup(rawExits: raw, flowtrace: ft, guest: guest, calls: calls, tick: tick)
    }
}

struct BenchError: Error, CustomStringConvertible {
    var description: String
    init(_ d: String) { description = d }
}

/// Runs `path` with `args`; returns stdout and stderr, throwing on a non-zero exit.
func runProgram(_ path: String, _ args: [String]) throws -> (out: String, err: String) {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: path)
    p.arguments = args
    let out = Pipe(), err = Pipe()
    p.standardOutput = out
    p.standardError = err
    try p.run()
    let errData = Locked(Data())
    let done = DispatchSemaphore(value: 0)
    DispatchQueue.global().async {
        let d = err.fileHandleForReading.readDataToEndOfFile()
        errData.withLock { $0 = d }
        done.signal()
    }
    let o = String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
    done.wait()
    p.waitUntilExit()
    let e = errData.withLock { String(decoding: $0, as: UTF8.self) }
    guard p.terminationStatus == 0 else { throw BenchError("\(path) \(args.joined(separator: " ")) exited \(p.terminationStatus): \(e)") }
    return (o, e)
}

/// One raw-exits run: (hits, seconds).
func rawRun(_ s: ExitBenchSetup, _ engine: String) throws -> (hits: Int, seconds: Double) {
    let line = try runProgram(s.rawExits, [s.guest, "0x" + String(s.tick, radix: 16), engine]).out
    var fields: [String: String] = [:]
    for kv in line.split(whereSeparator: { $0 == " " || $0 == "\n" }) {
        let parts = kv.split(separator: "=", maxSplits: 1)
        if parts.count == 2 { fields[String(parts[0])] = String(parts[1]) }
    }
    guard let hits = fields["hits"].flatMap({ Int($0) }), let ns = fields["elapsed_ns"].flatMap({ Double($0) }), fields["exit"] == "0" else {
        throw BenchError("raw-exits printed '\(line)'")
    }
    return (hits, ns / 1e9)
}

/// One `flowtrace run` of the loop guest: (hits, seconds of guest run time, from its summary).
func flowtraceRun(_ s: ExitBenchSetup, engine: String?, vcpus: Int = 1) throws -> (hits: Int, seconds: Double) {
    var args = ["run", s.guest, "--vcpus", "\(vcpus)"]
    if let engine {
        // The issue's probe: 4 registers + 16 bytes of memory.
        args += ["--engine", engine, "--probe", "tick:rdi,rsi,rax,rsp,[tick_calls]:16", "--format", "jsonl", "-o", "/dev/null"]
    }
    let err = try runProgram(s.flowtrace, args).err
    // "flowtrace: loop-N.elf: guest exited with status 0 after 0.412345 s (1 vCPU)"
    guard let after = err.range(of: "guest exited with status 0 after "),
          let secs = Double(err[after.upperBound...].prefix { $0 != " " }) else {
        throw BenchError("flowtrace run printed: \(err)")
    }
    var hits = 0
    if engine != nil {
        // "flowtrace: 20000 hits (21.4k hits/s), ..."
        guard let line = err.split(separator: "\n").first(where: { $0.contains(" hits (") }),
              let n = Int(line.split(separator: " ")[1]) else { throw BenchError("no hit count in: \(err)") }
        hits = n
    }
    return (hits, secs)
}

/// Part `exits`: flowtrace's cost per hit next to the raw exit cost of the same engine,
/// measured alternately in the same run.
func exits() throws -> [Figure] {
    let s = try ExitBenchSetup.fromEnvironment()
    let support = EngineSelfTest.support(host: try KVMHost())
    var figures: [Figure] = []
    for engine in ["int3", "hlt", "hw"] {
        guard support.works(BreakpointEngine(rawValue: engine)!) else {
            figures.append(Figure(label: "exits \(engine): raw vs flowtrace (ns/hit)", value: "does not work here",
                                  json: #"{"bench":"exits.ratio","engine":"\#(engine)","works":false}"#))
            continue
        }
        var raw: [Double] = [], ft: [Double] = [], ratios: [Double] = []
        for _ in 0..<runs {
            // Alternating, so drift on the machine hits both sides alike.
            let rawBase = try rawRun(s, "none"), rawTraced = try rawRun(s, engine)
            let ftBase = try flowtraceRun(s, engine: nil), ftTraced = try flowtraceRun(s, engine: engine)
            guard rawTraced.hits == s.calls, ftTraced.hits == s.calls else {
                throw BenchError("expected \(s.calls) hits, raw \(rawTraced.hits), flowtrace \(ftTraced.hits)")
            }
            let r = (rawTraced.seconds - rawBase.seconds) * 1e9 / Double(s.calls)
            let f = (ftTraced.seconds - ftBase.seconds) * 1e9 / Double(s.calls)
            raw.append(r); ft.append(f); ratios.append(f / r)
        }
        let rm = median(raw), fm = median(ft), q = median(ratios)
        figures.append(Figure(
            label: "exits \(engine): raw / flowtrace ns per hit, ratio (median of \(runs); ratio min-max)",
            value: "\(Int(rm.rounded())) / \(Int(fm.rounded())), \(String(format: "%.3f", q)) [\(String(format: "%.3f", ratios.min()!))-\(String(format: "%.3f", ratios.max()!))]",
            json: #"{"bench":"exits.ratio","engine":"\#(engine)","raw_ns_per_hit":\#(Int(rm.rounded())),"flowtrace_ns_per_hit":\#(Int(fm.rounded())),"ratio":\#(String(format: "%.3f", q)),"ratio_min":\#(String(format: "%.3f", ratios.min()!)),"ratio_max":\#(String(format: "%.3f", ratios.max()!)),"hits":\#(s.calls),"runs":\#(runs)}"#))
    }
    return figures
}

/// Part `io`: ns per port-I/O exit of `uart-burst.elf` (100,000 bytes to COM1's THR, one
/// exit each): flowtrace (its 16550A model, output to a file, `--serial file:/dev/null`)
/// next to the raw exit loop answering the same exits (`raw-exits ... io`), alternating.
func io() throws -> [Figure] {
    let env = ProcessInfo.processInfo.environment
    guard let rawExits = env["RAW_EXITS"], let flowtrace = env["FLOWTRACE"] else {
        throw BenchError("the io part needs RAW_EXITS and FLOWTRACE: run it through tools/bench")
    }
    let guest = (env["GUESTS"] ?? "guests/build") + "/uart-burst.elf"
    let bytes = 100_000
    var raw: [Double] = [], ft: [Double] = [], ratios: [Double] = []
    for _ in 0..<runs {
        let line = try runProgram(rawExits, [guest, "0", "io"]).out
        guard let h = line.split(separator: " ").first(where: { $0.hasPrefix("hits=") }), Int(h.dropFirst(5)) == bytes,
              let t = line.split(separator: " ").first(where: { $0.hasPrefix("elapsed_ns=") }), let ns = Double(t.dropFirst(11)) else {
            throw BenchError("raw-exits io printed '\(line)'")
        }
        let err = try runProgram(flowtrace, ["run", guest, "--serial", "file:/dev/null"]).err
        guard let after = err.range(of: "guest exited with status 0 after "),
              let secs = Double(err[after.upperBound...].prefix { $0 != " " }) else {
            throw BenchError("flowtrace run printed: \(err)")
        }
        let r = ns / Double(bytes), f = secs * 1e9 / Double(bytes)
        raw.append(r); ft.append(f); ratios.append(f / r)
    }
    let rm = median(raw), fm = median(ft), q = median(ratios)
    return [Figure(
        label: "io: raw / flowtrace ns per port exit (UART, 100,000 bytes), ratio (median of \(runs); ratio min-max)",
        value: "\(Int(rm.rounded())) / \(Int(fm.rounded())), \(String(format: "%.3f", q)) [\(String(format: "%.3f", ratios.min()!))-\(String(format: "%.3f", ratios.max()!))]",
        json: #"{"bench":"io.ratio","raw_ns_per_exit":\#(Int(rm.rounded())),"flowtrace_ns_per_exit":\#(Int(fm.rounded())),"ratio":\#(String(format: "%.3f", q)),"ratio_min":\#(String(format: "%.3f", ratios.min()!)),"ratio_max":\#(String(format: "%.3f", ratios.max()!)),"exits":\#(bytes),"runs":\#(runs)}"#)]
}

/// Part `scaling`: traced hits/s of the loop guest on 1 and 2 vCPUs, per engine.
func scaling() throws -> [Figure] {
    let s = try ExitBenchSetup.fromEnvironment()
    let support = EngineSelfTest.support(host: try KVMHost())
    var figures: [Figure] = []
    for engine in ["int3", "hlt", "hw"] where support.works(BreakpointEngine(rawValue: engine)!) {
        var one: [Double] = [], two: [Double] = []
        for _ in 0..<runs {
            let a = try flowtraceRun(s, engine: engine, vcpus: 1)
            let b = try flowtraceRun(s, engine: engine, vcpus: 2)
            guard a.hits == s.calls, b.hits == 2 * s.calls else { throw BenchError("unexpected hit counts \(a.hits), \(b.hits)") }
            one.append(Double(a.hits) / a.seconds); two.append(Double(b.hits) / b.seconds)
        }
        let r1 = median(one), r2 = median(two)
        figures.append(Figure(
            label: "scaling \(engine): hits/s on 1 / 2 vCPUs, speed-up (median of \(runs))",
            value: "\(Int(r1.rounded())) / \(Int(r2.rounded())), \(String(format: "%.2f", r2 / r1))x",
            json: #"{"bench":"scaling","engine":"\#(engine)","hits_per_s_1vcpu":\#(Int(r1.rounded())),"hits_per_s_2vcpus":\#(Int(r2.rounded())),"speedup":\#(String(format: "%.2f", r2 / r1)),"runs":\#(runs)}"#))
    }
    return figures
}

func median(_ xs: [Double]) -> Double { xs.sorted()[xs.count / 2] }
