import ELF
import FlowTrace
import Foundation
import KVM
import Machine
import Testing
import TestSupport

/// FNV-1a (32 bits), as the test kernels hash their modules.
func fnv1a(_ bytes: [UInt8]) -> UInt32 {
    var h: UInt32 = 2_166_136_261
    for b in bytes { h ^= UInt32(b); h = h &* 16_777_619 }
    return h
}

private func fileBytes(_ path: String) throws -> [UInt8] { try [UInt8](Data(contentsOf: URL(fileURLWithPath: path))) }

private func le32(_ b: [UInt8], _ at: Int) -> UInt32 { (0..<4).reduce(0) { $0 | UInt32(b[at + $1]) << ($1 * 8) } }

/// Recognition, boot structures and the memory map, from the files and bytes alone (no KVM).
@Suite("boot protocols: images and boot structures")
struct BootImageTests {
    @Test("each test kernel is recognised as its protocol", arguments: [
        ("multiboot.elf", BootProtocol.multiboot), ("multiboot2.elf", .multiboot2), ("pvh.elf", .pvh),
        ("linux.bzimage", .linux), ("vmlinux.elf", .linux),
    ])
    func recognised(_ file: String, _ expected: BootProtocol) throws {
        let k = try KernelImage(path: try Guests.kernelPath(file))
        #expect(try k.resolve(.auto) == expected)
        #expect(try k.resolve(.boot(expected)) == expected)
    }

    /// A vmlinux linked at the high half, as Linux is: loaded at its physical addresses
    /// (p_paddr, read here from the program headers by readelf's rules), entered at the
    /// physical e_entry; its symbols stay virtual.
    @Test func vmlinuxLoadsAtPhysicalAddresses() throws {
        let path = try Guests.kernelPath("vmlinux-high.elf")
        let elf = try ELFImage(path: path)
        let k = try KernelImage(path: path)
        #expect(try k.resolve(.auto) == .linux)
        let plan = try KernelBootPlan(k, files: .init(), memorySize: 64 << 20)
        #expect(plan.segments == elf.segments.map(\.physicalRange))
        #expect(elf.segments.allSatisfy { $0.virtualAddress == $0.physicalAddress + 0xFFFF_FFFF_8000_0000 })
        #expect(plan.entry == elf.entry)
        #expect(try #require(elf.symbol(named: "startup_64")).address == plan.entry + 0xFFFF_FFFF_8000_0000)
        // The zero page of a vmlinux: the header fields a bzImage would carry.
        let zp = try #require(plan.bytes(at: plan.bootInformation, count: 4096))
        #expect(le32(zp, 0x202) == 0x5372_6448)
        #expect(zp[0x1FE] == 0x55 && zp[0x1FF] == 0xAA)
    }

    @Test func payloadsStayPayloads() throws {
        let k = try KernelImage(path: try Guests.path("fib"))
        #expect(try k.resolve(.auto) == .payload)
        #expect(k.kind == "ELF64 x86-64 executable")
    }

