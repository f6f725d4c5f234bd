import ArgumentParser
import ELF
import FlowGraph
import Foundation
import Machine
import TraceSpec

enum GraphFormat: String, ExpressibleByArgument, CaseIterable {
    case text, dot, json
}

struct GraphCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "graph",
        abstract: "Show the control-flow graph of a function in an ELF guest or a Linux kernel.",
        discussion: """
        Decodes the function (x86-64, Intel syntax) from the ELF file, without running it, and \
        prints its basic blocks: addresses, instructions, how each block ends (exit, jump, \
        conditional, indirect, fall-through, call, incomplete) and its edges. Jump tables of \
        switch statements are resolved into their cases. Jumps out of the function (tail \
        calls) are edges to targets outside the graph.
        --format dot writes Graphviz DOT (render it with: dot -Tsvg graph.dot -o graph.svg); \
        --format json one JSON object (blocks, instructions, edges, jump tables) for scripts.
        --heat TRACE colours the blocks by how often they ran, from the records of \
        `flowtrace run --flow FUNCTION --format jsonl -o TRACE` (or csv): a block's count is \
        the largest record count at an address inside it.
        A Linux kernel (a bzImage or a vmlinux) is read as `flowtrace inspect` reads it: the \
        code from its vmlinux (a bzImage's decompressed payload), as linked, before the \
        kernel's own boot-time patching; the symbols from its .symtab, --symbol-file, or its \
        own kallsyms tables.
        """
    )

    /// The guest and its symbol file (the image options run and inspect take too).
    @OptionGroup var imageOptions: ImageOptions
    var guest: String { imageOptions.guest }
    var symbolFile: String? { imageOptions.symbolFile }

    @Argument(help: "The function: a symbol, or an address (0x...) inside one.")
    var function: String

    @Option(help: "Output format: text, dot or json.")
    var format: GraphFormat = .text

    @Option(help: ArgumentHelp("Colour blocks by hit count from these records (jsonl or csv of flowtrace run).", valueName: "trace"))
    var heat: String?

    @Flag(name: .customLong("split-calls"), help: "End a block at every call.")
    var splitCalls = false

    @Option(name: .short, help: ArgumentHelp("Write the graph to this file instead of stdout.", valueName: "file"))
    var output: String?

    func run() throws {
        for o in imageOptions.bootFileOptions + (imageOptions.boot != .auto ? ["--boot"] : []) {
            printError("flowtrace: \(o) not used: graph reads the image's code, it boots nothing")
        }
        let image: ELFImage
        do {
            let kernel = try KernelImage(path: guest)
            if kernel.isLinux, let view = try kernel.linuxView(symbolFile: symbolFile), let code = view.image {
                image = code
                if let symbolFile, view.symbols.source == .symtab {
                    printError("flowtrace: --symbol-file \(symbolFile) not used: \(guest) has its own .symtab")
                }
            } else if let elf = kernel.elf {
                if let symbolFile { printError("flowtrace: --symbol-file \(symbolFile) not used: \(guest) is not a Linux kernel") }
                image = elf
            } else {
                // Neither a kernel nor an ELF file: ELFImage says why in its words.
                image = try ELFImage(path: guest)
            }
        } catch let error as MachineError {
            throw fail(error.description, status: ExitStatus.usage)
        } catch let error as ELFError {
            throw fail(error.description, status: ExitStatus.usage)
        }
        let graph = try buildGraph(function, in: image, splitAtCalls: splitCalls, option: nil)
        var hits: [Int: UInt64]?
        if let heat {
            let counts: [UInt64: UInt64]
            do { counts = try readAddressCounts(path: heat) } catch { throw fail("--heat \(error.message)", status: ExitStatus.usage) }
            hits = graph.blockHits(fromAddressCounts: counts)
            if hits?.isEmpty == true {
                let records = counts.values.reduce(0, +)
                printError("flowtrace: warning: --heat \(heat): none of its \(records) records is at an address of \(graph.name); every block shows 0 (trace it with: flowtrace run \(guest) --flow \(function))")
            }
        }
        let symbols = Symbolizer(image: image)
        let describe: (UInt64) -> String? = { a in symbols.locate(a) == nil ? nil : symbols.describe(a) }
        let text = switch format {
        case .text: graph.text(describe: describe, hits: hits)
        case .dot: graph.dot(describe: describe, hits: hits)
        case .json: graph.json(describe: describe, hits: hits)
        }
        let sink: ByteSink
        if let output {
            do throws(SystemError) { sink = try ByteSink(replacing: output) } catch { throw fail("-o \(error.message)", status: ExitStatus.usage) }
        } else {
            sink = ByteSink(fd: STDOUT_FILENO)
        }
        sink.write(text)
        do throws(SystemError) { try sink.commit() } catch {
            throw fail("writing the graph to \(output ?? "stdout"): \(error.message)", status: ExitStatus.ioError)
        }
    }
}

