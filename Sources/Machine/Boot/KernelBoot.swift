import ELF
import KVM

/// A Multiboot module or PVH module: a file and its command line (`--module FILE[,ARGS]`).
public struct BootModule: Sendable, Equatable {
    public var path: String
    public var arguments: String
    public init(path: String, arguments: String = "") { self.path = path; self.arguments = arguments }

    /// `--module FILE[,ARGS]`: the first comma ends the file name, as in QEMU's `-initrd`.
    public init(option text: String) {
        if let comma = text.firstIndex(of: ",") {
            self.init(path: String(text[..<comma]), arguments: String(text[text.index(after: comma)...]))
        } else {
            self.init(path: text)
        }
    }

    /// The string a Multiboot kernel gets for it: the file name, then its arguments (as GRUB
    /// and QEMU pass them).
    var commandLine: String { arguments.isEmpty ? path : path + " " + arguments }
}

/// What a kernel boots with besides its image: `--append`, `--initrd`, `--module`.
public struct BootFiles: Sendable, Equatable {
    public var commandLine: String
    public var initrd: String?
    public var modules: [BootModule]
    public init(commandLine: String = "", initrd: String? = nil, modules: [BootModule] = []) {
        self.commandLine = commandLine; self.initrd = initrd; self.modules = modules
    }
}

/// The CPU state a protocol enters the kernel in.
enum EntryMode: Sendable, Equatable {
    /// 64-bit mode on the loader's identity page tables (Linux's 64-bit protocol): CS 0x10,
    /// data 0x18, rsi = `info`.
    case long64(info: UInt64)
    /// 32-bit protected mode, paging off (PVH, Multiboot): flat CS 0x08, data 0x18,
    /// eax = `magic`, ebx = `info`.
    case protected32(magic: UInt32, info: UInt64)
}

/// A kernel boot, computed before any KVM call: what goes where in guest-physical memory and
/// the boot vCPU's entry state, for the Linux, PVH and Multiboot protocols (see
/// `KernelLayout` for the layout). Only vCPU 0 is started; the others wait in KVM for the
/// INIT/SIPI the kernel sends them through its local APIC, and the MP table lists them.
struct KernelBoot {
    let bootProtocol: BootProtocol
    let layout: BootLayout
    private(set) var map: MemoryMap
    /// Where flowtrace's own structures are (GDT, boot information, boot stack).
    private(set) var area: KernelBootArea = .standard
    /// The loadable view (segments at their physical addresses, symbols when the file has them).
    let image: ELFImage
    let entry: UInt64
    let mode: EntryMode
    /// Everything written into RAM besides the loader's tables, in order.
    private(set) var writes: [(address: UInt64, bytes: [UInt8])] = []
    /// Zeroed ranges: the segments' memory past their file bytes (.bss).
    private(set) var zeroed: [(address: UInt64, count: Int)] = []
    /// Where each module (initrd first) went: guest-physical range and its command line.
    private(set) var placedModules: [(range: Range<UInt64>, commandLine: String)] = []
    /// Where the command line went.
    private(set) var commandLineAddress: UInt64 = 0

    let platform = Platform.pc

