import CCompression

/// The formats Linux compresses its x86 payload with (`CONFIG_KERNEL_*`), each decoded by
/// the system's library: zlib, liblzma (xz and the legacy lzma format), libzstd, liblz4
/// (the "legacy" frame `lz4 -l` writes), libbz2.
public enum CompressionFormat: String, Sendable, CaseIterable {
    case gzip, xz, lzma, zstd, lz4, bzip2

    /// The format whose magic `bytes` start with.
    public static func detect<C: Collection<UInt8>>(_ bytes: C) -> CompressionFormat? where C.Index == Int {
        let b = Array(bytes.prefix(6))
        func starts(_ m: [UInt8]) -> Bool { b.count >= m.count && Array(b[0..<m.count]) == m }
        if starts([0x1F, 0x8B]) { return .gzip }
        if starts([0xFD, 0x37, 0x7A, 0x58, 0x5A, 0x00]) { return .xz }
        if starts([0x28, 0xB5, 0x2F, 0xFD]) { return .zstd }
        if starts([0x02, 0x21, 0x4C, 0x18]) { return .lz4 }
        if starts([0x42, 0x5A, 0x68]) { return .bzip2 }
        // lzma "alone": a properties byte (lc + lp*9 + pb*45 < 225; 0x5D for the defaults),
        // then a little-endian dictionary size.
        if b.count >= 5, b[0] < 225, b[0] == 0x5D, b[3] != 0 || b[4] != 0 || b[2] != 0 { return .lzma }
        return nil
    }
}

public struct DecompressionError: Error, Sendable, Equatable, CustomStringConvertible {
    public var format: CompressionFormat
    public var reason: String
    public init(_ format: CompressionFormat, _ reason: String) { self.format = format; self.reason = reason }
    public var description: String { "\(format) data: \(reason)" }
}

public enum Decompression {
    /// What a kernel can decompress to at most (Linux's own limit is its init_size; far
    /// below this).
    public static let defaultLimit = 1 << 30

    /// Decompresses one stream of `format` at the start of `input`; bytes after the end of
    /// the stream (Linux appends the decompressed size) are ignored. The output may not
    /// exceed `limit` bytes. Corrupt or truncated data is an error, never a crash.
    public static func decompress(_ input: [UInt8], format: CompressionFormat, limit: Int = defaultLimit) throws(DecompressionError) -> [UInt8] {
        guard !input.isEmpty else { throw DecompressionError(format, "empty input") }
        switch format {
        case .gzip: return try inflate(input, limit: limit)
        case .xz, .lzma: return try unxz(input, format: format, limit: limit)
        case .zstd: return try unzstd(input, limit: limit)
        case .lz4: return try unlz4(input, limit: limit)
        case .bzip2: return try bunzip2(input, limit: limit)
        }
    }

    static let chunk = 1 << 20

    /// Grows `out` by a chunk and hands the new space to `body` (pointer, capacity); keeps
    /// what `body` says it produced.
    static func produce(_ out: inout [UInt8], limit: Int, format: CompressionFormat,
                        _ body: (UnsafeMutablePointer<UInt8>, Int) throws(DecompressionError) -> Int) throws(DecompressionError) {
        let room = min(chunk, limit - out.count)
        guard room > 0 else { throw DecompressionError(format, "decompresses to more than \(limit) bytes") }
        let start = out.count
        out.append(contentsOf: [UInt8](repeating: 0, count: room))  // whole: fast unoptimized too
        // SAFETY: `body` writes at most `room` bytes at the new tail of `out`.
        let made = try out.withUnsafeMutableBufferPointer { (b: inout UnsafeMutableBufferPointer<UInt8>) throws(DecompressionError) -> Int in
            try body(b.baseAddress! + start, room)
        }
        out.removeLast(room - made)
    }

