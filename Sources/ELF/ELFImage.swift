import CLibElf
import Glibc

/// A static x86 ELF executable (ELF64 x86-64, or ELF32 i386 as Multiboot kernels are),
/// validated and read into memory through libelf; or the loadable view of another kind of
/// image (a bzImage's protected-mode code), built with the memberwise initializer.
public struct ELFImage: Sendable {
    /// An ELF note from a `PT_NOTE` segment.
    public struct Note: Sendable, Equatable {
        public var name: String
        public var type: UInt32
        public var descriptor: [UInt8]
        public init(name: String, type: UInt32, descriptor: [UInt8]) {
            self.name = name; self.type = type; self.descriptor = descriptor
        }
    }

    /// A `PT_LOAD` program header and its file bytes.
    public struct Segment: Sendable, Equatable {
        public var virtualAddress: UInt64
        public var physicalAddress: UInt64
        /// Bytes that come from the file (`p_filesz`); the rest up to `memorySize` is zero.
        public var fileSize: UInt64
        public var memorySize: UInt64
        public var isExecutable: Bool, isWritable: Bool, isReadable: Bool
        /// The `fileSize` bytes of the segment.
        public var data: [UInt8]

        /// `virtualAddress ..< virtualAddress + memorySize`.
        public var range: Range<UInt64> { virtualAddress ..< virtualAddress &+ memorySize }
        /// `physicalAddress ..< physicalAddress + memorySize`: where a kernel loader puts it.
        public var physicalRange: Range<UInt64> { physicalAddress ..< physicalAddress &+ memorySize }

        public init(virtualAddress: UInt64, physicalAddress: UInt64, fileSize: UInt64, memorySize: UInt64,
                    isExecutable: Bool, isWritable: Bool, isReadable: Bool, data: [UInt8]) {
            self.virtualAddress = virtualAddress; self.physicalAddress = physicalAddress
            self.fileSize = fileSize; self.memorySize = memorySize
            self.isExecutable = isExecutable; self.isWritable = isWritable; self.isReadable = isReadable
            self.data = data
        }
    }

    /// The file the image came from (as given).
    public let path: String
    /// `e_entry`.
    public let entry: UInt64
    /// The `PT_LOAD` segments in file order.
    public let segments: [Segment]
    /// Functions, objects and code labels from `.symtab`, sorted by address.
    public let symbols: [Symbol]
    /// ELFCLASS64 (false: ELFCLASS32).
    public let is64Bit: Bool
    /// The notes of its `PT_NOTE` segments, in file order.
    public let notes: [Note]

    /// An image described directly (no file parsed): `path` only names it in messages.
    public init(path: String, entry: UInt64, segments: [Segment], symbols: [Symbol] = [], is64Bit: Bool = true, notes: [Note] = []) {
        self.path = path; self.entry = entry; self.segments = segments
        self.symbols = symbols.sorted { ($0.address, $0.name) < ($1.address, $1.name) }
        self.is64Bit = is64Bit; self.notes = notes
    }

    /// Reads and validates `path`.
    public init(path: String) throws(ELFError) {
        try self.init(bytes: Self.readFile(path: path), path: path)
    }

    /// The bytes of the regular file at `path`; errors name it.
    public static func readFile(path: String) throws(ELFError) -> [UInt8] {
        var st = stat()
        guard stat(path, &st) == 0, (st.st_mode & S_IFMT) == S_IFREG else { throw ELFError.notAFile(path: path) }
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw ELFError.unreadable(path: path, reason: String(cString: strerror(errno))) }
        defer { close(fd) }
        var bytes = [UInt8](repeating: 0, count: Int(st.st_size))
        var got = 0
        while got < bytes.count {
            // SAFETY: the read goes into `bytes` at `got`, at most its remaining count.
            let n = bytes.withUnsafeMutableBytes { read(fd, $0.baseAddress! + got, $0.count - got) }
            if n < 0, errno == EINTR { continue }
            guard n > 0 else { throw ELFError.unreadable(path: path, reason: n == 0 ? "short read" : String(cString: strerror(errno))) }
            got += n
        }
        return bytes
    }

    /// Validates an image held in memory; `path` is only used in messages.
    public init(bytes: [UInt8], path: String) throws(ELFError) {
        self.path = path
        // Checks libelf would only report vaguely come first, so messages stay precise.
        guard bytes.count >= 4, bytes[0] == 0x7F, bytes[1] == 0x45, bytes[2] == 0x4C, bytes[3] == 0x46 else {
            throw ELFError.notELF(path: path)
        }
        guard bytes.count >= 5, bytes[4] == 1 || bytes[4] == 2 else {
            if bytes.count >= 5 { throw ELFError.malformed(path: path, detail: "unknown ELF class \(bytes[4])") }
            throw ELFError.truncated(path: path, detail: "\(bytes.count) bytes, shorter than an ELF header")
        }
        let headerSize = bytes[4] == 2 ? 64 : 52
        guard bytes.count >= headerSize else {
            throw ELFError.truncated(path: path, detail: "\(bytes.count) bytes, shorter than the \(headerSize)-byte ELF\(bytes[4] == 2 ? 64 : 32) header")
        }
        var storage = bytes
        // SAFETY: libelf parses `storage`, which outlives the parse; the result copies what it keeps.
        let parsed = storage.withUnsafeMutableBytes { raw -> Result<Parsed, ELFError> in
            Result { () throws(ELFError) in try Parsed.parse(raw, fileSize: bytes.count, path: path) }
        }
        let p = try parsed.get()
        entry = p.entry
        segments = p.segments
        symbols = p.symbols
        is64Bit = p.is64Bit
        notes = p.notes
    }

    /// The symbol called `name`, if any.
    public func symbol(named name: String) -> Symbol? { symbols.first { $0.name == name } }
}