    init(kernel: KernelImage, protocol p: BootProtocol, files: BootFiles, memorySize: UInt64, vcpuCount: Int) throws(MachineError) {
        bootProtocol = p
        layout = try BootLayout(kernelMemory: memorySize, vcpuCount: vcpuCount)
        map = MemoryMap(ramSize: memorySize)
        let path = kernel.path
        func unbootable(_ why: String) -> MachineError { .unbootable(path: path, protocol: p, reason: why) }

        // The image's pieces at their physical addresses.
        var segments: [ELFImage.Segment]
        var entry: UInt64
        var reservedEnd: UInt64 = 0   // memory the kernel needs beyond its segments (Linux: init_size)
        switch p {
        case .linux:
            if let h = kernel.linux {
                if let why = h.unsupportedReason { throw unbootable(why) }
                guard kernel.bytes.count > h.kernelOffset else { throw unbootable("the file ends inside its setup code") }
                let code = Array(kernel.bytes[h.kernelOffset...])
                segments = [.init(virtualAddress: KernelLayout.kernelLoad, physicalAddress: KernelLayout.kernelLoad,
                                  fileSize: UInt64(code.count), memorySize: UInt64(code.count),
                                  isExecutable: true, isWritable: true, isReadable: true, data: code)]
                entry = KernelLayout.kernelLoad + 0x200
                // The decompressor extracts to its preferred address and needs init_size there.
                let base = max(h.preferredAddress, KernelLayout.kernelLoad)
                reservedEnd = base + UInt64(h.initSize)
            } else if let elf = kernel.elf {
                segments = elf.segments
                entry = try physicalEntry(elf, unbootable)
            } else {
                throw unbootable("it is neither a bzImage nor an ELF file")
            }
        case .pvh:
            guard let elf = kernel.elf, let e = kernel.pvhEntry else { throw unbootable("no PVH entry note") }
            segments = elf.segments
            entry = UInt64(e)
        case .multiboot:
            guard let h = kernel.multiboot else { throw unbootable("no Multiboot header") }
            let unknown = h.flags & 0xFFF8
            if unknown != 0 { throw unbootable("its header requires features flowtrace does not know (flags \(hexString(UInt64(h.flags))))") }
            if let a = h.addresses {
                segments = [try addressFieldSegment(kernel.bytes, headerOffset: h.offset, header: a.header, load: a.load,
                                                    loadEnd: a.loadEnd, bssEnd: a.bssEnd, unbootable)]
                entry = UInt64(a.entry)
            } else if let elf = kernel.elf {
                segments = elf.segments
                entry = try physicalEntry(elf, unbootable)
            } else {
                throw unbootable("its header has no address fields (flag 16) and the file is not ELF")
            }
        case .multiboot2:
            guard let h = kernel.multiboot2 else { throw unbootable("no Multiboot 2 header") }
            try checkMultiboot2Tags(h, unbootable)
            if let a = h.tag(2), a.body.count >= 16 {
                segments = [try addressFieldSegment(kernel.bytes, headerOffset: h.offset, header: a.body.le32(0), load: a.body.le32(4),
                                                    loadEnd: a.body.le32(8), bssEnd: a.body.le32(12), unbootable)]
            } else if let elf = kernel.elf {
                segments = elf.segments
            } else {
                throw unbootable("its header has no address tag and the file is not ELF")
            }
            if let t = h.tag(3), t.body.count >= 4 {
                entry = UInt64(t.body.le32(0))
            } else if let elf = kernel.elf {
                entry = try physicalEntry(elf, unbootable)
            } else {
                throw unbootable("its header has no entry address tag and the file is not ELF")
            }
        case .payload:
            throw unbootable("a payload is booted by PayloadBoot")
        }
        segments = segments.filter { $0.memorySize > 0 }

        // Every piece must lie in RAM: from 1 MiB on, below the hole or above 4 GiB; or, for
        // a kernel entered in 32-bit mode with paging off (Multiboot, PVH), also in low RAM
        // (0x1000 up to the EBDA at 0x9fc00), as QEMU loads real-mode test payloads at
        // 0x8000: flowtrace's own structures then move above the kernel (`KernelBootArea`).
        var kernelEnd = max(segments.map { $0.physicalAddress + $0.memorySize }.max() ?? 0, reservedEnd)
        var low = false
        for (i, s) in segments.enumerated() {
            let start = s.physicalAddress, end = s.physicalAddress + s.memorySize
            guard start < KernelLayout.kernelLoad else { continue }
            guard p != .linux else {
                throw unbootable("segment \(i) at \(hexString(start))-\(hexString(end)) is below 1 MiB: the Linux protocol loads a kernel from 1 MiB on")
            }
            guard start >= KernelLayout.lowRAMStart, end <= KernelLayout.mpTable else {
                throw unbootable("segment \(i) at \(hexString(start))-\(hexString(end)) overlaps \(start < KernelLayout.lowRAMStart ? "the first page (the real-mode interrupt table)" : "the EBDA and BIOS area (0x9fc00-0x100000)"), which a PC keeps")
            }
            low = true
        }
        if low {
            area = .after(max(kernelEnd, KernelLayout.kernelLoad))
            kernelEnd = area.range.upperBound
            map = MemoryMap(ramSize: memorySize, bootArea: area.range)
        }
        if kernelEnd > map.lowRAMEnd {
            if kernelEnd <= KernelLayout.pciHoleStart {
                throw MachineError.memoryTooSmall(path: path, given: memorySize, needed: roundUp(kernelEnd + (16 << 20), to: 2 << 20))
            }
            throw unbootable("it needs memory up to \(hexString(kernelEnd)), into the PCI hole at \(hexString(KernelLayout.pciHoleStart))")
        }
        self.image = ELFImage(path: path, entry: entry, segments: segments,
                              symbols: kernel.elf?.symbols ?? [], is64Bit: kernel.elf?.is64Bit ?? true, notes: kernel.elf?.notes ?? [])
        self.entry = entry
        for s in segments {
            writes.append((s.physicalAddress, s.data))
            if s.memorySize > s.fileSize { zeroed.append((s.physicalAddress + s.fileSize, Int(s.memorySize - s.fileSize))) }
        }

        // Modules: the initrd first (Linux's initrd, Multiboot's and PVH's module 0, as QEMU does).
        var moduleFiles: [(path: String, commandLine: String)] = []
        if let i = files.initrd { moduleFiles.append((i, i)) }
        for m in files.modules { moduleFiles.append((m.path, m.commandLine)) }
        if p == .linux, !files.modules.isEmpty {
            throw MachineError.bootFile("--module: the Linux protocol takes one initrd (--initrd), not modules")
        }
        var contents: [[UInt8]] = []
        for f in moduleFiles {
            do { contents.append(try ELFImage.readFile(path: f.path)) } catch { throw MachineError.bootFile(fileError(error, p == .linux ? "--initrd" : "--module")) }
        }
        // Multiboot: modules follow the kernel, page-aligned; Linux and PVH: at the top of low RAM.
        var limit = map.lowRAMEnd
        if p == .linux, let h = kernel.linux, h.initrdAddressMax != 0 { limit = min(limit, UInt64(h.initrdAddressMax) + 1) }
        var next = roundUp(kernelEnd, to: 4096)
        for (f, bytes) in zip(moduleFiles, contents) {
            let size = UInt64(bytes.count)
            let start: UInt64
            if p == .multiboot || p == .multiboot2 {
                start = next
                next = roundUp(start + size, to: 4096)
                guard next <= limit else {
                    throw MachineError.memoryTooSmall(path: f.path, given: memorySize, needed: roundUp(next + (16 << 20), to: 2 << 20))
                }
            } else {
                guard limit >= size, (limit - size) & ~0xFFF >= next else {
                    throw MachineError.memoryTooSmall(path: f.path, given: memorySize, needed: roundUp(next + size + (16 << 20), to: 2 << 20))
                }
                start = (limit - size) & ~0xFFF
                limit = start
            }
            writes.append((start, bytes))
            placedModules.append((start ..< start + size, f.commandLine))
        }

        // Boot information.
        var info_ = BootInfoArea(range: area.bootInfo)
        let info: UInt64
        switch p {
        case .linux:
            let h = kernel.linux
            let maximum = h.map { $0.version >= 0x0206 ? Int($0.commandLineSize) : 255 } ?? 2048
            guard files.commandLine.utf8.count <= maximum else {
                throw MachineError.bootFile("--append: \(files.commandLine.utf8.count) bytes; this kernel takes at most \(maximum)")
            }
            commandLineAddress = try info_.place(Array(files.commandLine.utf8) + [0])
            var zp = [UInt8](repeating: 0, count: 4096)
            if let h {
                zp.replaceSubrange(LinuxSetupHeader.start ..< LinuxSetupHeader.start + h.bytes.count, with: h.bytes)
            } else {
                // A vmlinux has no header: the fields the kernel checks, as a bzImage would have them.
                zp.put(UInt16(0xAA55), at: 0x1FE)
                zp.put(UInt32(0x5372_6448), at: 0x202)
                zp.put(UInt16(0x020F), at: 0x206)
                zp[0x211] = LinuxSetupHeader.loadedHigh
                zp.put(UInt32(0x100_0000), at: 0x230)
            }
            zp[0x210] = 0xFF                                    // type_of_loader: undefined loader
            zp.put(UInt32(commandLineAddress), at: 0x228)       // cmd_line_ptr
            if let initrd = placedModules.first {
                zp.put(UInt32(initrd.range.lowerBound), at: 0x218)   // ramdisk_image
                zp.put(UInt32(initrd.range.count), at: 0x21C)        // ramdisk_size
            }
            let e820 = map.e820Bytes
            zp[0x1E8] = UInt8(map.entries.count)
            zp.replaceSubrange(0x2D0 ..< 0x2D0 + e820.count, with: e820)
            info = try info_.place(zp, align: 4096)
            mode = .long64(info: info)
        case .pvh:
            commandLineAddress = try info_.place(Array(files.commandLine.utf8) + [0])
            let memmap = try info_.place(map.entryBytes24, align: 8)
            var list: [UInt8] = []
            for m in placedModules {
                let cmd = try info_.place(Array(m.commandLine.utf8) + [0])
                list += le(m.range.lowerBound) + le(UInt64(m.range.count)) + le(cmd) + le(UInt64(0))
            }
            let modlist = list.isEmpty ? 0 : try info_.place(list, align: 8)
            var si = le(UInt32(0x336E_C578)) + le(UInt32(1)) + le(UInt32(0)) + le(UInt32(placedModules.count))
            si += le(modlist) + le(commandLineAddress) + le(UInt64(0)) + le(memmap) + le(UInt32(map.entries.count)) + le(UInt32(0))
            info = try info_.place(si, align: 8)
            mode = .protected32(magic: 0x336E_C578, info: info)
        case .multiboot:
            // The kernel's own path first, then --append's text, as GRUB and QEMU's -kernel
            // loader pass it (kernels that take the first word as their name rely on it).
            let line = files.commandLine.isEmpty ? path : path + " " + files.commandLine
            commandLineAddress = try info_.place(Array(line.utf8) + [0])
            let name = try info_.place(Array("flowtrace".utf8) + [0])
            let mmap = try info_.place(map.multibootBytes, align: 8)
            var mods: [UInt8] = []
            for m in placedModules {
                let cmd = try info_.place(Array(m.commandLine.utf8) + [0])
                mods += le(UInt32(m.range.lowerBound)) + le(UInt32(m.range.upperBound)) + le(UInt32(cmd)) + le(UInt32(0))
            }
            let modsAddress = mods.isEmpty ? 0 : try info_.place(mods, align: 8)
            var mbi = [UInt8](repeating: 0, count: 120)
            var flags: UInt32 = 1 << 0 | 1 << 2 | 1 << 6 | 1 << 9     // mem, cmdline, mmap, loader name
            if !placedModules.isEmpty { flags |= 1 << 3 }
            mbi.put(flags, at: 0)
            mbi.put(map.lowerKiB, at: 4)
            mbi.put(map.upperKiB, at: 8)
            mbi.put(UInt32(commandLineAddress), at: 16)
            mbi.put(UInt32(placedModules.count), at: 20)
            mbi.put(UInt32(modsAddress), at: 24)
            mbi.put(UInt32(map.multibootBytes.count), at: 44)
            mbi.put(UInt32(mmap), at: 48)
            mbi.put(UInt32(name), at: 64)
            info = try info_.place(mbi, align: 8)
            mode = .protected32(magic: MultibootHeader.bootloaderMagic, info: info)
        case .multiboot2:
            var tags: [UInt8] = []
            func tag(_ type: UInt32, _ body: [UInt8]) {
                tags += le(type) + le(UInt32(8 + body.count)) + body
                while tags.count % 8 != 0 { tags.append(0) }
            }
            tag(1, Array(files.commandLine.utf8) + [0])
            tag(2, Array("flowtrace".utf8) + [0])
            for m in placedModules {
                tag(3, le(UInt32(m.range.lowerBound)) + le(UInt32(m.range.upperBound)) + Array(m.commandLine.utf8) + [0])
            }
            tag(4, le(map.lowerKiB) + le(map.upperKiB))
            tag(6, le(UInt32(24)) + le(UInt32(0)) + map.entryBytes24)
            tag(0, [])
            let mbi = le(UInt32(8 + tags.count)) + le(UInt32(0)) + tags
            info = try info_.place(mbi, align: 8)
            // The command line is the first tag's string.
            commandLineAddress = info + 8 + 8
            mode = .protected32(magic: Multiboot2Header.bootloaderMagic, info: info)
        case .payload:
            throw unbootable("a payload is booted by PayloadBoot")
        }
        writes += info_.writes

        // The loader's GDT for kernels, and the MP table.
        let gdt: [UInt64] = [0, 0x00CF_9A00_0000_FFFF, 0x00AF_9A00_0000_FFFF, 0x00CF_9200_0000_FFFF]
        writes.append((area.gdt, gdt.flatMap { le($0) }))
        let mp = MPTable.bytes(vcpus: vcpuCount)
        writes.append((MPTable.pointerAddress, mp.pointer))
        writes.append((MPTable.tableAddress, mp.table))
    }