    /// The header fields as boot.rst places them, read by the test from the file itself.
    @Test func bzImageHeader() throws {
        let b = try fileBytes(try Guests.kernelPath("linux.bzimage"))
        let h = try #require(KernelImage(bytes: b, path: "linux.bzimage").linux)
        #expect(h.version == UInt16(b[0x206]) | UInt16(b[0x207]) << 8)
        #expect(h.kernelOffset == (Int(b[0x1F1]) + 1) * 512)
        #expect(h.extendedLoadFlags & 1 == 1)
        #expect(h.initSize == le32(b, 0x260))
        #expect(h.bytes == Array(b[0x1F1 ..< 0x202 + Int(b[0x201])]))
        #expect(h.unsupportedReason == nil)
        var old = b
        old[0x236] = 0    // no XLF_KERNEL_64
        #expect(throws: MachineError.unbootable(path: "k", protocol: .linux, reason: "its header has no 64-bit entry (XLF_KERNEL_64 clear in xloadflags)")) {
            _ = try KernelBootPlan(try KernelImage(bytes: old, path: "k"), files: .init(), memorySize: 64 << 20)
        }
    }

    @Test func wrongProtocolAndUnknownFilesSayWhatWasFound() throws {
        let fib = try KernelImage(path: try Guests.path("fib"))
        #expect(throws: MachineError.self) { try fib.resolve(.boot(.multiboot)) }
        do { _ = try fib.resolve(.boot(.pvh)) } catch {
            #expect(error.description.contains("--boot pvh:"))
            #expect(error.description.contains("XEN_ELFNOTE_PHYS32_ENTRY"))
            #expect(error.description.contains("found: ELF64 x86-64 executable"))
        }
        let gz = try KernelImage(bytes: [0x1F, 0x8B, 8, 0, 0, 0], path: "k.gz")
        do { _ = try gz.resolve(.auto); Issue.record("a gzip file was accepted") } catch {
            #expect(error.description == "k.gz: not a kernel or payload flowtrace can boot (found: gzip-compressed data (decompress it first)); it boots ELF64 payloads, Linux bzImage/vmlinux, PVH, Multiboot 1 and 2 kernels")
        }
    }

    /// A Multiboot 1 header with the address fields (flag 16) in a flat binary: loaded from
    /// them; one with a flag bit the loader does not know: refused.
    @Test func multibootAddressFieldsAndUnknownFlags() throws {
        var file = [UInt8](repeating: 0x90, count: 0x3000)
        let flags: UInt32 = 1 << 16
        let fields: [UInt32] = [0x1BAD_B002, flags, 0 &- (0x1BAD_B002 &+ flags), 0x20_0040, 0x20_0000, 0x20_2000, 0x20_4000, 0x20_0100]
        for (i, v) in fields.enumerated() { file.replaceSubrange(0x40 + 4 * i ..< 0x44 + 4 * i, with: withUnsafeBytes(of: v.littleEndian, Array.init)) }
        let k = try KernelImage(bytes: file, path: "flat.bin")
        #expect(try k.resolve(.auto) == .multiboot)
        let boot = try KernelBootPlan(k, files: .init(), memorySize: 64 << 20)
        #expect(boot.entry == 0x20_0100)
        #expect(boot.segments == [0x20_0000 ..< 0x20_4000])
        #expect(boot.segmentFileSizes == [0x2000])

        var unknown = file
        let bad: UInt32 = 1 << 5
        for (i, v) in [0x1BAD_B002, bad, 0 &- (0x1BAD_B002 &+ bad)].enumerated() {
            unknown.replaceSubrange(0x40 + 4 * i ..< 0x44 + 4 * i, with: withUnsafeBytes(of: UInt32(v).littleEndian, Array.init))
        }
        let u = try KernelImage(bytes: unknown, path: "flat.bin")
        #expect(throws: MachineError.unbootable(path: "flat.bin", protocol: .multiboot, reason: "its header requires features flowtrace does not know (flags 0x20)")) {
            _ = try KernelBootPlan(u, files: .init(), memorySize: 64 << 20)
        }
    }

    /// RAM in the map is what --memory gives, less what flowtrace keeps below 1 MiB; nothing
    /// lies in the PCI hole; entries are sorted and disjoint.
    @Test("the memory map accounts for all of RAM", arguments: [UInt64(64 << 20), 3 << 30, 6 << 30, 16 << 30])
    func memoryMap(_ ram: UInt64) {
        let map = MemoryMap(ramSize: ram)
        let usable = map.entries.filter { $0.kind == .ram }.reduce(0) { $0 + $1.size }
        // Below 1 MiB only 0x30000..0x9FC00 is RAM for the guest.
        #expect(usable == ram - (1 << 20) + (0x9FC00 - 0x30000))
        for (a, b) in zip(map.entries, map.entries.dropFirst()) { #expect(a.end <= b.base) }
        #expect(!map.entries.contains { $0.base < 4 << 30 && $0.end > 3 << 30 })
        #expect(map.e820Bytes.count == 20 * map.entries.count)
    }

    /// A Multiboot kernel linked at 0x8000 (where real-mode test payloads load; QEMU's
    /// loader takes them): flowtrace's GDT, boot information and stack move above 1 MiB, out
    /// of its way; the map then gives low RAM from 0x1000 (the kernel's own range in it) and
    /// reserves the moved area; a module follows the area.
    @Test func aMultibootKernelBelow1MiBGetsTheRoomItNeeds() throws {
        let image = try KernelImage(path: try Guests.kernelPath("multiboot-low.elf"))
        let plan = try KernelBootPlan(image, files: .init(commandLine: "x", initrd: try Guests.path("fib")), memorySize: 64 << 20)
        #expect(plan.bootArea == .after(1 << 20))
        #expect(plan.bootArea.range == 0x100000 ..< 0x121000)
        let kernel = try #require(plan.segments.map(\.lowerBound).min()) ..< (try #require(plan.segments.map(\.upperBound).max()))
        #expect(kernel.lowerBound == 0x8000)
        // Nothing of flowtrace's lands on the kernel: the MBI, command line and GDT are in the area.
        for a in [plan.bootInformation, plan.commandLine] { #expect(plan.bootArea.bootInfo.contains(a)) }
        #expect(plan.bytes(at: plan.bootArea.gdt + 8, count: 8) == [0xFF, 0xFF, 0, 0, 0, 0x9A, 0xCF, 0])
        #expect(plan.modules.allSatisfy { $0.lowerBound >= plan.bootArea.range.upperBound })
        let ram = plan.memoryMap.entries.filter { $0.kind == .ram }
        #expect(ram.contains { $0.base <= kernel.lowerBound && kernel.upperBound <= $0.end })
        #expect(plan.memoryMap.entries.contains { $0.kind == .reserved && $0.base == 0x100000 && $0.size == 0x21000 })
        for (a, b) in zip(plan.memoryMap.entries, plan.memoryMap.entries.dropFirst()) { #expect(a.end <= b.base) }
        // The standard kernel keeps the standard area.
        #expect(try KernelBootPlan(try KernelImage(path: try Guests.kernelPath("multiboot.elf")), files: .init(), memorySize: 64 << 20).bootArea == .standard)
    }

    /// The MP table's checksums, its CPU entries (one per vCPU, the BSP flagged once), and
    /// the floating pointer's address of the table, parsed here per the MP specification.
    @Test("MP table", arguments: [1, 2, 8])
    func mpTable(_ n: Int) throws {
        let path = try Guests.kernelPath("multiboot.elf")
        let boot = try KernelBootPlan(try KernelImage(path: path), files: .init(), memorySize: 64 << 20, vcpus: n)
        let pointer = try #require(boot.bytes(at: 0x9FC00, count: 16))
        #expect(Array(pointer[0..<4]) == Array("_MP_".utf8))
        #expect(pointer.reduce(0, &+) == 0)
        let tableAddress = UInt64(le32(pointer, 4))
        let header = try #require(boot.bytes(at: tableAddress, count: 44))
        let length = Int(header[4]) | Int(header[5]) << 8
        let table = try #require(boot.bytes(at: tableAddress, count: length))
        #expect(Array(table[0..<4]) == Array("PCMP".utf8))
        #expect(table.reduce(0, &+) == 0)
        var at = 44
        var cpus: [(id: UInt8, flags: UInt8)] = []
        while at < length {
            switch table[at] {
            case 0: cpus.append((table[at + 1], table[at + 3])); at += 20
            default: at += 8
            }
        }
        #expect(cpus.map(\.id) == (0..<n).map { UInt8($0) })
        #expect(cpus.map { $0.flags & 2 != 0 } == [true] + Array(repeating: false, count: n - 1))
    }

    /// The exact string a Multiboot 1 kernel gets: its path, then --append's text (none
    /// when --append is empty or absent), NUL-terminated, at the MBI's cmdline address.
    @Test(arguments: ["", "x", "console=ttyS0 flowtrace.test=1 --  a"])
    func multibootCommandLinesStartWithTheKernelsPath(_ append: String) throws {
        let path = try Guests.kernelPath("multiboot.elf")
        let image = try KernelImage(path: path)
        let plan = try KernelBootPlan(image, files: .init(commandLine: append), memorySize: 64 << 20)
        let expected = append.isEmpty ? path : path + " " + append
        #expect(plan.bytes(at: plan.commandLine, count: expected.utf8.count + 1) == Array(expected.utf8) + [0])
    }

    @Test func commandLineAndInitrdLimits() throws {
        let bz = try KernelImage(path: try Guests.kernelPath("linux.bzimage"))
        let long = String(repeating: "x", count: 3000)
        #expect(throws: MachineError.bootFile("--append: 3000 bytes; this kernel takes at most 2047")) {
            _ = try KernelBootPlan(bz, files: .init(commandLine: long), memorySize: 64 << 20)
        }
        #expect(throws: MachineError.bootFile("--initrd /nonexistent.img: no such file (or not a regular file)")) {
            _ = try KernelBootPlan(bz, files: .init(initrd: "/nonexistent.img"), memorySize: 64 << 20)
        }
        #expect(throws: MachineError.bootFile("--module: the Linux protocol takes one initrd (--initrd), not modules")) {
            _ = try KernelBootPlan(bz, files: .init(modules: [BootModule(path: "/etc/hostname")]), memorySize: 64 << 20)
        }
        #expect(BootModule(option: "/boot/m.bin,a=1,b") == BootModule(path: "/boot/m.bin", arguments: "a=1,b"))
        // The zero page: the command line and initrd where the plan says, the e820 count.
        let plan = try KernelBootPlan(bz, files: .init(commandLine: "quiet", initrd: try Guests.kernelPath("pvh.elf")), memorySize: 64 << 20)
        let zp = try #require(plan.bytes(at: plan.bootInformation, count: 4096))
        #expect(le32(zp, 0x228) == UInt32(plan.commandLine))
        #expect(plan.bytes(at: plan.commandLine, count: 6) == Array("quiet\0".utf8))
        let initrd = try #require(plan.modules.first)
        #expect(le32(zp, 0x218) == UInt32(initrd.lowerBound))
        #expect(le32(zp, 0x21C) == UInt32(try fileBytes(try Guests.kernelPath("pvh.elf")).count))
        #expect(zp[0x210] == 0xFF)
        #expect(Int(zp[0x1E8]) == MemoryMap(ramSize: 64 << 20).entries.count)
        #expect(plan.entry == 0x100200)
    }
}

