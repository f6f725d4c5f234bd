import ELF

/// The boot protocols flowtrace speaks (see the README's "Booting kernels").
public enum BootProtocol: String, Sendable, CaseIterable, CustomStringConvertible {
    /// flowtrace's own payloads: an ELF64 executable started at its entry in 64-bit mode on
    /// every vCPU (`PayloadBoot`).
    case payload
    /// Linux's 64-bit boot protocol: a bzImage (setup header "HdrS") or a vmlinux ELF.
    case linux
    /// Xen's PVH entry (an ELF note `XEN_ELFNOTE_PHYS32_ENTRY`), 32-bit protected mode.
    case pvh
    /// Multiboot 1 (header magic 0x1BADB002), 32-bit protected mode.
    case multiboot
    /// Multiboot 2 (header magic 0xE85250D6), 32-bit protected mode.
    case multiboot2

    public var description: String { rawValue }

    /// The platform the protocol needs: kernels get a PC.
    public var platform: Platform { self == .payload ? .payload : .pc }
}

/// The protocol a user asks for (`--boot`).
public enum BootRequest: Sendable, Equatable, CustomStringConvertible {
    /// What the image is (see `KernelImage.recognize`).
    case auto
    case boot(BootProtocol)

    public var description: String {
        switch self {
        case .auto: "auto"
        case let .boot(p): p.rawValue
        }
    }
}

/// The fields of a Linux setup header ("HdrS") flowtrace uses; offsets are from the start
/// of the file (Linux's Documentation/arch/x86/boot.rst).
public struct LinuxSetupHeader: Sendable, Equatable {
    /// The protocol version, e.g. 0x020F for 2.15.
    public var version: UInt16
    /// 512-byte sectors of real-mode setup code after the boot sector.
    public var setupSectors: Int
    public var loadFlags: UInt8
    public var extendedLoadFlags: UInt16
    /// Highest address an initrd may end at (inclusive).
    public var initrdAddressMax: UInt32
    public var kernelAlignment: UInt32
    /// The kernel's command-line limit in bytes, without the terminating NUL.
    public var commandLineSize: UInt32
    /// Memory the kernel needs from its load address on, decompression included.
    public var initSize: UInt32
    public var preferredAddress: UInt64
    /// The compressed kernel inside the protected-mode code: offset from its start, length.
    public var payloadOffset: UInt32
    public var payloadLength: UInt32
    /// The `kernel_version` string the header points at (2.00+), if it is there.
    public var kernelVersion: String?
    /// The header bytes as in the file, from 0x1F1 to its end (0x202 + byte 0x201).
    public var bytes: [UInt8]

    public static let start = 0x1F1
    /// `XLF_KERNEL_64`: the kernel has the 64-bit entry at +0x200.
    public static let kernel64 = UInt16(1)
    /// `LOADED_HIGH`: the protected-mode code goes at 1 MiB (a bzImage).
    public static let loadedHigh = UInt8(1)

    /// Where the protected-mode kernel starts in the file.
    public var kernelOffset: Int { (setupSectors + 1) * 512 }

    /// "2.15" (the minor version in two digits, as boot.rst writes "2.05").
    public var versionString: String {
        let minor = version & 0xFF
        return "\(version >> 8).\(minor < 10 ? "0" : "")\(minor)"
    }

    /// Parses the header of `bytes` (nil: no "HdrS" at 0x202 with the boot flag 0xAA55).
    public static func parse(_ b: [UInt8]) -> LinuxSetupHeader? {
        guard b.count >= 0x264, b.le16(0x1FE) == 0xAA55, b.le32(0x202) == 0x5372_6448 else { return nil }
        let end = min(0x202 + Int(b[0x201]), b.count)
        let sectors = Int(b[0x1F1])
        return LinuxSetupHeader(
            version: b.le16(0x206), setupSectors: sectors == 0 ? 4 : sectors, loadFlags: b[0x211],
            extendedLoadFlags: b.le16(0x236), initrdAddressMax: b.le32(0x22C), kernelAlignment: b.le32(0x230),
            commandLineSize: b.le32(0x238), initSize: b.le32(0x260), preferredAddress: b.le64(0x258),
            payloadOffset: b.le32(0x248), payloadLength: b.le32(0x24C), kernelVersion: versionString(b),
            bytes: Array(b[Self.start ..< max(end, Self.start)]))
    }

    /// The NUL-terminated string at `kernel_version` + 0x200 (inside the setup code).
    private static func versionString(_ b: [UInt8]) -> String? {
        let pointer = Int(b.le16(0x20E))
        guard pointer != 0, pointer + 0x200 < b.count else { return nil }
        var end = pointer + 0x200
        while end < b.count, end - pointer < 0x200 + 256, b[end] >= 0x20, b[end] < 0x7F { end += 1 }
        guard end < b.count, b[end] == 0, end > pointer + 0x200 else { return nil }
        return String(decoding: b[(pointer + 0x200)..<end], as: UTF8.self)
    }

