import Foundation
import Glibc
import KVM
import Testing
import TestSupport

private let kvmUsable = KVMHost.isUsable()
private let isRoot = getuid() == 0

/// Runs `flowtrace args` with stdout and/or stderr sent to `path` (e.g. /dev/full); the
/// other stream is collected.
private func flowtrace(_ args: [String], stdoutTo: String? = nil, stderrTo: String? = nil) throws -> ProcessOutput {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: Guests.flowtrace)
    p.arguments = args
    p.standardInput = FileHandle.nullDevice
    let out = Pipe(), err = Pipe()
    let outFile = try stdoutTo.map { try #require(FileHandle(forWritingAtPath: $0)) }
    let errFile = try stderrTo.map { try #require(FileHandle(forWritingAtPath: $0)) }
    p.standardOutput = outFile ?? out
    p.standardError = errFile ?? err
    try p.run()
    try outFile?.close()
    try errFile?.close()
    let errText = LockedBox(Data())
    let errDone = DispatchSemaphore(value: 0)
    DispatchQueue.global().async {
        if errFile == nil { errText.set(err.fileHandleForReading.readDataToEndOfFile()) }
        errDone.signal()
    }
    let o = outFile == nil ? out.fileHandleForReading.readDataToEndOfFile() : Data()
    errDone.wait()
    p.waitUntilExit()
    return ProcessOutput(status: p.terminationStatus, stdout: String(decoding: o, as: UTF8.self),
                         stderr: String(decoding: errText.get(), as: UTF8.self))
}

/// Removes a test's own temporary directory; a failure is the test's.
func removeDirectory(_ dir: String, sourceLocation: SourceLocation = #_sourceLocation) {
    do { try FileManager.default.removeItem(atPath: dir) } catch { Issue.record("removing \(dir): \(error)", sourceLocation: sourceLocation) }
}

/// Removes what is in `dir` (a mount point that stays), a failure the test's.
func emptyDirectory(_ dir: String, sourceLocation: SourceLocation = #_sourceLocation) {
    do {
        for f in try FileManager.default.contentsOfDirectory(atPath: dir) { try FileManager.default.removeItem(atPath: dir + "/" + f) }
    } catch { Issue.record("emptying \(dir): \(error)", sourceLocation: sourceLocation) }
}

/// No Swift runtime trap or backtrace in `text`.
private func expectNoCrash(_ text: String, sourceLocation: SourceLocation = #_sourceLocation) {
    for crash in ["Fatal error", "Backtracing", "Program crashed", "Illegal instruction"] {
        #expect(!text.contains(crash), "\(crash) in: \(text.prefix(2000))", sourceLocation: sourceLocation)
    }
}

/// A tmpfs of 64 KiB, mounted for the suite (root only; nil where mounting is refused).
private let smallFilesystem: String? = {
    guard isRoot else { return nil }
    let dir = FileManager.default.temporaryDirectory.appendingPathComponent("flowtrace-small-\(getpid())").path
    do {
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let r = try run("/bin/mount", ["-t", "tmpfs", "-o", "size=64k", "tmpfs", dir])
        guard r.status == 0 else { return nil }
    } catch { return nil }
    return dir
}()

/// Whether the unprivileged user `nobody` can run the built flowtrace on the bundled guests.
private let nobodyCanRun: Bool = {
    guard isRoot, FileManager.default.isExecutableFile(atPath: "/usr/bin/setpriv") else { return false }
    do {
        let fib = try Guests.path("fib")
        let r = try run("/usr/bin/setpriv", ["--reuid=65534", "--regid=65534", "--clear-groups", "/bin/sh", "-c",
                                             "test -x \"$0\" && test -r \"$1\"", Guests.flowtrace, fib])
        return r.status == 0
    } catch { return false }
}()

/// The last number before `suffix` and after `prefix` in `text`.
private func number(after prefix: String, in text: String) -> Int? {
    guard let r = text.range(of: prefix) else { return nil }
    return Int(String(text[r.upperBound...].prefix { $0.isNumber }))
}

@Suite("promises at the edges: output that cannot be written, -o, signals", .serialized, .timeLimit(.minutes(5)))
struct EdgeOutputTests {
    /// The console on a full stdout: one line on stderr naming it, exit 74, no trap.
    @Test(.enabled(if: kvmUsable, kvmSkipReason))
    func aConsoleThatCannotBeWrittenExits74() throws {
        let r = try flowtrace(["run", try Guests.path("fib")], stdoutTo: "/dev/full")
        expectNoCrash(r.stderr)
        #expect(r.status == 74, "\(r.stderr)")
        let errors = r.stderr.split(separator: "\n").filter { $0.hasPrefix("flowtrace: error:") }
        #expect(errors == ["flowtrace: error: writing the guest's console to stdout: No space left on device"])
    }

    /// Messages on a full stderr: the console still reaches stdout, then the one line there.
    @Test(.enabled(if: kvmUsable, kvmSkipReason))
    func messagesThatCannotBeWrittenExit74() throws {
        let r = try flowtrace(["run", try Guests.path("fib")], stderrTo: "/dev/full")
        expectNoCrash(r.stdout)
        #expect(r.status == 74)
        #expect(r.stdout == "fib(15) = 610, calls = 1973\nflowtrace: error: writing flowtrace's messages to stderr: No space left on device\n")
    }

    /// stdout a pipe its reader closed while SIGPIPE is ignored (`trap '' PIPE`): the run
    /// stops at the failed write, exit 74, and the count it gives is of whole records: the
    /// lines the reader got before closing are among them.
    @Test(.enabled(if: kvmUsable, kvmSkipReason))
    func aClosedPipeWithSIGPIPEIgnoredExits74() throws {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/bin/sh")
        p.arguments = ["-c", "trap '' PIPE; exec \"$0\" run \"$1\" --probe spin_step:rdi --format jsonl --timeout 300", Guests.flowtrace, try Guests.path("spin")]
        let out = Pipe(), err = Pipe()
        p.standardOutput = out
        p.standardError = err
        p.standardInput = FileHandle.nullDevice
        try p.run()
        // Read one whole record, then close the read end.
        var got = Data()
        while !got.contains(0x0A) {
            let d = out.fileHandleForReading.availableData
            if d.isEmpty { break }
            got += d
        }
        try out.fileHandleForReading.close()
        let errText = String(decoding: err.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        p.waitUntilExit()
        expectNoCrash(errText)
        #expect(p.terminationStatus == 74, "\(errText)")
        let first = try parseJSONLines(String(decoding: got.prefix { $0 != 0x0A }, as: UTF8.self))
        #expect(first.count == 1)
        let whole = try #require(number(after: "writing the records to stdout: Broken pipe (", in: errText), "\(errText)")
        #expect(whole >= 1)
        #expect(errText.contains("flowtrace: \(whole) records written to stdout before writing failed"))
        #expect(errText.contains("spin.elf: stopped after") && !errText.contains("timed out"))
    }

    /// A disk that fills up mid-run: the run stops promptly (spin never ends; no timeout),
    /// -o FILE stays exactly as it was, the partial file is kept and named, it ends at a
    /// record boundary, and holds exactly the number of records the summary says, spin's
    /// own arguments 0, 1, 2, ... in order.
    @Test(.enabled(if: kvmUsable && smallFilesystem != nil, "needs /dev/kvm and root to mount a 64 KiB tmpfs"))
    func aFullDiskLeavesTheFileAndKeepsWhatWasWritten() throws {
        let dir = try #require(smallFilesystem)
        let out = dir + "/trace.jsonl"
        try "previous trace\n".write(toFile: out, atomically: false, encoding: .utf8)
        defer { emptyDirectory(dir) }
        let r = try flowtrace(["run", try Guests.path("spin"), "--probe", "spin_step:rdi", "-o", out, "--timeout", "300"])
        expectNoCrash(r.stderr)
        #expect(r.status == 74, "\(r.stderr)")
        #expect(try String(contentsOfFile: out, encoding: .utf8) == "previous trace\n")
        #expect(r.stderr.contains("spin.elf: stopped after") && !r.stderr.contains("timed out"))
        let partialPrefix = "records written before the failure are in "
        let line = try #require(r.stderr.split(separator: "\n").first { $0.contains(partialPrefix) }, "\(r.stderr)")
        let partial = String(line[line.range(of: partialPrefix)!.upperBound...])
        #expect(partial.hasPrefix(dir + "/.trace.jsonl.flowtrace-"))
        #expect(r.stderr.contains("flowtrace: the records go to \(partial) while the guest runs"))
        let claimed = try #require(number(after: "and the ", in: String(line)))
        let bytes = try Data(contentsOf: URL(fileURLWithPath: partial))
        #expect(bytes.last == 0x0A, "the partial file ends mid-record")
        let records = try parseJSONLines(String(decoding: bytes, as: UTF8.self))
        #expect(records.count == claimed && claimed > 100)
        let rdi = records.map { hexValue(($0["values"] as? [String: Any])?["rdi"]) }
        #expect(rdi == (0..<records.count).map { Optional(UInt64($0)) })
        #expect(r.stderr.contains("flowtrace: \(claimed) records reached \(partial) before writing failed (\(out) was left as it was)"))
    }

    /// -o onto a file its owner made read-only (0444), run as that unprivileged user:
    /// refused before anything runs, as cp would refuse it; the file is untouched.
    @Test(.enabled(if: nobodyCanRun, "needs root, setpriv, and a flowtrace binary and guests the user nobody can reach"))
    func aReadOnlyOutputIsRefusedForItsUnprivilegedOwner() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("flowtrace-nobody-\(getpid())").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { removeDirectory(dir) }
        let out = dir + "/trace.jsonl"
        try "previous trace\n".write(toFile: out, atomically: false, encoding: .utf8)
        #expect(chown(dir, 65534, 65534) == 0 && chown(out, 65534, 65534) == 0 && chmod(out, 0o444) == 0)
        let r = try run("/usr/bin/setpriv", ["--reuid=65534", "--regid=65534", "--clear-groups", Guests.flowtrace,
                                             "run", try Guests.path("fib"), "--probe", "fib:rdi", "-o", out])
        expectOneLineError(r, status: 64, "-o cannot write '\(out)': Permission denied (mode 0444)", "chmod u+w")
        #expect(try String(contentsOfFile: out, encoding: .utf8) == "previous trace\n")
        #expect(try FileManager.default.contentsOfDirectory(atPath: dir) == ["trace.jsonl"])
    }

    /// SIGTERM (what timeout, systemd and docker send) with a table written at the end:
    /// the records taken, spin_step(0), (1), ... are all in -o FILE, the summary, exit 143.
    @Test(.enabled(if: kvmUsable, kvmSkipReason))
    func sigtermWritesEveryRecordTaken() throws {
        let out = try temporaryFile(Array("previous\n".utf8), name: "spin-term.txt")
        let r = try interruptAfter("spin: 1000 steps", ["run", try Guests.path("spin"), "--probe", "spin_step:rdi", "--format", "table", "-o", out],
                                   signal: SIGTERM)
        #expect(r.status == 143, "\(r.stderr)")
        #expect(r.stderr.contains("spin.elf: stopped by SIGTERM after"))
        let rows = try String(contentsOfFile: out, encoding: .utf8).split(separator: "\n").dropFirst()
        let rdi = rows.map { UInt64($0.split(separator: " ").last.map { String($0.dropFirst(2)) } ?? "", radix: 16) }
        #expect(rdi.count >= 1000)
        #expect(rdi == (0..<rdi.count).map { Optional(UInt64($0)) })
        #expect(r.stderr.contains("flowtrace: \(rdi.count) records written to \(out) (table)"))
    }

    /// A second signal stops at once: -o is a FIFO nobody reads, so after the first SIGTERM
    /// the run cannot finish writing (the FIFO holds 64 KiB; spin's records by its 1000-steps
    /// line are about 130 KB); the second ends flowtrace with 143 and its one line.
    @Test(.enabled(if: kvmUsable, kvmSkipReason))
    func aSecondSignalStopsAtOnce() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("flowtrace-fifo2-\(getpid())").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { removeDirectory(dir) }
        let fifo = dir + "/never-read.jsonl"
        try #require(mkfifo(fifo, 0o600) == 0)
        // A reader that never reads, so flowtrace's open for writing succeeds.
        let reader = open(fifo, O_RDONLY | O_NONBLOCK)
        try #require(reader >= 0)
        defer { close(reader) }
        let p = Process()
        p.executableURL = URL(fileURLWithPath: Guests.flowtrace)
        p.arguments = ["run", try Guests.path("spin"), "--probe", "spin_step:rdi", "-o", fifo, "--timeout", "300"]
        let out = Pipe(), errPipe = Pipe()
        p.standardOutput = out
        p.standardError = errPipe
        p.standardInput = FileHandle.nullDevice
        try p.run()
        /// Reads `handle` until `marker` has come (or the stream ends).
        func read(_ handle: FileHandle, until marker: String, into seen: inout Data) {
            while !String(decoding: seen, as: UTF8.self).contains(marker) {
                let d = handle.availableData
                if d.isEmpty { return }
                seen += d
            }
        }
        var console = Data(), err = Data()
        read(out.fileHandleForReading, until: "spin: 1000 steps\n", into: &console)
        kill(p.processIdentifier, SIGTERM)
        // Two signals sent together arrive as one: the second goes once flowtrace has said it
        // took the first (the run is then stuck writing into the FIFO).
        read(errPipe.fileHandleForReading, until: "flowtrace: SIGTERM: stopping every vCPU", into: &err)
        kill(p.processIdentifier, SIGTERM)
        err += errPipe.fileHandleForReading.readDataToEndOfFile()
        _ = out.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        let errText = String(decoding: err, as: UTF8.self)
        #expect(p.terminationStatus == 143, "\(errText)")
        #expect(errText.contains("flowtrace: SIGTERM: stopping every vCPU; every record taken so far is written (a second signal stops at once)\n"))
        #expect(errText.contains("flowtrace: second signal (SIGTERM): stopping now"), "\(errText)")
    }

    /// SIGHUP (a closed terminal) with jsonl streamed: every record taken, exit 129.
    @Test(.enabled(if: kvmUsable, kvmSkipReason))
    func sighupWritesEveryRecordTaken() throws {
        let out = try temporaryFile([], name: "spin-hup.jsonl")
        let r = try interruptAfter("spin: 1000 steps", ["run", try Guests.path("spin"), "--probe", "spin_step:rdi", "-o", out], signal: SIGHUP)
        #expect(r.status == 129, "\(r.stderr)")
        #expect(r.stderr.contains("spin.elf: stopped by SIGHUP after"))
        let records = try parseJSONLines(String(contentsOfFile: out, encoding: .utf8))
        #expect(records.count >= 1000)
        #expect(records.map { $0["seq"] as? Int } == (0..<records.count).map { Optional($0) })
        #expect(count(before: " records taken", in: r.stderr) == records.count)
    }

    /// --hits on 2 vCPUs: the total is the sum of the rows; hits after the limit are said apart.
    @Test(.enabled(if: kvmUsable, kvmSkipReason))
    func summaryTotalsAreTheSumsOfTheRows() throws {
        let r = try flowtrace(["run", try Guests.path("loop"), "--vcpus", "2", "--probe", "tick:rdi", "--hits", "3", "--format", "jsonl"])
        #expect(r.status == 0, "\(r.stderr)")
        #expect(try parseJSONLines(r.stdout).count == 3)
        let lines = r.stderr.split(separator: "\n")
        let header = try #require(lines.firstIndex { $0.hasPrefix("  LOCATION") })
        let rows = lines[(header + 1)...].prefix { $0.hasPrefix("  ") }
        let hits = rows.map { Int($0.split(separator: " ", omittingEmptySubsequences: true)[2]) ?? -1 }
        let taken = rows.map { Int($0.split(separator: " ", omittingEmptySubsequences: true)[3]) ?? -1 }
        #expect(taken.reduce(0, +) == 3)
        let total = try #require(number(after: "flowtrace: ", in: String(lines.first { $0.contains(" hits (") } ?? "")))
        #expect(hits.reduce(0, +) == total, "\(r.stderr)")
        #expect(r.stderr.contains("3 records taken"))
    }
}