/// What each test kernel reports on COM1 after booting, against what the test passed.
struct KernelReport {
    var lines: [String]
    var commandLine: String? { lines.first { $0.hasPrefix("cmdline: ") }.map { String($0.dropFirst(9)) } }
    var modules: [(start: UInt64, size: Int, fnv: UInt32, commandLine: String)] {
        lines.filter { $0.hasPrefix("module: ") }.compactMap { l in
            let f = l.split(separator: " ", maxSplits: 6, omittingEmptySubsequences: false)
            guard f.count >= 6, let start = UInt64(f[1].dropFirst(2), radix: 16), let size = Int(f[2]),
                  let h = UInt32(f[4].dropFirst(2), radix: 16) else { return nil }
            return (start, size, h, f.count > 6 ? String(f[6]) : "")
        }
    }
    var map: [MemoryMap.Entry] {
        lines.filter { $0.hasPrefix("map: ") }.compactMap { l in
            let f = l.split(separator: " ")
            guard f.count == 4, let b = UInt64(f[1].dropFirst(2), radix: 16), let s = UInt64(f[2].dropFirst(2), radix: 16),
                  let t = UInt32(f[3]), let k = MemoryMap.Kind(rawValue: t) else { return nil }
            return MemoryMap.Entry(base: b, size: s, kind: k)
        }
    }
}

