import Foundation

/// A compressor the tests need is not installed (tools/setup installs them all).
public struct CompressorMissing: Error, CustomStringConvertible {
    public var name: String
    public var description: String { "\(name) is not installed (tools/setup installs it)" }
}

/// A compressor exited with an error.
public struct CompressorFailed: Error, CustomStringConvertible {
    public var name: String
    public var status: Int32
    public var description: String { "\(name) exited with status \(status)" }
}

/// `data` compressed as Linux's build compresses a bzImage's payload
/// (arch/x86/boot/compressed/Makefile: cmd_gzip, cmd_xzkern, cmd_lzma, cmd_zstd22, cmd_lz4,
/// cmd_bzip2), the uncompressed size appended as the build does for all but gzip.
/// `format`: gzip, xz, lzma, zstd, lz4 or bzip2.
public func compressedLikeLinux(_ data: [UInt8], format: String) throws -> [UInt8] {
    let (tool, args): (String, [String]) = switch format {
    case "gzip": ("gzip", ["-n", "-9", "-c"])
    case "xz": ("xz", ["--check=crc32", "--lzma2=dict=1MiB", "-c"])
    case "lzma": ("xz", ["--format=lzma", "-9", "-c"])
    case "zstd": ("zstd", ["-19", "-q", "-c"])
    case "lz4": ("lz4", ["-l", "-9", "-q", "-c"])
    default: ("bzip2", ["-9", "-c"])
    }
    guard let path = ["/usr/bin/\(tool)", "/bin/\(tool)"].first(where: { FileManager.default.isExecutableFile(atPath: $0) }) else {
        throw CompressorMissing(name: tool)
    }
    // Tests run in parallel: a name of its own per call.
    let input = try temporaryFile(data, name: "payload-\(format)-\(UUID().uuidString)")
    let p = Process()
    p.executableURL = URL(fileURLWithPath: path)
    p.arguments = args + [input]
    let out = Pipe()
    p.standardOutput = out
    try p.run()
    let bytes = [UInt8](out.fileHandleForReading.readDataToEndOfFile())
    p.waitUntilExit()
    guard p.terminationStatus == 0 else { throw CompressorFailed(name: tool, status: p.terminationStatus) }
    var size = [UInt8](repeating: 0, count: 4)
    size.put32(UInt32(data.count), at: 0)
    return format == "gzip" ? bytes : bytes + size
}