/// A pseudo-terminal shared by stdout and stderr, as an interactive run or a serial
/// console has: everything flowtrace writes, in order.
private func onTerminal(_ args: [String]) throws -> (status: Int32, text: String) {
    var master: Int32 = -1, slave: Int32 = -1
    var size = winsize(ws_row: 50, ws_col: 200, ws_xpixel: 0, ws_ypixel: 0)
    try #require(openpty(&master, &slave, nil, nil, &size) == 0)
    let p = Process()
    p.executableURL = URL(fileURLWithPath: Guests.flowtrace)
    p.arguments = args
    let terminal = FileHandle(fileDescriptor: slave, closeOnDealloc: false)
    p.standardOutput = terminal
    p.standardError = terminal
    p.standardInput = FileHandle.nullDevice
    try p.run()
    close(slave)
    var text = Data()
    var buffer = [UInt8](repeating: 0, count: 65536)
    while true {
        let n = read(master, &buffer, buffer.count)
        if n < 0 && errno == EINTR { continue }
        if n <= 0 { break }  // EIO once the last writer closed the terminal
        text += buffer[..<n]
    }
    close(master)
    p.waitUntilExit()
    return (p.terminationStatus, String(decoding: text, as: UTF8.self))
}

@Suite("the progress line never cuts through other lines", .serialized, .timeLimit(.minutes(5)))
struct ProgressLineTests {
    /// jsonl streamed to the terminal that also shows stderr: no progress line at all, and
    /// every record a whole line.
    @Test(.enabled(if: kvmUsable, kvmSkipReason))
    func noProgressWhereRecordsStreamToTheSameTerminal() throws {
        let (status, text) = try onTerminal(["run", try Guests.path("spin"), "--probe", "spin_step:rdi", "--format", "jsonl", "--hits", "200", "--timeout", "2"])
        #expect(status == 124)
        #expect(!text.contains("hits/s  "), "a progress line was drawn")
        let records = text.split(separator: "\r\n").filter { $0.hasPrefix("{") }
        #expect(records.count == 200)
        #expect(try parseJSONLines(records.joined(separator: "\n")).count == 200)
    }