    private static func inflate(_ input: [UInt8], limit: Int) throws(DecompressionError) -> [UInt8] {
        var z = z_stream()
        // 16 + MAX_WBITS: a gzip header and trailer.
        guard inflateInit2_(&z, 16 + MAX_WBITS, ZLIB_VERSION, Int32(MemoryLayout<z_stream>.size)) == Z_OK else {
            throw DecompressionError(.gzip, "zlib could not start")
        }
        defer { inflateEnd(&z) }
        var out: [UInt8] = []
        var input = input
        // SAFETY: zlib reads `input`, which outlives the loop; output goes through `produce`.
        try input.withUnsafeMutableBufferPointer { (inp: inout UnsafeMutableBufferPointer<UInt8>) throws(DecompressionError) in
            z.next_in = inp.baseAddress
            z.avail_in = UInt32(inp.count)
            while true {
                var status: Int32 = Z_OK
                try produce(&out, limit: limit, format: .gzip) { p, n in
                    z.next_out = p
                    z.avail_out = UInt32(n)
                    status = CCompression.inflate(&z, Z_NO_FLUSH)
                    return n - Int(z.avail_out)
                }
                if status == Z_STREAM_END { return }
                guard status == Z_OK || status == Z_BUF_ERROR else {
                    let m = z.msg.map { String(cString: $0) } ?? "error \(status)"
                    throw DecompressionError(.gzip, "corrupt (\(m))")
                }
                if status == Z_BUF_ERROR, z.avail_in == 0 { throw DecompressionError(.gzip, "truncated") }
            }
        }
        return out
    }

    private static func unxz(_ input: [UInt8], format: CompressionFormat, limit: Int) throws(DecompressionError) -> [UInt8] {
        var s = lzma_stream()
        let started = format == .xz ? lzma_stream_decoder(&s, UInt64.max, 0) : lzma_alone_decoder(&s, UInt64.max)
        guard started == LZMA_OK else { throw DecompressionError(format, "liblzma could not start (\(started.rawValue))") }
        defer { lzma_end(&s) }
        var out: [UInt8] = []
        var input = input
        // SAFETY: liblzma reads `input`, which outlives the loop; output goes through `produce`.
        try input.withUnsafeMutableBufferPointer { (inp: inout UnsafeMutableBufferPointer<UInt8>) throws(DecompressionError) in
            s.next_in = UnsafePointer(inp.baseAddress)
            s.avail_in = inp.count
            while true {
                var status = LZMA_OK
                try produce(&out, limit: limit, format: format) { p, n in
                    s.next_out = p
                    s.avail_out = n
                    status = lzma_code(&s, s.avail_in == 0 ? LZMA_FINISH : LZMA_RUN)
                    return n - s.avail_out
                }
                if status == LZMA_STREAM_END { return }
                switch status {
                case LZMA_OK: continue
                case LZMA_BUF_ERROR: throw DecompressionError(format, "truncated")
                case LZMA_FORMAT_ERROR: throw DecompressionError(format, "not \(format) data (bad header)")
                case LZMA_DATA_ERROR: throw DecompressionError(format, "corrupt")
                case LZMA_OPTIONS_ERROR: throw DecompressionError(format, "unsupported options in the header")
                case LZMA_MEM_ERROR: throw DecompressionError(format, "out of memory")
                default: throw DecompressionError(format, "liblzma error \(status.rawValue)")
                }
            }
        }
        return out
    }

    private static func unzstd(_ input: [UInt8], limit: Int) throws(DecompressionError) -> [UInt8] {
        guard let d = ZSTD_createDCtx() else { throw DecompressionError(.zstd, "libzstd could not start") }
        defer { ZSTD_freeDCtx(d) }
        // Linux compresses with --ultra -22: windows up to 2^27 and more.
        _ = ZSTD_DCtx_setParameter(d, ZSTD_d_windowLogMax, 31)
        var out: [UInt8] = []
        var input = input
        // SAFETY: libzstd reads `input`, which outlives the loop; output goes through `produce`.
        try input.withUnsafeMutableBufferPointer { (inp: inout UnsafeMutableBufferPointer<UInt8>) throws(DecompressionError) in
            var source = ZSTD_inBuffer(src: UnsafeRawPointer(inp.baseAddress), size: inp.count, pos: 0)
            while true {
                var left = 0
                var made = 0
                try produce(&out, limit: limit, format: .zstd) { p, n throws(DecompressionError) in
                    var sink = ZSTD_outBuffer(dst: UnsafeMutableRawPointer(p), size: n, pos: 0)
                    left = ZSTD_decompressStream(d, &sink, &source)
                    if ZSTD_isError(left) != 0 {
                        throw DecompressionError(.zstd, "corrupt (\(String(cString: ZSTD_getErrorName(left))))")
                    }
                    made = sink.pos
                    return sink.pos
                }
                // 0: a frame ended (what follows is Linux's appended size).
                if left == 0 { return }
                if source.pos == source.size, made == 0 { throw DecompressionError(.zstd, "truncated") }
            }
        }
        return out
    }

