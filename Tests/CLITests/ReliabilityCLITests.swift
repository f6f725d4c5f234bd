import Foundation
import KVM
import Testing
import TestSupport

private let kvmUsable = KVMHost.isUsable()

/// `flowtrace args` started, its stderr collected on another thread (`stderr()` waits for
/// its end); stdout is the caller's to read.
func startFlowtrace(_ args: [String]) throws -> (process: Process, stdout: Pipe, stderr: () -> String) {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: Guests.flowtrace)
    p.arguments = args
    let out = Pipe(), err = Pipe()
    p.standardOutput = out
    p.standardError = err
    p.standardInput = FileHandle.nullDevice
    try p.run()
    let errText = LockedBox(Data())
    let errDone = DispatchSemaphore(value: 0)
    DispatchQueue.global().async {
        errText.set(err.fileHandleForReading.readDataToEndOfFile())
        errDone.signal()
    }
    return (p, out, { errDone.wait(); return String(decoding: errText.get(), as: UTF8.self) })
}

/// Starts `flowtrace args`, waits (on its stdout) for the line `marker`, sends `signal`
/// (SIGINT: Ctrl-C), and returns what it left.
func interruptAfter(_ marker: String, _ args: [String], signal: Int32 = SIGINT) throws -> ProcessOutput {
    let (p, out, stderr) = try startFlowtrace(args)
    var seen = Data()
    while !String(decoding: seen, as: UTF8.self).contains(marker + "\n") {
        let d = out.fileHandleForReading.availableData
        if d.isEmpty { break }  // the process ended without the marker
        seen += d
    }
    kill(p.processIdentifier, signal)
    seen += out.fileHandleForReading.readDataToEndOfFile()
    let err = stderr()
    p.waitUntilExit()
    return ProcessOutput(status: p.terminationStatus, stdout: String(decoding: seen, as: UTF8.self), stderr: err)
}

/// The number in `text` before `suffix` (`"1973 records taken"` -> 1973).
func count(before suffix: String, in text: String) -> Int? {
    guard let r = text.range(of: suffix) else { return nil }
    let digits = text[..<r.lowerBound].reversed().prefix { $0.isNumber }
    return Int(String(digits.reversed()))
}

@Suite("no output lost or destroyed", .serialized, .timeLimit(.minutes(5)))
struct OutputSafetyTests {
    /// A run that cannot start (no KVM) leaves an existing -o file exactly as it was.
    @Test func anExistingOutputSurvivesARunThatCannotStart() throws {
        let out = try temporaryFile(Array("previous trace\n".utf8), name: "existing.jsonl")
        let r = try flowtrace("run", Guests.path("fib"), "--probe", "fib:rdi", "-o", out,
                              environment: ["FLOWTRACE_KVM_DEVICE": "/nonexistent", "PATH": "/usr/bin:/bin"])
        expectOneLineError(r, status: 69, "/nonexistent")
        #expect(try String(contentsOfFile: out, encoding: .utf8) == "previous trace\n")
        let leftovers = try FileManager.default.contentsOfDirectory(atPath: (out as NSString).deletingLastPathComponent)
            .filter { $0.hasPrefix(".existing.jsonl.flowtrace-") }  // its own (other tests run beside it)
        #expect(leftovers == [])
    }

    /// A good run replaces the file (with the records), keeping its permissions.
    @Test(.enabled(if: kvmUsable, kvmSkipReason))
    func aGoodRunReplacesTheOutput() throws {
        let out = try temporaryFile(Array("previous trace\n".utf8), name: "replaced.jsonl")
        chmod(out, 0o600)
        let r = try flowtrace("run", Guests.path("fib"), "--probe", "fib:rdi", "-o", out)
        #expect(r.status == 0)
        let records = try parseJSONLines(String(contentsOfFile: out, encoding: .utf8))
        #expect(records.count == 1973)
        var st = stat()
        stat(out, &st)
        #expect(st.st_mode & 0o777 == 0o600)
    }