    /// Without probes a terminal still gets a progress line: elapsed time, exits, and where
    /// vCPU 0 was (rip and symbol: spin's loop); the console's lines start lines of their own.
    @Test(.enabled(if: kvmUsable, kvmSkipReason))
    func aRunWithoutProbesShowsWhereVCPU0Is() throws {
        let (status, text) = try onTerminal(["run", try Guests.path("spin"), "--timeout", "2"])
        #expect(status == 124)
        let progress = text.ranges(of: /[0-9.]+ s  [0-9]+ exits  vCPU 0 at 0x[0-9a-f]+ \((guest_main|spin_step|console_puts|console_putc|console_u64)[^)]*\)/)
        #expect(!progress.isEmpty, "no progress line with vCPU 0's place in: \(text.suffix(300))")
        for r in text.ranges(of: "spin: ") {
            let scalars = text[..<r.lowerBound].unicodeScalars
            #expect(scalars.isEmpty || scalars.last == "\n" || text[..<r.lowerBound].hasSuffix("\r\u{1B}[K"))
        }
    }

    /// A console shown while the progress runs (-o FILE): the progress is drawn, and each
    /// console line starts a line of its own (the progress erased first).
    @Test(.enabled(if: kvmUsable, kvmSkipReason))
    func consoleLinesEraseTheProgressFirst() throws {
        let out = try temporaryFile([], name: "progress.jsonl")
        let (status, text) = try onTerminal(["run", try Guests.path("spin"), "--probe", "spin_step:rdi", "-o", out, "--timeout", "3"])
        #expect(status == 124)
        #expect(text.contains("hits/s  "), "no progress line was drawn in 3 s")
        let erase = "\r\u{1B}[K"
        // Every progress text ends where an erase or the end follows it.
        for r in text.ranges(of: /[0-9.]+ s  [0-9]+ hits  [0-9.kM]+ hits\/s  [0-9]+ records/) {
            let rest = text[r.upperBound...]
            #expect(rest.isEmpty || rest.hasPrefix(erase), "text follows a progress line: \(rest.prefix(40))")
        }
        // Console lines ("spin: N steps") start a line or follow an erase.
        let consoleLines = text.ranges(of: "spin: ")
        #expect(consoleLines.count >= 3)
        for r in consoleLines {
            let before = text[..<r.lowerBound]
            // (Compared as scalars: "\r\n" is one Character.)
            let scalars = before.unicodeScalars
            #expect(scalars.isEmpty || scalars.last == "\n" || before.hasSuffix(erase), "a console line was glued to: \(before.suffix(60))")
        }
    }
}

