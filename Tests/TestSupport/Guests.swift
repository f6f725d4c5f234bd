import Foundation
import Locking

/// The project's test guests, built from source by `make -C guests` on first use.
public enum Guests {
    /// The repository root (derived from this file's location).
    public static let root: URL = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

    private static let built = Locked<Bool>(false)

    /// Path of `guests/build/NAME.elf`, building every guest first if needed.
    /// Fails the calling test (by throwing) when the build fails.
    public static func path(_ name: String) throws -> String {
        try file("\(name).elf")
    }

    /// Path of a protocol test kernel, `guests/build/FILE` (multiboot.elf, linux.bzimage, ...).
    public static func kernelPath(_ fileName: String) throws -> String { try file(fileName) }

    private static func file(_ fileName: String) throws -> String {
        let file = root.appendingPathComponent("guests/build/\(fileName)").path
        try built.withLock { done in
            if !done {
                // Inside the nested KVM machine (tools/test-nested) there is no make:
                // the guests were built on the host and copied in.
                if !isOnPath("make") && FileManager.default.fileExists(atPath: file) { done = true; return }
                let r = try run("/usr/bin/env", ["make", "-s", "-C", root.appendingPathComponent("guests").path])
                guard r.status == 0 else { throw GuestBuildError(output: r.stdout + r.stderr) }
                done = true
            }
        }
        return file
    }

    private static func isOnPath(_ tool: String) -> Bool {
        let dirs = (ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin").split(separator: ":")
        return dirs.contains { FileManager.default.isExecutableFile(atPath: "\($0)/\(tool)") }
    }

    /// The built `flowtrace` executable: `$FLOWTRACE_BIN`, or the one beside the test bundle.
    public static var flowtrace: String {
        if let p = ProcessInfo.processInfo.environment["FLOWTRACE_BIN"] { return p }
        let bundleDir = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent()
        let candidates = [bundleDir.appendingPathComponent("flowtrace"),
                          root.appendingPathComponent(".build/debug/flowtrace")]
        return (candidates.first { FileManager.default.isExecutableFile(atPath: $0.path) } ?? candidates[1]).path
    }
}

public struct GuestBuildError: Error, CustomStringConvertible {
    public var output: String
    public var description: String { "building the guests failed:\n\(output)" }
}

/// What a finished process left.
public struct ProcessOutput: Sendable {
    public var status: Int32
    public var stdout: String
    public var stderr: String
    public init(status: Int32, stdout: String, stderr: String) { self.status = status; self.stdout = stdout; self.stderr = stderr }
}

/// Runs `executable` with `arguments` to completion and captures its output.
/// `input`: bytes for its standard input (else /dev/null).
public func run(_ executable: String, _ arguments: [String], environment: [String: String]? = nil, input: Data? = nil) throws -> ProcessOutput {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: executable)
    p.arguments = arguments
    if let environment { p.environment = environment }
    let out = Pipe(), err = Pipe()
    p.standardOutput = out
    p.standardError = err
    let inPipe = Pipe()
    p.standardInput = input == nil ? FileHandle.nullDevice : inPipe
    try p.run()
    if let input {
        inPipe.fileHandleForWriting.write(input)
        try inPipe.fileHandleForWriting.close()
    }
    // Read both pipes before waiting so a chatty child cannot block on a full pipe.
    let errData = Locked<Data>(Data())
    let errDone = DispatchSemaphore(value: 0)
    DispatchQueue.global().async {
        let d = err.fileHandleForReading.readDataToEndOfFile()
        errData.withLock { $0 = d }
        errDone.signal()
    }
    let o = out.fileHandleForReading.readDataToEndOfFile()
    errDone.wait()
    p.waitUntilExit()
    return ProcessOutput(status: p.terminationStatus, stdout: String(decoding: o, as: UTF8.self),
                         stderr: errData.withLock { String(decoding: $0, as: UTF8.self) })
}

/// Writes `bytes` to a new temporary file and returns its path.
public func temporaryFile(_ bytes: [UInt8], name: String) throws -> String {
    let dir = FileManager.default.temporaryDirectory.appendingPathComponent("flowtrace-tests-\(getpid())")
    try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
    let url = dir.appendingPathComponent(name)
    try Data(bytes).write(to: url)
    return url.path
}

/// Little-endian patching helpers for building malformed ELF files from good ones.
extension Array where Element == UInt8 {
    public mutating func put16(_ v: UInt16, at o: Int) { for i in 0..<2 { self[o + i] = UInt8(truncatingIfNeeded: v >> (8 * i)) } }
    public mutating func put32(_ v: UInt32, at o: Int) { for i in 0..<4 { self[o + i] = UInt8(truncatingIfNeeded: v >> (8 * i)) } }
    public mutating func put64(_ v: UInt64, at o: Int) { for i in 0..<8 { self[o + i] = UInt8(truncatingIfNeeded: v >> (8 * i)) } }
    public func get16(at o: Int) -> UInt16 { (0..<2).reduce(0) { $0 | UInt16(self[o + $1]) << (8 * $1) } }
    public func get32(at o: Int) -> UInt32 { (0..<4).reduce(0) { $0 | UInt32(self[o + $1]) << (8 * $1) } }
    public func get64(at o: Int) -> UInt64 { (0..<8).reduce(0) { $0 | UInt64(self[o + $1]) << (8 * $1) } }
}