    /// Why the 64-bit protocol cannot boot this kernel (nil: it can).
    public var unsupportedReason: String? {
        if version < 0x020C {
            return "its boot protocol \(versionString) is older than 2.12, the first with a 64-bit entry"
        }
        if loadFlags & Self.loadedHigh == 0 { return "it is a zImage (loaded low), not a bzImage" }
        if extendedLoadFlags & Self.kernel64 == 0 { return "its header has no 64-bit entry (XLF_KERNEL_64 clear in xloadflags)" }
        return nil
    }
}

/// A Multiboot 1 header (GNU Multiboot Specification 0.6.96, "OS image format").
public struct MultibootHeader: Sendable, Equatable {
    public static let magic: UInt32 = 0x1BAD_B002
    /// The magic the kernel finds in eax.
    public static let bootloaderMagic: UInt32 = 0x2BAD_B002
    /// File offset of the header.
    public var offset: Int
    public var flags: UInt32
    /// The address fields (flag 16).
    public struct Addresses: Sendable, Equatable {
        public var header: UInt32, load: UInt32, loadEnd: UInt32, bssEnd: UInt32, entry: UInt32
    }
    public var addresses: Addresses?

    /// The first valid header in the file's first 8 KiB, 4-byte aligned (magic, flags and
    /// checksum summing to zero).
    public static func find(in b: [UInt8]) -> MultibootHeader? {
        var at = 0
        while at + 12 <= min(b.count, 8192) {
            defer { at += 4 }
            guard b.le32(at) == magic else { continue }
            let flags = b.le32(at + 4)
            guard magic &+ flags &+ b.le32(at + 8) == 0 else { continue }
            var h = MultibootHeader(offset: at, flags: flags, addresses: nil)
            if flags & (1 << 16) != 0, at + 32 <= b.count {
                h.addresses = Addresses(header: b.le32(at + 12), load: b.le32(at + 16), loadEnd: b.le32(at + 20),
                                        bssEnd: b.le32(at + 24), entry: b.le32(at + 28))
            }
            return h
        }
        return nil
    }
}

/// A Multiboot 2 header (Multiboot2 Specification, "OS image format").
public struct Multiboot2Header: Sendable, Equatable {
    public static let magic: UInt32 = 0xE852_50D6
    /// The magic the kernel finds in eax.
    public static let bootloaderMagic: UInt32 = 0x36D7_6289
    public struct Tag: Sendable, Equatable {
        public var type: UInt16
        public var optional: Bool
        /// The tag's bytes after its 8-byte type/flags/size header.
        public var body: [UInt8]
    }
    public var offset: Int
    public var tags: [Tag]

    /// The first valid header in the file's first 32 KiB, 8-byte aligned.
    public static func find(in b: [UInt8]) -> Multiboot2Header? {
        var at = 0
        while at + 16 <= min(b.count, 32768) {
            defer { at += 8 }
            guard b.le32(at) == magic else { continue }
            let arch = b.le32(at + 4), length = Int(b.le32(at + 8))
            guard magic &+ arch &+ UInt32(truncatingIfNeeded: length) &+ b.le32(at + 12) == 0,
                  length >= 24, at + length <= b.count else { continue }
            var tags: [Tag] = []
            var t = at + 16
            while t + 8 <= at + length {
                let type = b.le16(t), size = Int(b.le32(t + 4))
                guard size >= 8, t + size <= at + length else { break }
                if type == 0 { break }
                tags.append(Tag(type: type, optional: b.le16(t + 2) & 1 != 0, body: Array(b[t + 8 ..< t + size])))
                t += (size + 7) / 8 * 8
            }
            return Multiboot2Header(offset: at, tags: tags)
        }
        return nil
    }

    public func tag(_ type: UInt16) -> Tag? { tags.first { $0.type == type } }
}

/// A kernel or payload image, recognised: its bytes, its ELF view (for an ELF file), and the
/// boot headers found in it.
public struct KernelImage: Sendable {
    public let path: String
    public let bytes: [UInt8]
    /// The parsed ELF file (nil: not an ELF file).
    public let elf: ELFImage?
    public let linux: LinuxSetupHeader?
    public let multiboot: MultibootHeader?
    public let multiboot2: Multiboot2Header?
    /// The PVH entry from a `XEN_ELFNOTE_PHYS32_ENTRY` note.
    public let pvhEntry: UInt32?
    /// An ELF with a "Linux" note (a vmlinux).
    public let isLinuxELF: Bool

    /// Reads and recognises the file at `path`.
    public init(path: String) throws(MachineError) {
        let bytes: [UInt8]
        do { bytes = try ELFImage.readFile(path: path) } catch { throw MachineError.image(error) }
        try self.init(bytes: bytes, path: path)
    }

