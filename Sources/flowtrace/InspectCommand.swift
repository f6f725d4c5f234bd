import ArgumentParser
import ELF
import Glibc
import LinuxKernel
import Machine

struct InspectCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "inspect",
        abstract: "Show a guest's kind and boot protocol, entry point, loadable segments and symbols.",
        discussion: """
        For a Linux kernel (bzImage or vmlinux): its version string, the boot protocol, its \
        payload's compression, and how many symbols it has and where they came from (the \
        image's .symtab, --symbol-file, or the kallsyms tables inside the kernel); \
        --symbols PATTERN lists the matching ones as /proc/kallsyms does.
        """
    )

    /// The guest, how it boots and its symbol file (the image options run and graph take too).
    @OptionGroup var imageOptions: ImageOptions
    var guest: String { imageOptions.guest }
    var symbolFile: String? { imageOptions.symbolFile }

    @Option(name: .customLong("symbols"), help: ArgumentHelp("List the symbols whose names match: a glob (do_*, *initcall*), or text a name contains.", valueName: "pattern"))
    var pattern: String?


    func run() throws {
        for o in imageOptions.bootFileOptions {
            printError("flowtrace: \(o) not used: inspect shows the image; run boots it with the files and command line")
        }
        let kernel: KernelImage
        let bootProtocol: BootProtocol
        do {
            kernel = try KernelImage(path: guest)
            bootProtocol = try kernel.resolve(imageOptions.boot.request)
        } catch { throw fail(error.description, status: ExitStatus.usage) }
        var view: LinuxKernelView?
        if kernel.isLinux || symbolFile != nil {
            do { view = try kernel.linuxView(symbolFile: symbolFile) } catch { throw fail(error.description, status: ExitStatus.usage) }
            if let symbolFile, view?.symbols.source == .symtab {
                printError("flowtrace: --symbol-file \(symbolFile) not used: \(guest) has its own .symtab")
            }
        }
        if let pattern {
            try list(pattern, view: view, image: kernel.elf)
            return
        }
        guard let image = kernel.elf else {
            // A bzImage: its header, its payload, no ELF view of the file itself.
            printOut("\(guest): \(kernel.kind); boots with the \(bootProtocol) protocol")
            if let v = view?.version { printOut("version: \(v)") }
            if let h = kernel.linux {
                printOut("setup: \(h.setupSectors) sectors; protected-mode code at file offset \(hex(UInt64(h.kernelOffset))), loaded at 0x100000, 64-bit entry 0x100200; init_size \(hex(UInt64(h.initSize)))")
                if let v = view, let c = v.compression, let e = v.vmlinux {
                    let size = e.segments.map { $0.fileSize }.reduce(0, +)
                    printOut("payload: \(c), \(h.payloadLength) bytes at \(hex(UInt64(h.kernelOffset) + UInt64(h.payloadOffset))); decompressed an ELF64 vmlinux, entry \(hex(e.entry)), \(e.segments.count) segments, \(size) bytes")
                }
            }
            if let v = view { printOut(symbolLine(v)) }
            return
        }
        let sym = Symbolizer(image: view?.image ?? image)
        if bootProtocol == .payload {
            printOut("\(guest): ELF64 x86-64 executable, entry \(hex(image.entry)) (\(sym.describe(image.entry)))")
        } else {
            printOut("\(guest): \(kernel.kind); boots with the \(bootProtocol) protocol; e_entry \(hex(image.entry)) (\(sym.describe(image.entry)))")
        }
        if let v = view?.version { printOut("version: \(v)") }
        printOut("segments:")
        var rows = [["#", "address", "memsize", "filesize", "flags"] + (bootProtocol == .payload ? [] : ["physical"])]
        for (i, s) in image.segments.enumerated() {
            let flags = (s.isReadable ? "r" : "-") + (s.isWritable ? "w" : "-") + (s.isExecutable ? "x" : "-")
            rows.append(["\(i)", hex(s.virtualAddress), hex(s.memorySize), hex(s.fileSize), flags] + (bootProtocol == .payload ? [] : [hex(s.physicalAddress)]))
        }
        printOut(table(rows))
        if let v = view {
            // A kernel has tens of thousands: the count, and --symbols PATTERN to list them.
            printOut(symbolLine(v))
            return
        }
        printOut("symbols:")
        rows = [["address", "size", "kind", "name"]]
        for s in image.symbols {
            rows.append([hex(s.address), "\(s.size)", s.kind.rawValue, s.name])
        }
        printOut(table(rows))
    }

    func symbolLine(_ v: LinuxKernelView) -> String {
        let functions = v.symbols.symbols.filter { "Tt".contains($0.type) }.count
        return "symbols: \(v.symbols.symbols.count) (\(functions) functions) from \(v.symbols.source); list them with --symbols PATTERN"
    }

    func list(_ pattern: String, view: LinuxKernelView?, image: ELFImage?) throws {
        let isGlob = pattern.contains { "*?[".contains($0) }
        func matches(_ name: String) -> Bool { isGlob ? fnmatch(pattern, name, 0) == 0 : name.contains(pattern) }
        var lines: [String] = []
        if let v = view {
            for s in v.symbols.symbols where matches(s.name) {
                lines.append(String(repeating: "0", count: max(0, 16 - String(s.address, radix: 16).count)) + String(s.address, radix: 16) + " \(s.type) \(s.name)")
            }
        } else if let image {
            for s in image.symbols where matches(s.name) {
                lines.append(String(repeating: "0", count: max(0, 16 - String(s.address, radix: 16).count)) + String(s.address, radix: 16) + " \(s.kind == .function ? "T" : s.kind == .object ? "D" : "t") \(s.name)")
            }
        }
        guard !lines.isEmpty else { throw fail("--symbols \(pattern): no symbol of \(guest) matches", status: ExitStatus.usage) }
        for l in lines { printOut(l) }
    }
}