@Suite("boot protocols: the test kernels boot", .serialized, .enabled(if: kvmUsable, kvmSkipReason), .timeLimit(.minutes(5)))
struct KernelBootTests {
    static let cases: [(file: String, proto: BootProtocol, magic: String)] = [
        ("multiboot.elf", .multiboot, "magic: 0x2badb002"), ("multiboot2.elf", .multiboot2, "magic: 0x36d76289"),
        ("pvh.elf", .pvh, "magic: 0x336ec578"), ("linux.bzimage", .linux, "header: 0x53726448"), ("vmlinux.elf", .linux, "header: 0x53726448"),
    ]

    /// Two module files with known bytes (the initrd first).
    func moduleFiles() throws -> (initrd: String, module: String, bytes: [[UInt8]]) {
        var rng = SplitMix64(state: 14)
        let a = (0..<5000).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
        let b = Array("second module\n".utf8)
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("flowtrace-boot-\(getpid())")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        let pa = dir.appendingPathComponent("initrd.img"), pb = dir.appendingPathComponent("mod.bin")
        try Data(a).write(to: pa)
        try Data(b).write(to: pb)
        return (pa.path, pb.path, [a, b])
    }

    /// The kernel linked at 0x8000 boots and reports what it got: the magic, its command line,
    /// the module after flowtrace's moved area, low RAM from 0x1000 in its map.
    @Test func theMultibootKernelBelow1MiBBoots() throws {
        let files = try moduleFiles()
        let path = try Guests.kernelPath("multiboot-low.elf")
        let m = try Machine(path: path, configuration: .init(memorySize: 64 << 20, files: BootFiles(commandLine: "low=1", initrd: files.initrd)))
        #expect(m.movedBootArea?.range == 0x100000 ..< 0x121000)
        let r = try m.run(timeout: .seconds(60))
        #expect(r.ending == .exited(status: 0x4B), "\(r.console.map(\.text))")
        let report = KernelReport(lines: r.console.filter { $0.source == .serial }.map(\.text))
        #expect(report.lines.contains("magic: 0x2badb002"))
        #expect(report.lines.last == "kernel: done")
        #expect(report.commandLine == "\(path) low=1")
        #expect(report.modules.map(\.start) == [0x121000])
        #expect(report.modules.map(\.fnv) == [fnv1a(files.bytes[0])])
        #expect(report.map.contains { $0.kind == .ram && $0.base == 0x1000 && $0.end == 0x9FC00 })
        #expect(report.map.contains { $0.kind == .reserved && $0.base == 0x100000 && $0.size == 0x21000 })
    }

