import ArgumentParser
import ELF

struct InspectCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "inspect",
        abstract: "Show an ELF guest's entry point, loadable segments and symbols."
    )

    @Argument(help: "A static x86-64 ELF executable.")
    var guest: String

    func run() throws {
        let image: ELFImage
        do { image = try ELFImage(path: guest) } catch { throw fail(error.description, status: ExitStatus.usage) }
        let sym = Symbolizer(image: image)
        printOut("\(guest): ELF64 x86-64 executable, entry \(hex(image.entry)) (\(sym.describe(image.entry)))")
        printOut("segments:")
        var rows = [["#", "address", "memsize", "filesize", "flags"]]
        for (i, s) in image.segments.enumerated() {
            let flags = (s.isReadable ? "r" : "-") + (s.isWritable ? "w" : "-") + (s.isExecutable ? "x" : "-")
            rows.append(["\(i)", hex(s.virtualAddress), hex(s.memorySize), hex(s.fileSize), flags])
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