    /// A write error at the end (a full disk) exits 74 with the message.
    @Test(.enabled(if: kvmUsable, kvmSkipReason))
    func aFullDiskExits74() throws {
        let r = try flowtrace("run", Guests.path("fib"), "--probe", "fib:rdi", "-o", "/dev/full")
        #expect(r.status == 74)
        #expect(r.stderr.contains("flowtrace: error: writing the records to /dev/full: No space left on device (0 whole records were written before it)"))
        // The first write failed, and no figure claims a record written (that the run
        // stops at the failure is EdgeOutputTests' full-disk case, on a guest that never ends).
        #expect(r.stderr.contains("flowtrace: 0 records written to /dev/full before writing failed"))
    }

    /// Ctrl-C once the guest is known to be running (it printed a line after 1000 steps):
    /// exit 130 and every record taken, spin_step(0) ... in order, is written.
    @Test(.enabled(if: kvmUsable, kvmSkipReason))
    func ctrlCWritesTheRecordsTaken() throws {
        let out = try temporaryFile([], name: "spin.jsonl")
        let r = try interruptAfter("spin: 1000 steps", ["run", try Guests.path("spin"), "--probe", "spin_step:rdi", "-o", out])
        #expect(r.status == 130)
        #expect(r.stderr.contains("interrupted after"))
        let records = try parseJSONLines(String(contentsOfFile: out, encoding: .utf8))
        #expect(records.count >= 1000)
        let rdi = records.map { hexValue(($0["values"] as? [String: Any])?["rdi"]) }
        #expect(rdi == (0..<records.count).map { Optional(UInt64($0)) })
        #expect(r.stderr.contains("\(records.count) records written to \(out)"))
    }
}

/// jsonl and csv reach the output while the guest runs, in sequence order, and all of it.
@Suite("records streamed while the guest runs", .serialized, .timeLimit(.minutes(5)))
struct StreamCLITests {
    /// spin never ends: with -o a FIFO, 5,000 complete records come out of it while
    /// flowtrace still runs spin; after Ctrl-C the rest follows, every record taken,
    /// spin_step(0), (1), ... in order, as many as the summary says were taken and written.
    /// (Reading the FIFO is the synchronisation: each read returns what flowtrace wrote.)
    @Test(.enabled(if: kvmUsable, kvmSkipReason))
    func recordsReachTheFileWhileTheGuestRuns() throws {
        let dir = (try temporaryFile([], name: "fifo-dir-marker") as NSString).deletingLastPathComponent
        let out = dir + "/live.jsonl"
        unlink(out)
        try #require(mkfifo(out, 0o600) == 0, "mkfifo \(out): errno \(errno)")
        defer { unlink(out) }
        let (p, stdout, stderr) = try startFlowtrace(["run", try Guests.path("spin"), "--probe", "spin_step:rdi", "-o", out, "--timeout", "300"])
        let outDone = DispatchSemaphore(value: 0)
        DispatchQueue.global().async {
            _ = stdout.fileHandleForReading.readDataToEndOfFile()
            outDone.signal()
        }
        // The reader: everything that comes out of the FIFO, and a signal once 5,000 lines have.
        let got = LockedBox(Data())
        let fiveThousand = DispatchSemaphore(value: 0), ended = DispatchSemaphore(value: 0)
        DispatchQueue.global().async {
            var signalled = false
            // Blocks until flowtrace opens its end (once the run starts).
            if let h = FileHandle(forReadingAtPath: out) {
                while true {
                    let d = h.availableData
                    if d.isEmpty { break }
                    got.modify { $0 += d }
                    if !signalled, got.get().reduce(0, { $0 + ($1 == 0x0A ? 1 : 0) }) >= 5_000 {
                        signalled = true
                        fiveThousand.signal()
                    }
                }
            }
            if !signalled { fiveThousand.signal() }
            ended.signal()
        }
        let inTime = fiveThousand.wait(timeout: .now() + 120) == .success
        let lines = got.get().reduce(0) { $0 + ($1 == 0x0A ? 1 : 0) }
        let runningWithRecords = p.isRunning
        kill(p.processIdentifier, SIGINT)
        let err = stderr()
        outDone.wait()
        p.waitUntilExit()
        if !inTime {
            // flowtrace never opened the FIFO: open its write end once so the reader's open returns.
            let fd = open(out, O_WRONLY | O_NONBLOCK)
            if fd >= 0 { close(fd) }
        }
        ended.wait()
        #expect(inTime && runningWithRecords, "the run ended before 5,000 records came out: \(err)")
        #expect(lines >= 5_000)
        #expect(p.terminationStatus == 130)
        let records = try parseJSONLines(String(decoding: got.get(), as: UTF8.self))
        #expect(records.count > lines)
        #expect(records.map { $0["seq"] as? Int } == (0..<records.count).map { Optional($0) })
        let rdi = records.map { hexValue(($0["values"] as? [String: Any])?["rdi"]) }
        #expect(rdi == (0..<records.count).map { Optional(UInt64($0)) })
        #expect(count(before: " records taken", in: err) == records.count)
        #expect(err.contains("flowtrace: \(records.count) records written to \(out) (jsonl, while the guest ran)"))
    }