/// The libelf walk, kept apart so the `Elf *` never outlives the buffer it reads.
private struct Parsed {
    var entry: UInt64 = 0
    var segments: [ELFImage.Segment] = []
    var symbols: [Symbol] = []
    var is64Bit = true
    var notes: [ELFImage.Note] = []

    static func parse(_ raw: UnsafeMutableRawBufferPointer, fileSize: Int, path: String) throws(ELFError) -> Parsed {
        _ = elfLibraryReady
        // SAFETY: libelf reads the caller's buffer, which outlives `elf` (ended by defer).
        guard let elf = elf_memory(raw.baseAddress!.assumingMemoryBound(to: CChar.self), raw.count) else {
            throw ELFError.malformed(path: path, detail: libelfMessage())
        }
        defer { elf_end(elf) }
        guard elf_kind(elf) == ELF_K_ELF else { throw ELFError.notELF(path: path) }
        var ehdr = GElf_Ehdr()
        guard gelf_getehdr(elf, &ehdr) != nil else { throw ELFError.malformed(path: path, detail: libelfMessage()) }
        let is64 = gelf_getclass(elf) == ELFCLASS64
        let machine = is64 ? UInt16(EM_X86_64) : UInt16(EM_386)
        guard ehdr.e_machine == machine else { throw ELFError.wrongMachine(path: path, machine: ehdr.e_machine, is64Bit: is64) }
        guard ehdr.e_type == UInt16(ET_EXEC) else { throw ELFError.notExecutable(path: path, type: ehdr.e_type) }

        var out = Parsed()
        out.entry = ehdr.e_entry
        out.is64Bit = is64

        // Overflow-checked: every field here comes from the file.
        let (phSize, o1) = UInt64(ehdr.e_phnum).multipliedReportingOverflow(by: UInt64(ehdr.e_phentsize))
        let (phEnd, o2) = UInt64(ehdr.e_phoff).addingReportingOverflow(phSize)
        if o1 || o2 || phEnd > UInt64(fileSize) {
            throw ELFError.truncated(path: path, detail: "program headers end at byte \(phEnd), file has \(fileSize)")
        }
        var phnum = 0
        guard elf_getphdrnum(elf, &phnum) == 0 else { throw ELFError.malformed(path: path, detail: libelfMessage()) }
        for i in 0..<phnum {
            var ph = GElf_Phdr()
            guard gelf_getphdr(elf, Int32(i), &ph) != nil else { throw ELFError.malformed(path: path, detail: libelfMessage()) }
            if ph.p_type == UInt32(PT_NOTE) {
                let (end, overflow) = ph.p_offset.addingReportingOverflow(ph.p_filesz)
                guard !overflow, end <= UInt64(fileSize) else {
                    throw ELFError.truncated(path: path, detail: "note segment \(i) needs bytes up to \(end), file has \(fileSize)")
                }
                // SAFETY: p_offset..end was checked against the file size above.
                out.notes += try readNotes(UnsafeRawBufferPointer(rebasing: raw[Int(ph.p_offset) ..< Int(end)]), segment: i, path: path)
                continue
            }
            guard ph.p_type == UInt32(PT_LOAD) else { continue }
            let (end, overflow) = ph.p_offset.addingReportingOverflow(ph.p_filesz)
            guard !overflow, end <= UInt64(fileSize) else {
                throw ELFError.truncated(path: path, detail: "segment \(i) needs bytes up to \(end), file has \(fileSize)")
            }
            guard ph.p_filesz <= ph.p_memsz else {
                throw ELFError.malformed(path: path, detail: "segment \(i) has file size \(ph.p_filesz) > memory size \(ph.p_memsz)")
            }
            guard !ph.p_vaddr.addingReportingOverflow(ph.p_memsz).overflow,
                  !ph.p_paddr.addingReportingOverflow(ph.p_memsz).overflow else {
                throw ELFError.malformed(path: path, detail: "segment \(i) wraps past the end of the address space")
            }
            // SAFETY: p_offset..end was checked against the file size above.
            let data = [UInt8](UnsafeRawBufferPointer(rebasing: raw[Int(ph.p_offset) ..< Int(end)]))
            out.segments.append(ELFImage.Segment(
                virtualAddress: ph.p_vaddr, physicalAddress: ph.p_paddr, fileSize: ph.p_filesz,
                memorySize: ph.p_memsz, isExecutable: ph.p_flags & UInt32(PF_X) != 0,
                isWritable: ph.p_flags & UInt32(PF_W) != 0, isReadable: ph.p_flags & UInt32(PF_R) != 0, data: data))
        }
        guard !out.segments.isEmpty else { throw ELFError.noLoadSegments(path: path) }
        // A kernel's entry may be physical (a vmlinux's e_entry is startup_64's load address).
        guard out.segments.contains(where: { $0.isExecutable && ($0.range.contains(out.entry) || $0.physicalRange.contains(out.entry)) }) else {
            throw ELFError.entryOutsideSegments(path: path, entry: out.entry)
        }
        out.symbols = try readSymbols(elf, fileSize: fileSize, path: path)
        return out
    }