    /// Writes the loader's page tables (all of the low 4 GiB identity-mapped), then everything
    /// computed above.
    func load(into memory: GuestMemory) throws(KVMError) {
        // The page tables (0x2000-0x8000) would overwrite a kernel loaded there; its 32-bit
        // entry runs with paging off and needs none.
        if area == .standard { try layout.writeTables(into: memory, mapLow4G: true) }
        for z in zeroed { try memory.fill(physical: z.address, count: z.count) }
        for w in writes { try memory.write(physical: w.address, bytes: w.bytes) }
    }

    /// vCPU 0 enters the kernel; the others are left as KVM created them, waiting for INIT/SIPI.
    func setInitialState(of vcpu: VCPU, index: Int) throws(KVMError) {
        guard index == 0 else { return }
        try vcpu.setSpecialRegisters(specialRegisters(from: vcpu.specialRegisters()))
        try vcpu.setRegisters(registers)
        try vcpu.setFPU(FPUState())
    }

    /// The boot vCPU's system state at the entry.
    func specialRegisters(from base: SpecialRegisters) -> SpecialRegisters {
        var s = base
        let data = Segment.data(selector: KernelLayout.dataSelector)
        s.ds = data; s.es = data; s.fs = data; s.gs = data; s.ss = data
        s.gdt = DescriptorTable(base: area.gdt, limit: 4 * 8 - 1)
        s.idt = DescriptorTable(base: 0, limit: 0)
        switch mode {
        case .long64:
            s.cs = .code64(selector: KernelLayout.code64Selector)
            s.cr0 = 0x8000_0031      // PE ET NE PG
            s.cr3 = layout.cr3
            s.cr4 = 0x20             // PAE
            s.efer = 0x500           // LME LMA
        case .protected32:
            s.cs = .code32(selector: KernelLayout.code32Selector)
            s.cr0 = 0x11             // PE ET
            s.cr3 = 0
            s.cr4 = 0
            s.efer = 0
        }
        return s
    }