@Suite("guest conditions are guest faults")
struct GuestConditionTests {
    /// A probed popfq on an unmapped stack: reading the RFLAGS image it loads fails in the
    /// guest's own page tables: a guest fault naming the address, not a host failure.
    @Test(.enabled(if: kvmUsable, kvmSkipReason))
    func anUnmappedStackAtAProbedPopfIsAGuestFault() throws {
        let r = try flowtrace(["run", try Guests.path("bad-stack"), "--probe", "bad_popf", "--engine", "hlt", "--format", "jsonl"])
        #expect(r.status == 70)
        #expect(r.stderr.contains("bad-stack.elf: guest fault on vCPU 0 while reading the guest's trap flag for the probe at 0x"))
        #expect(r.stderr.contains("guest-virtual address 0x7fff00000000 is not mapped"))
        #expect(!r.stderr.contains("host failure"))
        #expect(try parseJSONLines(r.stdout).count == 1)
    }
}

@Suite("names, values and errors of the command line")
struct CommandLineTests {
    @Test func versionAndUnknownCommands() throws {
        let v = try flowtrace(["--version"])
        #expect(v.status == 0)
        #expect(v.stdout.range(of: #"^[0-9]+\.[0-9]+\.[0-9]+\n$"#, options: .regularExpression) != nil, "\(v.stdout)")
        expectOneLineError(try flowtrace(["rn", "guests/build/fib.elf"]), status: 64,
                           "flowtrace: error: unknown command 'rn' (commands: run, graph, inspect, doctor); did you mean 'run'?")
        // ArgumentParser's own errors in flowtrace's one-line style, with the near option.
        expectOneLineError(try flowtrace(["run", try Guests.path("fib"), "--hitz", "3"]), status: 64,
                           "flowtrace: error: unknown option '--hitz'", "'--hits'", "(see 'flowtrace run --help')")
    }