    public init(bytes: [UInt8], path: String) throws(MachineError) {
        self.path = path
        self.bytes = bytes
        let isELF = bytes.count >= 4 && bytes[0 ..< 4] == [0x7F, 0x45, 0x4C, 0x46]
        if isELF {
            do { elf = try ELFImage(bytes: bytes, path: path) } catch { throw MachineError.image(error) }
        } else {
            elf = nil
        }
        linux = isELF ? nil : LinuxSetupHeader.parse(bytes)
        multiboot = MultibootHeader.find(in: bytes)
        multiboot2 = Multiboot2Header.find(in: bytes)
        let notes = elf?.notes ?? []
        pvhEntry = notes.first { $0.name == "Xen" && $0.type == 18 && $0.descriptor.count >= 4 }.map { $0.descriptor.le32(0) }
        isLinuxELF = notes.contains { $0.name == "Linux" }
    }

    /// What the file is, in words ("Linux bzImage, boot protocol 2.15").
    public var kind: String {
        var parts: [String] = []
        if let l = linux { parts.append("Linux bzImage, boot protocol \(l.versionString)") }
        if let e = elf {
            parts.append(e.is64Bit ? "ELF64 x86-64 executable" : "ELF32 i386 executable")
            if isLinuxELF { parts.append("Linux vmlinux") }
        }
        if multiboot2 != nil { parts.append("Multiboot 2 header") }
        if multiboot != nil { parts.append("Multiboot header") }
        if let p = pvhEntry { parts.append("PVH entry \(hexString(UInt64(p)))") }
        if parts.isEmpty { parts.append(describeUnknown(bytes)) }
        return parts.joined(separator: ", ")
    }

    /// The protocols this image can be booted with, in the order `auto` tries them: Linux
    /// (bzImage or vmlinux), Multiboot 2, Multiboot 1, PVH, then flowtrace's payload.
    public var protocols: [BootProtocol] {
        var p: [BootProtocol] = []
        if linux != nil || isLinuxELF { p.append(.linux) }
        if multiboot2 != nil { p.append(.multiboot2) }
        if multiboot != nil { p.append(.multiboot) }
        if pvhEntry != nil { p.append(.pvh) }
        if let e = elf, e.is64Bit { p.append(.payload) }
        return p
    }

    /// The protocol `request` boots this image with; errors say what was found.
    public func resolve(_ request: BootRequest) throws(MachineError) -> BootProtocol {
        switch request {
        case .auto:
            if let first = protocols.first { return first }
            if let e = elf, !e.is64Bit { throw MachineError.image(.not64Bit(path: path)) }
            throw MachineError.notBootable(path: path, found: kind)
        case let .boot(p):
            if protocols.contains(p) { return p }
            // --boot linux also takes any ELF64 kernel (a vmlinux without the Linux note).
            if p == .linux, let e = elf, e.is64Bit { return p }
            throw MachineError.wrongBootProtocol(p, path: path, found: kind, missing: p.needs)
        }
    }
}

extension BootProtocol {
    /// What an image needs to be booted this way, in words.
    var needs: String {
        switch self {
        case .payload: "an ELF64 x86-64 executable"
        case .linux: "a Linux setup header (\"HdrS\" at 0x202) or an ELF64 kernel"
        case .pvh: "an ELF note XEN_ELFNOTE_PHYS32_ENTRY (name \"Xen\", type 18)"
        case .multiboot: "a Multiboot header (magic 0x1BADB002) in its first 8 KiB"
        case .multiboot2: "a Multiboot 2 header (magic 0xE85250D6) in its first 32 KiB"
        }
    }
}

/// A few words on a file that is no kernel, from its first bytes.
private func describeUnknown(_ b: [UInt8]) -> String {
    if b.isEmpty { return "an empty file" }
    if b.starts(with: [0x1F, 0x8B]) { return "gzip-compressed data (decompress it first)" }
    if b.starts(with: [0xFD, 0x37, 0x7A, 0x58, 0x5A, 0x00]) { return "xz-compressed data (decompress it first)" }
    if b.starts(with: [0x28, 0xB5, 0x2F, 0xFD]) { return "zstd-compressed data (decompress it first)" }
    if b.starts(with: Array("#!".utf8)) { return "a script" }
    if b.starts(with: Array("070701".utf8)) { return "a cpio archive (an initrd? pass it with --initrd)" }
    if b.count >= 2, b[0] == 0x4D, b[1] == 0x5A { return "a PE/MZ executable without a Linux setup header" }
    return "no ELF magic, no Linux setup header, no Multiboot header"
}

extension Array where Element == UInt8 {
    func le16(_ at: Int) -> UInt16 { UInt16(self[at]) | UInt16(self[at + 1]) << 8 }
    func le32(_ at: Int) -> UInt32 { UInt32(le16(at)) | UInt32(le16(at + 2)) << 16 }
    func le64(_ at: Int) -> UInt64 { UInt64(le32(at)) | UInt64(le32(at + 4)) << 32 }
}
