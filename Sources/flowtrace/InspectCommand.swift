import ArgumentParser
import ELF
import Machine

struct InspectCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "inspect",
        abstract: "Show a guest's kind and boot protocol, entry point, loadable segments and symbols."
    )

    @Argument(help: "A payload (static x86-64 ELF) or a kernel (Linux bzImage or vmlinux, PVH, Multiboot 1 or 2).")
    var guest: String

    func run() throws {
        let kernel: KernelImage
        let bootProtocol: BootProtocol
        do {
            kernel = try KernelImage(path: guest)
            bootProtocol = try kernel.resolve(.auto)
        } catch { throw fail(error.description, status: ExitStatus.usage) }
        guard let image = kernel.elf else {
            // A bzImage: its header, no ELF view.
            printOut("\(guest): \(kernel.kind); boots with the \(bootProtocol) protocol")
            if let h = kernel.linux {
                printOut("setup: \(h.setupSectors) sectors; protected-mode code at file offset \(hex(UInt64(h.kernelOffset))), loaded at 0x100000, 64-bit entry 0x100200; init_size \(hex(UInt64(h.initSize)))")
            }
            return
        }
        let sym = Symbolizer(image: image)
        if bootProtocol == .payload {
            printOut("\(guest): ELF64 x86-64 executable, entry \(hex(image.entry)) (\(sym.describe(image.entry)))")
        } else {
            printOut("\(guest): \(kernel.kind); boots with the \(bootProtocol) protocol; e_entry \(hex(image.entry)) (\(sym.describe(image.entry)))")
        }
        printOut("segments:")
        var rows = [["#", "address", "memsize", "filesize", "flags"] + (bootProtocol == .payload ? [] : ["physical"])]
        for (i, s) in image.segments.enumerated() {
            let flags = (s.isReadable ? "r" : "-") + (s.isWritable ? "w" : "-") + (s.isExecutable ? "x" : "-")
            rows.append(["\(i)", hex(s.virtualAddress), hex(s.memorySize), hex(s.fileSize), flags] + (bootProtocol == .payload ? [] : [hex(s.physicalAddress)]))
        }
        printOut(table(rows))
        printOut("symbols:")
        rows = [["address", "size", "kind", "name"]]
        for s in image.symbols {
            rows.append([hex(s.address), "\(s.size)", s.kind.rawValue, s.name])
        }
        printOut(table(rows))
    }
}