    /// run, inspect and graph take the same image options, one group: every name appears in
    /// each one's help, a misspelt one is answered with the near name, and the options a
    /// command does not use are said so (not refused).
    @Test func theImageOptionsAreOneGroup() throws {
        let fib = try Guests.path("fib")
        for command in [["run"], ["inspect"], ["graph"]] {
            let help = try flowtrace(command + ["--help"]).stdout
            for option in ["<guest>", "--boot <boot>", "--append <cmdline>", "--initrd <file>", "--module <file[,args]>", "--symbol-file <file>"] {
                #expect(help.contains(option), "\(command[0]) --help lacks \(option)")
            }
            let near = try flowtrace(command + [fib] + (command[0] == "graph" ? ["fib"] : []) + ["--symbl-file", "x"])
            expectOneLineError(near, status: 64, "unknown option '--symbl-file'", "'--symbol-file'", "(see 'flowtrace \(command[0]) --help')")
        }
        let graph = try flowtrace(["graph", fib, "fib", "--append", "quiet"])
        #expect(graph.status == 0)
        #expect(graph.stderr == "flowtrace: --append not used: graph reads the image's code, it boots nothing\n")
        let inspect = try flowtrace(["inspect", try Guests.kernelPath("multiboot.elf"), "--boot", "multiboot2"])
        #expect(inspect.status == 64, "multiboot.elf has no Multiboot 2 header: \(inspect.stdout)")
    }

    /// A negative count is a value, checked like any other (not "Missing value").
    @Test func negativeCountsAreCheckedValues() throws {
        let fib = try Guests.path("fib")
        expectOneLineError(try flowtrace(["run", fib, "--hits", "-1"]), status: 64, "flowtrace: error: --hits -1: must be 0 (no limit) or more")
        expectOneLineError(try flowtrace(["run", fib, "--vcpus", "-2"]), status: 64, "flowtrace: error: --vcpus -2: must be at least 1")
        expectOneLineError(try flowtrace(["run", fib, "--vcpus", "0"]), status: 64, "flowtrace: error: --vcpus 0: must be at least 1")
        expectOneLineError(try flowtrace(["run", fib, "--max-records", "-5"]), status: 64, "--max-records -5: must be 0 (no limit) or more")
        expectOneLineError(try flowtrace(["run", fib, "--top", "-1"]), status: 64, "--top -1: must be 0 (all) or more")
        expectOneLineError(try flowtrace(["run", fib, "--timeout", "-3"]), status: 64, "--timeout -3.0: must be a positive number of seconds")
    }