/// The graph of `function` (a symbol, or an address inside one), or a one-line error.
/// `option` names the command-line option it came from, for the message.
func buildGraph(_ function: String, in image: ELFImage, splitAtCalls: Bool, option: String?) throws(ExitCode) -> FlowGraph {
    let prefix = option.map { "\($0) '\(function)': " } ?? ""
    do {
        if let address = parseNumber(function), function.first?.isNumber == true {
            return try FlowGraph.build(address: address, in: image, options: FlowGraphOptions(splitAtCalls: splitAtCalls))
        }
        return try FlowGraph.build(function: function, in: image, options: FlowGraphOptions(splitAtCalls: splitAtCalls))
    } catch {
        throw fail(prefix + error.description, status: ExitStatus.usage)
    }
}

struct HeatError: Error { let message: String }

/// Record counts by address from a jsonl or csv report of `flowtrace run`.
func readAddressCounts(path: String) throws(HeatError) -> [UInt64: UInt64] {
    guard let data = FileManager.default.contents(atPath: path) else {
        throw HeatError(message: "\(path): cannot read the file (\(FileManager.default.fileExists(atPath: path) ? "permission denied" : "no such file"))")
    }
    guard let text = String(data: data, encoding: .utf8) else { throw HeatError(message: "\(path): not UTF-8 text") }
    var counts: [UInt64: UInt64] = [:]
    var lines = text.split(separator: "\n", omittingEmptySubsequences: false).map { $0.hasSuffix("\r") ? $0.dropLast() : $0 }
    while lines.last?.isEmpty == true { lines.removeLast() }
    guard let first = lines.first else { throw HeatError(message: "\(path): empty; expected the records of flowtrace run --format jsonl (or csv)") }
    if first.hasPrefix("{") {
        for (n, line) in lines.enumerated() where !line.isEmpty {
            guard let object = try? JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any] else {
                throw HeatError(message: "\(path) line \(n + 1): not a JSON object (expected one record per line, as --format jsonl writes)")
            }
            guard let a = object["addr"] as? String, let address = parseNumber(a) else {
                throw HeatError(message: "\(path) line \(n + 1): no \"addr\" field with a hex address")
            }
            counts[address, default: 0] += 1
        }
    } else {
        let header = first.split(separator: ",", omittingEmptySubsequences: false)
        guard let column = header.firstIndex(of: "addr") else {
            throw HeatError(message: "\(path): neither jsonl (a JSON object per line) nor csv with an 'addr' column; write it with flowtrace run --format jsonl")
        }
        for (n, line) in lines.enumerated().dropFirst() where !line.isEmpty {
            let fields = line.split(separator: ",", maxSplits: column + 1, omittingEmptySubsequences: false)
            guard fields.count > column, let address = parseNumber(fields[column]) else {
                throw HeatError(message: "\(path) line \(n + 1): no address in the 'addr' column")
            }
            counts[address, default: 0] += 1
        }
    }
    return counts
}
