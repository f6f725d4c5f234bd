import Foundation
import KVM
import Machine

/// A child process's exit status, peak resident memory (wait4's ru_maxrss) and stderr.
struct MeasuredRun {
    var status: Int32
    var maxRSSBytes: Int
    var stderr: String
}

/// Runs `path args` with stdout to /dev/null and stderr to a temporary file, reaping it with
/// wait4(2) for its own peak RSS (not the largest of every child so far, as
/// RUSAGE_CHILDREN would give).
func runMeasured(_ path: String, _ args: [String]) throws -> MeasuredRun {
    let errPath = NSTemporaryDirectory() + "flowtrace-bench-\(getpid())-stderr"
    var actions = posix_spawn_file_actions_t()
    posix_spawn_file_actions_init(&actions)
    defer { posix_spawn_file_actions_destroy(&actions) }
    posix_spawn_file_actions_addopen(&actions, 1, "/dev/null", O_WRONLY, 0)
    posix_spawn_file_actions_addopen(&actions, 2, errPath, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
    // The strings live until the process exits (a handful, once per run).
    var argv = ([path] + args).map { strdup($0) }
    argv.append(nil)
    var pid: pid_t = 0
    let rc = posix_spawn(&pid, path, &actions, nil, argv, environ)
    guard rc == 0 else { throw BenchError("posix_spawn \(path): \(String(cString: strerror(rc)))") }
    var status: Int32 = 0
    var usage = rusage()
    while wait4(pid, &status, 0, &usage) < 0 {
        guard errno == EINTR else { throw BenchError("wait4: \(String(cString: strerror(errno)))") }
    }
    let err = (try? String(contentsOfFile: errPath, encoding: .utf8)) ?? ""
    unlink(errPath)
    let exited = status & 0x7F == 0
    return MeasuredRun(status: exited ? (status >> 8) & 0xFF : 128 + (status & 0x7F), maxRSSBytes: usage.ru_maxrss * 1024, stderr: err)
}

/// "guest exited with status 0 after S s" and "N records written" from a summary.
func streamFigures(_ err: String) throws -> (seconds: Double, written: Int) {
    guard let after = err.range(of: "guest exited with status 0 after "),
          let secs = Double(err[after.upperBound...].prefix { $0 != " " }),
          let w = err.range(of: " records written to ") else {
        throw BenchError("flowtrace run printed: \(err)")
    }
    let digits = err[..<w.lowerBound].reversed().prefix { $0.isNumber }
    guard let written = Int(String(digits.reversed())) else { throw BenchError("no written count in: \(err)") }
    return (secs, written)
}

/// Part `stream`: jsonl written while the guest runs.
/// - records per second written to a file and to /dev/null (the loop guest, STREAM_CALLS
///   calls, default 200,000; the exits part's probe: 4 registers and 16 bytes);
/// - ns per hit streaming to a file next to the raw exit loop, alternating as in `exits`
///   (the goal: at most 1.10x the raw cost);
/// - a run of STREAM_RECORDS (default 10,000,000) records to a file: its peak RSS (the
///   goal: under 200 MB) and the records written.
func stream() throws -> [Figure] {
    let env = ProcessInfo.processInfo.environment
    guard let rawExits = env["RAW_EXITS"], let flowtrace = env["FLOWTRACE"] else {
        throw BenchError("the stream part needs RAW_EXITS and FLOWTRACE: run it through tools/bench")
    }
    let guests = env["GUESTS"] ?? "guests/build"
    let calls = Int(env["STREAM_CALLS"] ?? "") ?? 200_000
    let big = Int(env["STREAM_RECORDS"] ?? "") ?? 10_000_000
    let support = EngineSelfTest.support(host: try KVMHost())
    guard let engine = ["int3", "hlt", "hw"].first(where: { support.works(BreakpointEngine(rawValue: $0)!) }) else {
        return [Figure(label: "stream", value: "no breakpoint engine works here", json: #"{"bench":"stream","works":false}"#)]
    }
    let guest = "\(guests)/loop-\(calls).elf"
    let m = try Machine(path: guest)
    guard let tick = m.symbolizer.address(of: "tick") else { throw BenchError("\(guest) has no symbol tick") }
    let file = NSTemporaryDirectory() + "flowtrace-bench-stream-\(getpid()).jsonl"
    defer { unlink(file) }
    func traced(_ guest: String, to output: String) throws -> (seconds: Double, written: Int, rss: Int) {
        let r = try runMeasured(flowtrace, ["run", guest, "--engine", engine, "--probe", "tick:rdi,rsi,rax,rsp,[tick_calls]:16",
                                            "--format", "jsonl", "-o", output])
        guard r.status == 0 else { throw BenchError("flowtrace run \(guest) exited \(r.status): \(r.stderr)") }
        let f = try streamFigures(r.stderr)
        return (f.seconds, f.written, r.maxRSSBytes)
    }
    func untraced(_ guest: String) throws -> Double {
        let r = try runMeasured(flowtrace, ["run", guest])
        guard r.status == 0, let after = r.stderr.range(of: "guest exited with status 0 after "),
              let secs = Double(r.stderr[after.upperBound...].prefix { $0 != " " }) else {
            throw BenchError("flowtrace run \(guest) printed: \(r.stderr)")
        }
        return secs
    }
    let setup = ExitBenchSetup(rawExits: rawExits, flowtrace: flowtrace, guest: guest, calls: calls, tick: tick)
    var toFile: [Double] = [], toNull: [Double] = [], rawNs: [Double] = [], ftNs: [Double] = [], ratios: [Double] = []
    var fileBytes = 0
    for _ in 0..<runs {
        let rawBase = try rawRun(setup, "none"), rawTraced = try rawRun(setup, engine)
        guard rawTraced.hits == calls else { throw BenchError("raw-exits: \(rawTraced.hits) hits, expected \(calls)") }
        let base = try untraced(guest)
        let f = try traced(guest, to: file), n = try traced(guest, to: "/dev/null")
        guard f.written == calls, n.written == calls else { throw BenchError("written \(f.written) / \(n.written), expected \(calls)") }
        fileBytes = (try? FileManager.default.attributesOfItem(atPath: file)[.size] as? Int) ?? 0
        toFile.append(Double(calls) / f.seconds)
        toNull.append(Double(calls) / n.seconds)
        let r = (rawTraced.seconds - rawBase.seconds) * 1e9 / Double(calls)
        let t = (f.seconds - base) * 1e9 / Double(calls)
        rawNs.append(r); ftNs.append(t); ratios.append(t / r)
    }
    var figures: [Figure] = []
    let (rf, rn) = (median(toFile), median(toNull))
    figures.append(Figure(
        label: "stream \(engine): jsonl records/s to a file / to /dev/null (\(calls) records, median of \(runs))",
        value: "\(Int(rf.rounded())) / \(Int(rn.rounded())) (\(fileBytes / calls) bytes per record)",
        json: #"{"bench":"stream.rate","engine":"\#(engine)","records":\#(calls),"records_per_s_file":\#(Int(rf.rounded())),"records_per_s_devnull":\#(Int(rn.rounded())),"bytes_per_record":\#(fileBytes / calls),"runs":\#(runs)}"#))
    let q = median(ratios)
    figures.append(Figure(
        label: "stream \(engine): raw / flowtrace ns per hit streaming to a file, ratio (median of \(runs); min-max)",
        value: "\(Int(median(rawNs).rounded())) / \(Int(median(ftNs).rounded())), \(String(format: "%.3f", q)) [\(String(format: "%.3f", ratios.min()!))-\(String(format: "%.3f", ratios.max()!))]",
        json: #"{"bench":"stream.ratio","engine":"\#(engine)","raw_ns_per_hit":\#(Int(median(rawNs).rounded())),"flowtrace_ns_per_hit":\#(Int(median(ftNs).rounded())),"ratio":\#(String(format: "%.3f", q)),"ratio_min":\#(String(format: "%.3f", ratios.min()!)),"ratio_max":\#(String(format: "%.3f", ratios.max()!)),"runs":\#(runs)}"#))
    // The long run: memory must not follow the trace.
    let long = "\(guests)/loop-\(big).elf"
    let l = try traced(long, to: file)
    guard l.written == big else { throw BenchError("the \(big)-record run wrote \(l.written)") }
    let mb = Double(l.rss) / 1e6
    figures.append(Figure(
        label: "stream \(engine): peak RSS of a \(big)-record run to a file (MB; \(String(format: "%.0f", Double(big) / l.seconds)) records/s)",
        value: String(format: "%.1f", mb),
        json: #"{"bench":"stream.rss","engine":"\#(engine)","records":\#(big),"max_rss_mb":\#(String(format: "%.1f", mb)),"seconds":\#(String(format: "%.1f", l.seconds))}"#))
    return figures
}