    @Test("each protocol hands the kernel its magic, command line, modules and memory map", arguments: 0 ..< cases.count)
    func boots(_ index: Int) throws {
        let c = Self.cases[index]
        let files = try moduleFiles()
        let isLinux = c.proto == .linux
        let memory: UInt64 = 6 << 30
        let cmdline = "console=ttyS0 flowtrace.test=\(c.file)"
        let bootFiles = BootFiles(commandLine: cmdline, initrd: files.initrd,
                                  modules: isLinux ? [] : [BootModule(path: files.module, arguments: "x=1 y")])
        let m = try Machine(path: try Guests.kernelPath(c.file), configuration: .init(memorySize: memory, files: bootFiles))
        #expect(m.bootProtocol == c.proto)
        #expect(m.platform == .pc)
        let r = try m.run(timeout: .seconds(60))
        #expect(r.ending == .exited(status: 0x4B), "\(r.console.map(\.text))")
        let report = KernelReport(lines: r.console.filter { $0.source == .serial }.map(\.text))
        #expect(report.lines.contains(c.magic))
        #expect(report.lines.last == "kernel: done")
        // Multiboot 1: the kernel's path first, as GRUB and QEMU's -kernel pass it.
        #expect(report.commandLine == (c.proto == .multiboot ? "\(try Guests.kernelPath(c.file)) \(cmdline)" : cmdline))
        let mods = report.modules
        #expect(mods.map(\.size) == (isLinux ? [files.bytes[0].count] : files.bytes.map(\.count)))
        #expect(mods.map(\.fnv) == (isLinux ? [fnv1a(files.bytes[0])] : files.bytes.map(fnv1a)))
        if !isLinux { #expect(mods.map(\.commandLine) == [files.initrd, files.module + " x=1 y"]) }
        // Modules lie in RAM the map reports, page-aligned, apart from each other.
        let map = report.map
        for mod in mods {
            #expect(mod.start % 4096 == 0)
            #expect(map.contains { $0.kind == .ram && $0.base <= mod.start && mod.start + UInt64(mod.size) <= $0.end })
        }
        // The map the kernel read is all of RAM (6G: 3G below the hole, 3G from 4G on).
        let usable = map.filter { $0.kind == .ram }.reduce(0) { $0 + $1.size }
        #expect(usable == memory - (1 << 20) + (0x9FC00 - 0x30000))
        #expect(map.contains { $0.kind == .ram && $0.base == 4 << 30 && $0.size == 3 << 30 })
        if c.proto == .multiboot || c.proto == .multiboot2 {
            #expect(report.lines.contains("mem: lower 639 upper \((3 << 20) - 1024)"))
            #expect(report.lines.contains("loader: flowtrace"))
        }
    }

    /// Probes on the kernels' own functions hit once per item the kernel reports, with the
    /// values it reports (32-bit entry, paging off when armed; 64-bit when hit).
    @Test("probes by symbol on the test kernels hit exactly", arguments: 0 ..< cases.count)
    func probes(_ index: Int) throws {
        let c = Self.cases[index]
        let files = try moduleFiles()
        let isLinux = c.proto == .linux
        let bootFiles = BootFiles(initrd: files.initrd, modules: isLinux ? [] : [BootModule(path: files.module)])
        let m = try Machine(path: try Guests.kernelPath(c.file), configuration: .init(files: bootFiles))
        // A bzImage has no symbols: they come from the ELF it was made from.
        let symbols = c.file == "linux.bzimage" ? Symbolizer(image: try ELFImage(path: try Guests.kernelPath("linux.bzimage.elf"))) : m.symbolizer
        let moduleAddress = try #require(symbols.address(of: "report_module"))
        let module = try TraceModule(target: m)
        try module.addProbe(Probe("module", entries: [reg("rdi"), reg("rsi")]), at: moduleAddress)
        try module.addProbe(Probe("map", entries: [reg("rdi"), reg("rsi")]), at: try #require(symbols.address(of: "report_map_entry")))
        try module.enable()
        let r = try m.run(timeout: .seconds(60))
        #expect(r.ending == .exited(status: 0x4B))
        let report = KernelReport(lines: r.console.filter { $0.source == .serial }.map(\.text))
        let records = module.report()
        let moduleHits = records.filter { $0.address == moduleAddress }.map { (u64($0.values[0]) ?? 0, u64($0.values[1]) ?? 0) }
        let mapHits = records.filter { $0.address != moduleAddress }.map { (u64($0.values[0]) ?? 0, u64($0.values[1]) ?? 0) }
        #expect(moduleHits.map(\.0) == report.modules.map(\.start))
        #expect(moduleHits.map { $0.1 - $0.0 } == report.modules.map { UInt64($0.size) })
        #expect(mapHits.map(\.0) == report.map.map(\.base))
        #expect(mapHits.map(\.1) == report.map.map(\.size))
        #expect(!mapHits.isEmpty)
    }

    /// On the pc platform a vCPU's own `cli; hlt` never exits KVM: when every vCPU is there
    /// the run ends as `.allHalted` (within the census period), not at the timeout. The
    /// payload's application processors start at the entry (runnable), all of them run.
    @Test("every vCPU halted with interrupts off ends the run", arguments: [1, 2])
    func allHaltedEndsTheRun(_ vcpus: Int) throws {
        let m = try Machine(path: try Guests.path("smp"), configuration: .init(vcpuCount: vcpus, platform: .platform(.pc)))
        let r = try m.run(timeout: .seconds(60))
        #expect(r.ending == .allHalted)
        #expect(r.console.map(\.text).contains("total: \((1...vcpus).reduce(0) { $0 + 100 * $1 }) units on \(vcpus) vcpus"))
        #expect(r.elapsed < .seconds(30))
    }

    /// A kernel booted on 2 vCPUs: vCPU 0 enters it, vCPU 1 waits for a start-up IPI (the
    /// test kernels send none) without keeping the run from its end.
    @Test func applicationProcessorsWaitForTheKernel() throws {
        let m = try Machine(path: try Guests.kernelPath("multiboot.elf"), configuration: .init(vcpuCount: 2))
        #expect(try m.vcpus[1].mpState() == 1)   // KVM_MP_STATE_UNINITIALIZED
        #expect(try m.vcpus[0].mpState() == 0)   // RUNNABLE
        let r = try m.run(timeout: .seconds(60))
        #expect(r.ending == .exited(status: 0x4B))
    }

    /// flowtrace's page walk against KVM's own (KVM_TRANSLATE): a payload on the loader's
    /// 4-level tables, and a kernel at its 32-bit entry (paging off).
    @Test func pageWalkAgreesWithKVMTranslate() throws {
        let fib = try Machine(path: try Guests.path("fib"))
        let mode = try fib.vcpus[0].specialRegisters().paging
        #expect(mode == .level4(cr3: fib.layout.cr3))
        var compared = 0
        for s in fib.image.symbols where s.kind == .function {
            let kvm = try fib.vcpus[0].translate(linear: s.address)
            #expect(kvm == (try fib.memory.translate(virtual: s.address, paging: mode).physical))
            compared += 1
        }
        #expect(compared > 0)
        #expect(try fib.vcpus[0].translate(linear: 0x7FFF_0000_0000) == nil)   // beyond the identity map
        let mb = try Machine(path: try Guests.kernelPath("multiboot.elf"))
        #expect(try mb.vcpus[0].specialRegisters().paging == .off)
        for a: UInt64 in [0x10_0000, 0x12_3456, 0xBFFF_F000] {
            #expect(try mb.vcpus[0].translate(linear: a) == (try mb.memory.translate(virtual: a, paging: .off).physical))
        }
    }

    @Test func censusStates() {
        #expect(HaltCensus.state(mpState: 3, rflags: 0x2) == .haltedInterruptsOff)
        #expect(HaltCensus.state(mpState: 3, rflags: 0x202) == .running)
        #expect(HaltCensus.state(mpState: 1, rflags: 0x2) == .waitingForStart)
        #expect(HaltCensus.state(mpState: 0, rflags: 0x2) == .running)
    }

    @Test func kernelsNeedThePCPlatform() throws {
        #expect(throws: MachineError.unbootable(path: try Guests.kernelPath("pvh.elf"), protocol: .pvh,
                                                reason: "kernels need the pc platform (interrupt controller, timer); drop --platform payload")) {
            _ = try Machine(path: try Guests.kernelPath("pvh.elf"), configuration: .init(platform: .platform(.payload)))
        }
    }
}