    /// `run --help` piped (ArgumentParser wraps at 80 columns then) is not wrapped a second
    /// time: no line is longer than 80, and the spec table's lines come out as written.
    @Test func runHelpFitsEightyColumns() throws {
        let r = try flowtrace(["run", "--help"])
        #expect(r.status == 0)
        let lines = r.stdout.split(separator: "\n", omittingEmptySubsequences: false)
        #expect(lines.filter { $0.count > 80 }.isEmpty, "\(lines.filter { $0.count > 80 })")
        let item = try #require(lines.firstIndex { $0.hasPrefix("  ITEM      a register (rdi, eax,") })
        #expect(lines[item + 1].hasPrefix("            memory [EXPR] or [EXPR]:SIZE"))
        #expect(lines.contains("  -o <file>               Write the records to this file instead of stdout."))
        #expect(lines.contains { $0.contains("--symbol-file <file>") })
    }
}

/// Debian's kernel where tools/fetch-linux left it (tools/test-nested fetches it first).
private let stockKernel = Guests.root.appendingPathComponent("guests/build/linux/vmlinuz").path
private let stockInitrd = Guests.root.appendingPathComponent("guests/build/linux/initrd.cpio.gz").path
private let stockKernelPresent = FileManager.default.fileExists(atPath: stockKernel) && FileManager.default.fileExists(atPath: stockInitrd)

@Suite("the README's Linux example", .serialized, .timeLimit(.minutes(3)))
struct ReadmeLinuxExampleTests {
    /// The README's command line, as written there.
    static let readme = ["run", stockKernel, "--initrd", stockInitrd, "--append", "console=ttyS0 reboot=k panic=-1 nokaslr",
                         "--vcpus", "2", "--memory", "512M", "--probe", "0x100200:rsi", "--engine", "hw", "--exit-counts"]

    /// Its probe at the bzImage's 64-bit entry (a physical address of the code as loaded,
    /// not of the vmlinux) is accepted: the run gets as far as opening KVM.
    @Test(.enabled(if: stockKernelPresent, "no stock kernel in guests/build/linux (tools/fetch-linux fetches it)"))
    func theProbeAtTheLoadedEntryIsAccepted() throws {
        let r = try run(Guests.flowtrace, Self.readme, environment: ["FLOWTRACE_KVM_DEVICE": "/nonexistent", "PATH": "/usr/bin:/bin"])
        expectOneLineError(r, status: 69, "/nonexistent does not exist")
    }

    /// Run as the README shows it (with a --timeout: on a host without VMX/SVM the kernel
    /// does not boot in useful time, but its first instruction is the probe's): one record at
    /// 0x100200 on vCPU 0, rsi the zero page flowtrace built (boot.rst: rsi points at
    /// boot_params at the 64-bit entry), shown as an address, not a vmlinux symbol.
    @Test(.enabled(if: stockKernelPresent && kvmUsable, "needs /dev/kvm and a stock kernel in guests/build/linux (tools/fetch-linux)"))
    func theExampleRecordsTheEntry() throws {
        let r = try run(Guests.flowtrace, Self.readme + ["--format", "jsonl", "--timeout", "10"])
        let records = try parseJSONLines(r.stdout)
        #expect(records.count == 1, "\(r.stderr)")
        let first = try #require(records.first)
        #expect(first["addr"] as? String == "0x100200")
        #expect(first["location"] as? String == "0x100200")
        #expect(first["vcpu"] as? Int == 0)
        let rsi = try #require(hexValue((first["values"] as? [String: Any])?["rsi"]))
        #expect((0x10000..<0x2F000).contains(rsi), "rsi \(rsi) is not in flowtrace's boot information area")
        #expect(r.stderr.contains("exits:"))
    }
}

@Suite("the engine auto picks is said")
struct AutoEngineTests {
    /// Five probes on the pc platform (hlt cannot work there, hw takes four): where int3
    /// does not work either, auto falls back to step, and says so with its cost and the
    /// faster choice. The guest's own result is unchanged (status 42, three hits).
    @Test(.enabled(if: kvmUsable, kvmSkipReason))
    func autoFallingBackToStepIsSaid() throws {
        let r = try flowtrace(["run", try Guests.path("status"), "--platform", "pc", "--probe", "guest_main", "--probe", "console_putc",
                               "--probe", "console_puts", "--probe", "guest_exit", "--probe", "vcpu_halt", "--format", "jsonl"])
        #expect(r.status == 42)
        let engine = r.stderr.split(separator: "\n").first { $0.hasPrefix("flowtrace: engine ") } ?? ""
        let warned = r.stderr.contains("flowtrace: warning: --engine auto picked step for 5 probe locations: it single-steps every instruction")
        // On a host where int3 works, auto takes it and there is nothing to say.
        #expect(engine.hasPrefix("flowtrace: engine step") == warned, "\(r.stderr)")
        if engine.hasPrefix("flowtrace: engine step") {
            #expect(r.stderr.contains("faster: probe at most 4 locations and --engine hw takes them"))
        }
        #expect(try parseJSONLines(r.stdout).count == 3)
    }
}

private let flavorModules = ["kvm_pvm": "PVM (kvm_pvm)", "kvm_intel": "VMX (kvm_intel)", "kvm_amd": "SVM (kvm_amd)"]
private let isPVM = FileManager.default.fileExists(atPath: "/sys/module/kvm_pvm")