    /// The notes in one `PT_NOTE` segment: {namesz, descsz, type, name, desc}, each part
    /// padded to 4 bytes.
    // SAFETY: `bytes` is the caller's checked slice of the file buffer; every read below is
    // inside it (header words only while 12 bytes remain, name and descriptor checked first).
    static func readNotes(_ bytes: UnsafeRawBufferPointer, segment: Int, path: String) throws(ELFError) -> [ELFImage.Note] {
        var notes: [ELFImage.Note] = []
        var at = 0
        func word(_ o: Int) -> Int { Int(bytes.loadUnaligned(fromByteOffset: o, as: UInt32.self).littleEndian) }
        while at + 12 <= bytes.count {
            let nameSize = word(at), descSize = word(at + 4), type = UInt32(word(at + 8))
            let nameStart = at + 12
            guard nameSize <= bytes.count, descSize <= bytes.count else {
                throw ELFError.malformed(path: path, detail: "note at byte \(at) of note segment \(segment) runs past the segment")
            }
            let descStart = nameStart + (nameSize + 3) / 4 * 4
            let end = descStart + (descSize + 3) / 4 * 4
            guard descStart + descSize <= bytes.count else {
                throw ELFError.malformed(path: path, detail: "note at byte \(at) of note segment \(segment) runs past the segment")
            }
            let nameBytes = bytes[nameStart ..< nameStart + nameSize].prefix { $0 != 0 }
            notes.append(ELFImage.Note(name: String(decoding: nameBytes, as: UTF8.self), type: type,
                                       descriptor: [UInt8](bytes[descStart ..< descStart + descSize])))
            at = end
        }
        return notes
    }

    static func readSymbols(_ elf: OpaquePointer, fileSize: Int, path: String) throws(ELFError) -> [Symbol] {
        var result: [Symbol] = []
        var scn = elf_nextscn(elf, nil)
        while let s = scn {
            defer { scn = elf_nextscn(elf, s) }
            var sh = GElf_Shdr()
            guard gelf_getshdr(s, &sh) != nil, sh.sh_type == UInt32(SHT_SYMTAB) else { continue }
            let (symtabEnd, overflow) = sh.sh_offset.addingReportingOverflow(sh.sh_size)
            guard !overflow, symtabEnd <= UInt64(fileSize) else {
                throw ELFError.truncated(path: path, detail: "symbol table ends past the end of the file")
            }
            guard let data = elf_getdata(s, nil), sh.sh_entsize > 0 else { continue }
            let count = Int(sh.sh_size / sh.sh_entsize)
            guard count <= Int(Int32.max) else {
                throw ELFError.malformed(path: path, detail: "symbol table of \(count) entries is too large")
            }
            for i in 0..<count {
                var sym = GElf_Sym()
                guard gelf_getsym(data, Int32(i), &sym) != nil else {
                    throw ELFError.malformed(path: path, detail: "symbol \(i) of \(count) in .symtab cannot be read: \(libelfMessage())")
                }
                let type = Int32(sym.st_info & 0xF)
                let kind: Symbol.Kind
                switch type {
                case STT_FUNC: kind = .function
                case STT_OBJECT: kind = .object
                case STT_NOTYPE where sym.st_shndx != UInt16(SHN_UNDEF) && sym.st_shndx != UInt16(SHN_ABS) && sym.st_name != 0:
                    kind = .label
                default: continue
                }
                guard let cname = elf_strptr(elf, Int(sh.sh_link), Int(sym.st_name)) else { continue }
                let name = String(cString: cname)
                if name.isEmpty { continue }
                result.append(Symbol(name: name, address: sym.st_value, size: sym.st_size, kind: kind,
                                     isGlobal: (sym.st_info >> 4) != 0))
            }
        }
        return result.sorted { ($0.address, $0.name) < ($1.address, $1.name) }
    }
}

private let elfLibraryReady: Bool = {
    _ = elf_version(UInt32(EV_CURRENT))
    return true
}()

private func libelfMessage() -> String {
    if let m = elf_errmsg(-1) { return String(cString: m) }
    return "libelf error"
}