    /// csv streams too: the header once, then exactly the rows the filter selects.
    @Test(.enabled(if: kvmUsable, kvmSkipReason))
    func csvStreamsWithFilters() throws {
        let r = try flowtrace("run", Guests.path("fib"), "--probe", "fib:rdi", "--format", "csv", "--filter", "value:rdi=2")
        #expect(r.status == 0)
        let rows = r.stdout.split(separator: "\n")
        #expect(rows.first == "seq,ts_ns,vcpu,addr,location,when,rdi,symbols")
        #expect(rows.dropFirst().allSatisfy { $0.hasSuffix(",fib+0x0,before,0x2,") })
        // fib(15) calls fib(2) fib(14) = 377 times.
        #expect(rows.count == 1 + 377)
        #expect(r.stderr.contains("flowtrace: 377 records written to stdout (csv, while the guest ran) after --filter"))
    }
}

@Suite("input that used to crash")
struct CrashRegressionTests {
    /// Fullwidth digits pass Character.isHexDigit but not UInt8(_:radix:): the filter
    /// parser force-unwrapped the conversion and trapped.
    /// A timeout too large for the run's clock trapped converting to Int64 milliseconds.
    @Test func aHugeTimeoutIsAnError() throws {
        expectOneLineError(try flowtrace("run", Guests.path("fib"), "--timeout", "1e20"), status: 64, "--timeout 1e+20", "at most 1e9")
    }

    @Test func fullwidthHexDigitsInAFilterAreAnError() throws {
        let r = try flowtrace("run", Guests.path("fib"), "--probe", "fib:[rsp]:3", "--filter", "value:[rsp]:3=ａａ")
        expectOneLineError(r, status: 64, "'ａａ' is not hex bytes")
        let n = try flowtrace("run", Guests.path("fib"), "--probe", "fib:[rsp]:1", "--filter", "value:[rsp]:1=ａａ")
        expectOneLineError(n, status: 64, "'ａａ' is not a number")
    }
}

/// One injected failure and what flowtrace did about it.
struct FaultCase {
    let fault: String
    let when: String
    let extra: [String]
}

@Suite("fault injection", .serialized, .enabled(if: kvmUsable, kvmSkipReason), .timeLimit(.minutes(5)))
struct FaultInjectionTests {
    static let cases: [FaultCase] = [
        FaultCase(fault: "KVM_SET_GUEST_DEBUG:1", when: "arming the probes", extra: []),
        FaultCase(fault: "guest-memory write:1", when: "patching the first probe", extra: []),
        FaultCase(fault: "KVM_RUN:40", when: "mid-run", extra: []),
        FaultCase(fault: "KVM_RUN:40@1", when: "mid-run, on vCPU 1", extra: []),
        FaultCase(fault: "KVM_GET_REGS:10", when: "at a probe hit", extra: []),
        FaultCase(fault: "KVM_SET_REGS:10", when: "at a probe hit", extra: []),
        FaultCase(fault: "KVM_GET_SREGS:10", when: "stepping over a probe", extra: []),
        FaultCase(fault: "KVM_SET_GUEST_DEBUG:20", when: "stepping over a probe", extra: []),
        FaultCase(fault: "guest-memory write:20", when: "stepping over a probe", extra: []),
        FaultCase(fault: "", when: "writing the records (-o /dev/full)", extra: ["-o", "/dev/full"]),
    ]