@Suite("messages on the hosts users have")
struct HostMessageTests {
    /// doctor names the KVM the host has (the module in /sys/module) and what follows.
    @Test(.enabled(if: kvmUsable, kvmSkipReason))
    func doctorSaysWhichKVMItIs() throws {
        let r = try flowtrace(["doctor"])
        let line = r.stdout.split(separator: "\n").first { $0.hasPrefix("KVM: ") } ?? ""
        let loaded = ["kvm_pvm", "kvm_intel", "kvm_amd"].first { FileManager.default.fileExists(atPath: "/sys/module/\($0)") }
        #expect(line.hasPrefix("KVM: " + (loaded.flatMap { flavorModules[$0] } ?? "unknown")), "\(r.stdout)")
        if isPVM { #expect(line.contains("CPL0 code") && line.contains("int3")) }
    }

    /// A kernel on PVM: one warning before it runs, saying what follows and what to use.
    @Test(.enabled(if: kvmUsable && isPVM, "needs /dev/kvm on a PVM host (kvm_pvm)"))
    func aKernelOnPVMIsWarnedAboutOnce() throws {
        let r = try flowtrace(["run", try Guests.kernelPath("multiboot.elf")])
        #expect(r.status == 0x4B, "\(r.stderr)")
        let warnings = r.stderr.split(separator: "\n").filter { $0.hasPrefix("flowtrace: warning: this host's KVM is PVM (kvm_pvm)") }
        #expect(warnings.count == 1 && warnings[0].contains("--engine hw"))
        // A payload gets no such warning.
        #expect(!(try flowtrace(["run", try Guests.path("fib")])).stderr.contains("PVM"))
    }

    /// A --timeout ending says where each vCPU was: spin's vCPU 0 loops in guest_main (and
    /// what it calls), its vCPU 1 has halted in vcpu_halt; both in 64-bit mode at CPL0.
    @Test(.enabled(if: kvmUsable, kvmSkipReason))
    func aTimeoutSaysWhereEachVCPUWas() throws {
        let r = try flowtrace(["run", try Guests.path("spin"), "--vcpus", "2", "--timeout", "1"])
        #expect(r.status == 124)
        let lines = r.stderr.split(separator: "\n").map(String.init)
        let at = try #require(lines.firstIndex { $0.contains("timed out after") })
        let zero = lines[at + 1], one = lines[at + 2]
        // guest_main's loop calls spin_step, and prints a line every 5000 steps.
        let loop = ["(guest_main", "(spin_step", "(console_puts", "(console_putc", "(console_u64"]
        #expect(zero.hasPrefix("  vCPU 0 at 0x") && loop.contains { zero.contains($0) }, "\(zero)")
        #expect(one.hasPrefix("  vCPU 1 at 0x") && one.contains("(vcpu_halt"), "\(one)")
        #expect(zero.hasSuffix(", 64-bit mode, CPL0") && one.hasSuffix(", 64-bit mode, CPL0"))
    }
}

/// The README's "Your own guest": its C source and build command, taken from the README
/// itself, built in a temporary directory and run.
@Suite("a guest built as the README says", .serialized)
struct OwnGuestTests {
    /// The blocks after the "### Your own guest" heading: the C source and the gcc line.
    static func readmeGuest() throws -> (source: String, command: String) {
        let readme = try String(contentsOf: Guests.root.appendingPathComponent("README.md"), encoding: .utf8)
        let section = try #require(readme.components(separatedBy: "### Your own guest").dropFirst().first)
        let c = try #require(section.components(separatedBy: "```c\n").dropFirst().first?.components(separatedBy: "```").first)
        let sh = try #require(section.components(separatedBy: "```sh\n").dropFirst().first?.components(separatedBy: "```").first)
        return (c, sh.trimmingCharacters(in: .whitespacesAndNewlines))
    }

    static func build(_ command: String) throws -> String {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("flowtrace-own-\(getpid())-\(command.count)").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        try readmeGuest().source.write(toFile: dir + "/hello.c", atomically: false, encoding: .utf8)
        let r = try run("/bin/sh", ["-c", "cd \"$0\" && \(command)", dir])
        #expect(r.status == 0, "\(command): \(r.stderr)")
        return dir + "/hello.elf"
    }

    /// Built exactly as documented: the console line, and the entry's return value as the
    /// exit status (it returns 7).
    @Test(.enabled(if: kvmUsable, kvmSkipReason))
    func theDocumentedGuestRunsAndItsReturnIsTheStatus() throws {
        let (_, command) = try Self.readmeGuest()
        #expect(command.hasPrefix("gcc -ffreestanding -nostdlib -static -O2 -mgeneral-regs-only"))
        let elf = try Self.build(command)
        let r = try flowtrace(["run", elf])
        #expect(r.stdout == "hello from my guest\n", "\(r.stderr)")
        #expect(r.status == 7)
        #expect(r.stderr.contains("hello.elf: guest exited with status 7 after"))
    }