    /// The boot vCPU's registers at the entry.
    var registers: Registers {
        var r = Registers()
        r.rip = entry
        r.rsp = area.stackTop
        switch mode {
        case let .long64(info): r.rsi = info
        case let .protected32(magic, info): r.rax = UInt64(magic); r.rbx = info
        }
        return r
    }
}

/// A kernel ELF's entry as a physical address: e_entry itself when it lies in a segment's
/// physical range (a vmlinux's startup_64), else translated from the virtual range.
private func physicalEntry(_ elf: ELFImage, _ fail: (String) -> MachineError) throws(MachineError) -> UInt64 {
    if elf.segments.contains(where: { $0.physicalRange.contains(elf.entry) }) { return elf.entry }
    if let s = elf.segments.first(where: { $0.range.contains(elf.entry) }) { return elf.entry - s.virtualAddress + s.physicalAddress }
    throw fail("its entry \(hexString(elf.entry)) is in no segment")
}

/// The segment a Multiboot header's address fields describe (flag 16, or Multiboot 2's address tag).
private func addressFieldSegment(_ file: [UInt8], headerOffset: Int, header: UInt32, load: UInt32, loadEnd: UInt32, bssEnd: UInt32,
                                 _ fail: (String) -> MachineError) throws(MachineError) -> ELFImage.Segment {
    guard header >= load, UInt64(header - load) <= UInt64(headerOffset) else {
        throw fail("its header address \(hexString(UInt64(header))) and load address \(hexString(UInt64(load))) put the load start before the file")
    }
    let offset = headerOffset - Int(header - load)
    let fileEnd = loadEnd == 0 ? file.count : offset + Int(loadEnd &- load)
    guard loadEnd == 0 || loadEnd >= load, fileEnd <= file.count else {
        throw fail("its load end address \(hexString(UInt64(loadEnd))) is past the end of the file")
    }
    let data = Array(file[offset ..< fileEnd])
    let memoryEnd = bssEnd == 0 ? UInt64(load) + UInt64(data.count) : UInt64(bssEnd)
    guard memoryEnd >= UInt64(load) + UInt64(data.count) else {
        throw fail("its bss end address \(hexString(UInt64(bssEnd))) is before its load end")
    }
    return .init(virtualAddress: UInt64(load), physicalAddress: UInt64(load), fileSize: UInt64(data.count),
                 memorySize: memoryEnd - UInt64(load), isExecutable: true, isWritable: true, isReadable: true, data: data)
}