    /// The legacy lz4 frame (`lz4 -l`): magic 0x184C2102, then blocks of a 32-bit
    /// compressed size and LZ4 data, each decompressing to at most 8 MiB.
    private static func unlz4(_ input: [UInt8], limit: Int) throws(DecompressionError) -> [UInt8] {
        let blockMax = 8 << 20
        var out: [UInt8] = []
        var at = 4
        func u32(_ i: Int) -> Int { Int(input[i]) | Int(input[i + 1]) << 8 | Int(input[i + 2]) << 16 | Int(input[i + 3]) << 24 }
        guard input.count >= 4, u32(0) == 0x184C2102 else { throw DecompressionError(.lz4, "not a legacy lz4 frame") }
        while at + 4 <= input.count {
            let size = u32(at)
            // Another magic starts another frame; a size past the data is what Linux appends.
            if size == 0x184C2102 { at += 4; continue }
            guard size > 0, size <= LZ4_compressBound(Int32(blockMax)), at + 4 + size <= input.count else {
                if out.isEmpty { throw DecompressionError(.lz4, "truncated or corrupt block at offset \(at)") }
                break
            }
            let start = out.count
            guard limit - start > 0 else { throw DecompressionError(.lz4, "decompresses to more than \(limit) bytes") }
            let room = min(blockMax, limit - start)
            out.append(contentsOf: [UInt8](repeating: 0, count: room))  // whole: fast unoptimized too
            // SAFETY: LZ4_decompress_safe reads `size` bytes inside `input` (checked above) and
            // writes at most `room` bytes into the new tail of `out`.
            let made = input.withUnsafeBufferPointer { src in
                out.withUnsafeMutableBufferPointer { dst in
                    LZ4_decompress_safe(UnsafeRawPointer(src.baseAddress! + at + 4).assumingMemoryBound(to: CChar.self),
                                        UnsafeMutableRawPointer(dst.baseAddress! + start).assumingMemoryBound(to: CChar.self),
                                        Int32(size), Int32(room))
                }
            }
            guard made >= 0 else { throw DecompressionError(.lz4, "corrupt block at offset \(at)") }
            out.removeLast(room - Int(made))
            at += 4 + size
        }
        guard !out.isEmpty else { throw DecompressionError(.lz4, "no data") }
        return out
    }

    private static func bunzip2(_ input: [UInt8], limit: Int) throws(DecompressionError) -> [UInt8] {
        var s = bz_stream()
        guard BZ2_bzDecompressInit(&s, 0, 0) == BZ_OK else { throw DecompressionError(.bzip2, "libbz2 could not start") }
        defer { BZ2_bzDecompressEnd(&s) }
        var out: [UInt8] = []
        var input = input
        // SAFETY: libbz2 reads `input`, which outlives the loop; output goes through `produce`.
        try input.withUnsafeMutableBufferPointer { (inp: inout UnsafeMutableBufferPointer<UInt8>) throws(DecompressionError) in
            s.next_in = UnsafeMutableRawPointer(inp.baseAddress!).assumingMemoryBound(to: CChar.self)
            s.avail_in = UInt32(inp.count)
            while true {
                var status = BZ_OK
                try produce(&out, limit: limit, format: .bzip2) { p, n in
                    s.next_out = UnsafeMutableRawPointer(p).assumingMemoryBound(to: CChar.self)
                    s.avail_out = UInt32(n)
                    status = BZ2_bzDecompress(&s)
                    return n - Int(s.avail_out)
                }
                if status == BZ_STREAM_END { return }
                guard status == BZ_OK else {
                    throw DecompressionError(.bzip2, status == BZ_DATA_ERROR_MAGIC ? "not bzip2 data" : "corrupt (error \(status))")
                }
                if s.avail_in == 0, s.avail_out != 0 { throw DecompressionError(.bzip2, "truncated") }
            }
        }
        return out
    }
}