    /// Without -mgeneral-regs-only the compiler zeroes the buffer with SSE: where the host
    /// cannot run that (PVM at CPL0), the run names the instruction and the fix.
    @Test(.enabled(if: kvmUsable && isPVM, "needs /dev/kvm on a PVM host (kvm_pvm), where CPL0 SSE is not emulated"))
    func withoutTheFlagTheInstructionAndTheFixAreNamed() throws {
        let (_, command) = try Self.readmeGuest()
        let elf = try Self.build(command.replacingOccurrences(of: " -mgeneral-regs-only", with: ""))
        let r = try flowtrace(["run", elf])
        #expect(r.status == 70)
        #expect(r.stderr.contains("guest fault on vCPU 0: KVM_EXIT_INTERNAL_ERROR (suberror 1: emulation failed) at rip 0x"))
        #expect(r.stderr.contains(": pxor xmm0, xmm0 (66 0f ef c0)"), "\(r.stderr)")
        #expect(r.stderr.contains("flowtrace: an SSE/AVX instruction at CPL0, which this host's KVM (PVM) cannot emulate: build the guest with -mgeneral-regs-only"))
    }
}

@Suite("QEMU's test devices")
struct QEMUDeviceTests {
    /// isa-debug-exit with QEMU's semantics: the port reads 0, a write of V at any width ends
    /// the guest with (V << 1) | 1 (its low byte the exit status, as QEMU's process): a byte
    /// at 0x501 and a word at 0x502 (the defaults: iobase 0x501, iosize 2), a dword at 0xf4
    /// (iobase=0xf4,iosize=4 replaces flowtrace's exit port). Without the device the guest's
    /// write goes nowhere and it ends through flowtrace's port with 0xEE.
    @Test(.enabled(if: kvmUsable, kvmSkipReason))
    func isaDebugExitEndsTheGuestAsQEMUDoes() throws {
        let guest = try Guests.path("qemu-exit")
        let cases: [(vcpus: String, device: String, port: Int, status: UInt32)] = [
            ("1", "isa-debug-exit", 0x501, 0x10 << 1 | 1), ("2", "isa-debug-exit", 0x502, 0x1234 << 1 | 1),
            ("3", "isa-debug-exit,iobase=0xf4,iosize=4", 0xf4, 0x7 << 1 | 1),
        ]
        for c in cases {
            let r = try flowtrace(["run", guest, "--vcpus", c.vcpus, "--device", c.device])
            #expect(r.stdout == "qemu-exit: port \(c.port) reads 0\n", "\(c.device): \(r.stderr)")
            #expect(r.status == Int32(c.status & 0xFF))
            #expect(r.stderr.contains("guest exited with status \(c.status) after"))
        }
        let without = try flowtrace(["run", guest])
        #expect(without.stdout == "qemu-exit: port 1281 reads 255\n")
        #expect(without.status == 0xEE)
        #expect(without.stderr.contains("port 0x501: first read (1 byte)"))
    }

    @Test func badDeviceSpecsAreOneLineErrors() throws {
        let fib = try Guests.path("fib")
        expectOneLineError(try flowtrace(["run", fib, "--device", "pc-testdevv"]), status: 64, "unknown device 'pc-testdevv'", "isa-debug-exit")
        expectOneLineError(try flowtrace(["run", fib, "--device", "isa-debug-exit,iosize=9"]), status: 64, "iosize 9 must be 1 to 4")
        expectOneLineError(try flowtrace(["run", fib, "--device", "isa-debug-exit,port=1"]), status: 64, "has no property 'port' (iobase, iosize)")
        expectOneLineError(try flowtrace(["run", fib, "--device", "isa-debug-exit,iobase=x"]), status: 64, "'iobase=x' is not NAME=NUMBER")
    }

    @Test(.enabled(if: kvmUsable, kvmSkipReason))
    func aDeviceOnAnotherDevicesPortsIsRefused() throws {
        expectOneLineError(try flowtrace(["run", try Guests.path("fib"), "--device", "isa-debug-exit,iobase=0x3f8"]), status: 64,
                           "--device: port 0x3f8 is claimed by both 16550A UART (COM1) and isa-debug-exit")
    }
}

@Suite("QEMU's pc-testdev")
struct PCTestdevTests {
    /// testdev drives every register of the device (see guests/testdev.c) and prints what it
    /// read back: the values QEMU's semantics give, one interrupt from raising IRQ 5, the
    /// MMIO window's memory (an add to it emulated by the host). Without the device every
    /// port reads all ones and no interrupt comes.
    @Test(.enabled(if: kvmUsable, kvmSkipReason))
    func everyRegisterAsQEMUHasIt() throws {
        let guest = try Guests.path("testdev")
        let r = try flowtrace(["run", guest, "--platform", "pc", "--device", "pc-testdev"])
        #expect(r.status == 0x54, "\(r.stderr)")
        #expect(r.stdout == """
            testdev: data 0x11223344
            testdev: byte 1 0x33
            testdev: word at 2 0x1122
            testdev: after byte 0xaa at 0xea 0x11aa3344
            testdev: after word 0xbeef at 0xe8 0x11aabeef
            testdev: flush reads 0x0
            testdev: interrupts on irq 5 0x1
            testdev: irq port reads 0x0
            testdev: mmio qword 0x102030405060708
            testdev: mmio dword at +4 0x1020304
            testdev: mmio after add 3 0x8
            testdev: mmio last word 0x1234

            """)
        let without = try flowtrace(["run", guest, "--platform", "pc"])
        #expect(without.stdout.contains("testdev: data 0xffffffff\n") && without.stdout.contains("testdev: interrupts on irq 5 0x0\n"))
        #expect(without.stderr.contains("no device answers"))
    }
}