/// Multiboot 2 header tags flowtrace must refuse: required ones it cannot honour.
private func checkMultiboot2Tags(_ h: Multiboot2Header, _ fail: (String) -> MachineError) throws(MachineError) {
    let provided: Set<UInt32> = [1, 2, 3, 4, 6]
    for t in h.tags where !t.optional {
        switch t.type {
        case 1:
            let asked = stride(from: 0, to: t.body.count - 3, by: 4).map { t.body.le32($0) }
            let missing = asked.filter { !provided.contains($0) }
            if !missing.isEmpty {
                throw fail("it requires boot information tags flowtrace does not provide: \(missing.map(String.init).joined(separator: ", ")) (it gives 1 command line, 2 loader name, 3 modules, 4 basic memory, 6 memory map)")
            }
        case 2, 3, 4, 6, 10:
            break
        case 5: throw fail("it requires a framebuffer (tag 5); flowtrace has none")
        case 7, 8, 9: throw fail("it requires EFI (tag \(t.type)); flowtrace boots without firmware")
        default: throw fail("it requires header tag \(t.type), which flowtrace does not know")
        }
    }
}

private func fileError(_ e: ELFError, _ option: String) -> String {
    switch e {
    case let .notAFile(p): "\(option) \(p): no such file (or not a regular file)"
    case let .unreadable(p, r): "\(option) \(p): cannot read: \(r)"
    default: "\(option): \(e.description)"
    }
}