    /// Every case ends (the process exits; its own --timeout is far away), with the
    /// documented status, one line naming the failed call, the other vCPU released, and
    /// every record taken written. The table in docs/reliability.md is this test's output
    /// (FLOWTRACE_UPDATE_DOCS=1 rewrites it).
    @Test func everyFaultEndsTheRunCleanly() throws {
        var rows: [String] = []
        for c in Self.cases {
            let out = try temporaryFile([], name: "fault.jsonl")
            var args = ["run", try Guests.path("loop"), "--vcpus", "2", "--engine", "hlt", "--probe", "tick:rdi,rsi", "--timeout", "120"]
            args += c.extra.isEmpty ? ["-o", out] : c.extra
            var env = ProcessInfo.processInfo.environment
            env["FLOWTRACE_FAULT"] = c.fault.isEmpty ? nil : c.fault
            let r = try run(Guests.flowtrace, args, environment: env)
            let named = c.fault.isEmpty ? "No space left on device" : String(c.fault.prefix { $0 != ":" }) + " failed"
            let lines = r.stderr.split(separator: "\n").map(String.init)
            let failure = lines.filter { $0.contains(named) }
            #expect(failure.count == 1, "\(c.fault): \(r.stderr)")
            let taken = count(before: " records taken", in: r.stderr)
            let written = count(before: " records written to", in: r.stderr)
            var recordsNote = "none taken"
            if let taken, c.extra.isEmpty {
                let onDisk = try parseJSONLines(String(contentsOfFile: out, encoding: .utf8)).count
                #expect(written == taken && onDisk == taken, "\(c.fault): taken \(taken), written \(written ?? -1), on disk \(onDisk)")
                recordsNote = written == taken && onDisk == taken ? "all taken written" : "LOST"
            } else if taken != nil {
                recordsNote = "write failed, reported"
            }
            let expected: Int32 = c.extra.isEmpty ? 70 : 74
            #expect(r.status == expected, "\(c.fault): \(r.stderr)")
            var message = failure.first.map(Self.shape) ?? "(none)"
            // Guest RAM is the machine's: which vCPU's write fails varies.
            if c.fault.hasPrefix("guest-memory") {
                message = message.replacingOccurrences(of: #"on vCPU [0-9]+"#, with: "on vCPU N", options: .regularExpression)
            }
            rows.append("| `\(c.fault.isEmpty ? "write(2)" : c.fault)` | \(c.when) | \(r.status) | \(message) | \(recordsNote) |")
        }
        let table = (["| fault (`FLOWTRACE_FAULT`) | when | exit | the line naming it | records |", "|---|---|---|---|---|"] + rows).joined(separator: "\n")
        try Self.checkDocument(table)
    }

    /// The message without the parts that vary from run to run (addresses, symbols, times).
    static func shape(_ line: String) -> String {
        var s = line
        if let r = s.range(of: "; guest at rip") { s = String(s[..<r.lowerBound]) }
        if let r = s.range(of: " after ", options: .backwards), s.hasPrefix("flowtrace: loop.elf") { s = String(s[..<r.lowerBound]) }
        s = s.replacingOccurrences(of: #"0x[0-9a-f]+"#, with: "0x…", options: .regularExpression)
        return s.replacingOccurrences(of: "|", with: "\\|")
    }

    static let begin = "<!-- fault matrix: generated by FaultInjectionTests (FLOWTRACE_UPDATE_DOCS=1 tools/test) -->"
    static let end = "<!-- end of fault matrix -->"

    static func checkDocument(_ table: String) throws {
        let path = Guests.root.appendingPathComponent("docs/reliability.md").path
        let doc = try String(contentsOfFile: path, encoding: .utf8)
        guard let b = doc.range(of: begin), let e = doc.range(of: end) else {
            Issue.record("docs/reliability.md has no fault-matrix markers")
            return
        }
        let current = doc[b.upperBound..<e.lowerBound].trimmingCharacters(in: .whitespacesAndNewlines)
        if ProcessInfo.processInfo.environment["FLOWTRACE_UPDATE_DOCS"] == "1" {
            let updated = String(doc[..<b.upperBound]) + "\n" + table + "\n" + String(doc[e.lowerBound...])
            try updated.write(toFile: path, atomically: true, encoding: .utf8)
            return
        }
        #expect(current == table, "docs/reliability.md differs from what the tests observe; run FLOWTRACE_UPDATE_DOCS=1 tools/test and review. Observed:\n\(table)")
    }
}
