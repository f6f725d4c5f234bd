import ELF
import LinuxKernel

/// A Linux kernel's own view: its decompressed vmlinux (code and data at their link
/// addresses) and its symbols, with where they came from.
public struct LinuxKernelView: Sendable {
    /// The kernel as an ELF file: the vmlinux itself, or the one a bzImage carries
    /// compressed (stripped: no `.symtab`, so `symbols` come from elsewhere).
    public let vmlinux: ELFImage?
    public let symbols: KernelSymbols
    /// The payload's format, for a bzImage.
    public let compression: CompressionFormat?
    /// "6.1.0-57-amd64 (debian-kernel@lists.debian.org) #1 SMP ...".
    public let version: String?

    /// `vmlinux` with `symbols` as its symbol table: what probe specs, filters, flow
    /// graphs and reports resolve names against.
    /// The byte the kernel image has at link address `address` (nil: not in its file bytes):
    /// what `ProbeGate` checks a location against.
    public func imageByte(at address: UInt64) -> UInt8? {
        guard let vmlinux else { return nil }
        for s in vmlinux.segments where s.virtualAddress <= address && address < s.virtualAddress &+ s.fileSize {
            return s.data[Int(address - s.virtualAddress)]
        }
        return nil
    }

    public var image: ELFImage? {
        if symbols.source == .symtab { return vmlinux }
        return vmlinux.map { ELFImage(path: $0.path, entry: $0.entry, segments: $0.segments, symbols: symbols.elfSymbols, is64Bit: $0.is64Bit, notes: $0.notes) }
    }
}

extension KernelImage {
    /// Whether the image is a Linux kernel (a bzImage or a vmlinux).
    public var isLinux: Bool { linux != nil || isLinuxELF }

    /// The decompressed payload of a bzImage (nil: not a bzImage, or one whose header
    /// names no payload: both fields 0, as in protocols before 2.08).
    public func payload() throws(MachineError) -> (format: CompressionFormat, bytes: [UInt8])? {
        guard let h = linux, h.payloadOffset != 0 || h.payloadLength != 0 else { return nil }
        let start = h.kernelOffset + Int(h.payloadOffset)
        let length = Int(h.payloadLength)
        guard h.payloadOffset != 0, length > 0, start + length <= bytes.count else {
            throw MachineError.symbols("\(path): its setup header's payload (offset \(hexString(UInt64(h.payloadOffset))), length \(length)) is not inside the file (\(bytes.count) bytes)")
        }
        let data = Array(bytes[start..<(start + length)])
        guard let format = CompressionFormat.detect(data) else {
            let head = data.prefix(6).map { String($0, radix: 16) }.joined(separator: " ")
            throw MachineError.symbols("\(path): its payload starts with \(head), no compression format flowtrace reads (gzip, xz, lzma, zstd, lz4, bzip2)")
        }
        do {
            // A kernel decompresses to at most init_size (boot.rst); a little more is slack.
            let limit = max(Int(h.initSize), 64 << 20) * 2
            return (format, try Decompression.decompress(data, format: format, limit: limit))
        } catch {
            throw MachineError.symbols("\(path): its payload: \(error.description)")
        }
    }

    /// The kernel's view with its symbols, from (in this order) the image's own `.symtab`,
    /// `symbolFile`, or the kallsyms tables inside the kernel. Nil for an image that is not a
    /// Linux kernel when no `symbolFile` is given.
    public func linuxView(symbolFile: String? = nil) throws(MachineError) -> LinuxKernelView? {
        var vmlinux: ELFImage? = nil
        var compression: CompressionFormat? = nil
        var kernelBytes: [UInt8]? = nil
        if let e = elf, isLinuxELF {
            vmlinux = e
            kernelBytes = bytes
        } else if let (format, data) = try payload() {
            compression = format
            kernelBytes = data
            do { vmlinux = try ELFImage(bytes: data, path: "\(path) (its \(format) payload)") } catch {
                throw MachineError.symbols("\(path): its decompressed payload is not the kernel's ELF file: \(error.description)")
            }
        } else if symbolFile == nil {
            return nil
        }
        let version = linux?.kernelVersion.flatMap { $0.isEmpty ? nil : $0 } ?? kernelBytes.flatMap(linuxVersionString(in:))
        let symbols: KernelSymbols
        if let e = vmlinux, !e.symbols.isEmpty {
            symbols = KernelSymbols(symbols: e.symbols.map { KernelSymbol(address: $0.address, type: $0.kind == .function ? ($0.isGlobal ? "T" : "t") : ($0.isGlobal ? "D" : "d"), name: $0.name) }, source: .symtab)
        } else if let symbolFile {
            let text: [UInt8]
            do { text = try ELFImage.readFile(path: symbolFile) } catch {
                throw MachineError.symbols("symbol file: \(error.description)")
            }
            do { symbols = KernelSymbols(symbols: try SymbolFile.parse(String(decoding: text, as: UTF8.self), path: symbolFile), source: .file(symbolFile)) } catch {
                throw MachineError.symbols(error.description)
            }
        } else if let kernelBytes {
            do { symbols = KernelSymbols(symbols: try Kallsyms.decode(kernelBytes), source: .kallsyms(compression: compression)) } catch {
                throw MachineError.symbols("\(path): \(error.description); give the kernel's System.map or a /proc/kallsyms with --symbol-file FILE")
            }
        } else {
            return nil
        }
        return LinuxKernelView(vmlinux: vmlinux, symbols: symbols, compression: compression, version: version)
    }
}