extension Array where Element == UInt8 {
    mutating func put<T: FixedWidthInteger>(_ v: T, at offset: Int) {
        replaceSubrange(offset ..< offset + T.bitWidth / 8, with: le(v))
    }
}

/// Where a kernel boot puts things, computed without KVM: for inspection and tests.
public struct KernelBootPlan: Sendable {
    /// The entry's physical address.
    public let entry: UInt64
    /// The kernel's pieces in guest-physical memory, and how many bytes of each come from the file.
    public let segments: [Range<UInt64>]
    public let segmentFileSizes: [UInt64]
    /// Where each module (the initrd first) went.
    public let modules: [Range<UInt64>]
    /// The protocol's boot information (zero page, start info, MBI) and command line.
    public let bootInformation: UInt64
    public let commandLine: UInt64
    /// Where flowtrace's own structures went (above the kernel when it loads below 1 MiB).
    public let bootArea: KernelBootArea
    /// The memory map the kernel is handed.
    public let memoryMap: MemoryMap
    private let writes: [(address: UInt64, bytes: [UInt8])]

    public init(_ kernel: KernelImage, boot: BootRequest = .auto, files: BootFiles, memorySize: UInt64, vcpus: Int = 1) throws(MachineError) {
        let b = try KernelBoot(kernel: kernel, protocol: try kernel.resolve(boot), files: files, memorySize: memorySize, vcpuCount: vcpus)
        entry = b.entry
        segments = b.image.segments.map(\.physicalRange)
        segmentFileSizes = b.image.segments.map(\.fileSize)
        modules = b.placedModules.map(\.range)
        switch b.mode {
        case let .long64(info): bootInformation = info
        case let .protected32(_, info): bootInformation = info
        }
        commandLine = b.commandLineAddress
        bootArea = b.area
        memoryMap = b.map
        writes = b.writes
    }

    /// `count` bytes at guest-physical `address` as the boot writes them (nil: not one write's).
    public func bytes(at address: UInt64, count: Int) -> [UInt8]? {
        for w in writes.reversed() where w.address <= address && address + UInt64(count) <= w.address + UInt64(w.bytes.count) {
            let o = Int(address - w.address)
            return Array(w.bytes[o ..< o + count])
        }
        return nil
    }
}
