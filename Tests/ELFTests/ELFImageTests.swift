import ELF
import Foundation
import Testing
import TestSupport

/// `nm` output for `path`: name -> address, for symbols in sections (text, data, bss, rodata).
private func nmSymbols(_ path: String) throws -> [String: UInt64] {
    let r = try run("/usr/bin/env", ["nm", path])
    #expect(r.status == 0, "nm failed: \(r.stderr)")
    var out: [String: UInt64] = [:]
    for line in r.stdout.split(separator: "\n") {
        let f = line.split(separator: " ")
        guard f.count == 3, "TtDdBbRr".contains(f[1]), let a = UInt64(f[0], radix: 16) else { continue }
        out[String(f[2])] = a
    }
    return out
}

/// readelf's view of `path`: the entry point and each PT_LOAD's (offset, vaddr, filesz, flags).
private func readelf(_ path: String) throws -> (entry: UInt64?, loads: [(offset: Int, vaddr: UInt64, fileSize: Int, flags: String)]) {
    let h = try run("/usr/bin/env", ["readelf", "-hlW", path])
    #expect(h.status == 0, "readelf failed: \(h.stderr)")
    var entry: UInt64?
    var loads: [(Int, UInt64, Int, String)] = []
    for line in h.stdout.split(separator: "\n") {
        let f = line.split(separator: " ", omittingEmptySubsequences: true)
        if line.contains("Entry point address:"), let last = f.last { entry = UInt64(last.dropFirst(2), radix: 16) }
        if f.first == "LOAD", f.count >= 7, let off = Int(f[1].dropFirst(2), radix: 16), let va = UInt64(f[2].dropFirst(2), radix: 16),
           let size = Int(f[4].dropFirst(2), radix: 16) {
            loads.append((off, va, size, f[6...].dropLast().joined(separator: " ")))
        }
    }
    return (entry, loads)
}

@Suite("ELF images of the built guests")
struct GuestImageTests {
    static let guests = ["counter", "fib", "smp", "fault", "spin", "status", "array"]

    @Test("entry, segments and symbols agree with nm and readelf", arguments: guests)
    func parsesGuest(_ name: String) throws {
        let path = try Guests.path(name)
        let image = try ELFImage(path: path)
        let nm = try nmSymbols(path)
        let re = try readelf(path)
        #expect(image.entry == nm["_start"])
        #expect(image.entry == re.entry)
        // Every section symbol nm lists is present at the same address, and nothing else.
        let ours = Dictionary(image.symbols.map { ($0.name, $0.address) }, uniquingKeysWith: { a, _ in a })
        #expect(ours == nm)
        let exec = image.segments.filter(\.isExecutable)
        #expect(exec.count == 1)
        #expect(exec[0].range.contains(image.entry))
        // The code bytes are the file's bytes at the offset readelf gives the executable PT_LOAD.
        let load = try #require(re.loads.first { $0.flags.contains("E") })
        #expect(load.vaddr == exec[0].virtualAddress && UInt64(load.fileSize) == exec[0].fileSize)
        let file = try [UInt8](Data(contentsOf: URL(fileURLWithPath: path)))
        #expect(Array(file[load.offset ..< load.offset + load.fileSize]) == exec[0].data)
    }

    @Test("function sizes and kinds come from .symtab")
    func functionSizes() throws {
        let image = try ELFImage(path: Guests.path("fib"))
        let fib = try #require(image.symbol(named: "fib"))
        #expect(fib.kind == .function)
        #expect(fib.size > 0)
        let calls = try #require(image.symbol(named: "fib_calls"))
        #expect(calls.kind == .object)
        #expect(calls.size == 8)
        // The bss segment has no file bytes but 8 bytes in memory for fib_calls.
        #expect(image.segments.contains { $0.fileSize == 0 && $0.memorySize >= 8 && $0.range.contains(calls.address) })
        let label = try #require(ELFImage(path: Guests.path("fault")).symbol(named: "fault_here"))
        #expect(label.kind == .label)
    }

    @Test("symbolizer maps names to addresses and back")
    func symbolizer() throws {
        let image = try ELFImage(path: Guests.path("fib"))
        let s = Symbolizer(image: image)
        let fib = try #require(s.address(of: "fib"))
        #expect(s.describe(fib) == "fib")
        #expect(s.describe(fib + 0x1a) == "fib+0x1a")
        #expect(s.describe(0x5000) == "0x5000")
        #expect(s.suggestions(for: "fibb").first == "fib")
        #expect(s.suggestions(for: "guest_mian").contains("guest_main"))
    }
}

@Suite("malformed ELF input gives one precise error")
struct MalformedELFTests {
    func fibBytes() throws -> [UInt8] { try [UInt8](Data(contentsOf: URL(fileURLWithPath: Guests.path("fib")))) }

    func expectError(_ bytes: [UInt8], _ expected: (String) -> ELFError, contains text: String) throws {
        let path = try temporaryFile(bytes, name: "bad-\(UUID().uuidString).elf")
        do {
            _ = try ELFImage(path: path)
            Issue.record("expected \(expected(path))")
        } catch {
            #expect(error == expected(path))
            #expect(error.description.contains(path))
            #expect(error.description.contains(text))
            #expect(!error.description.contains("\n"))
        }
    }

    @Test func missingFileAndDirectory() {
        #expect(throws: ELFError.notAFile(path: "/nonexistent/guest.elf")) { try ELFImage(path: "/nonexistent/guest.elf") }
        #expect(throws: ELFError.notAFile(path: "/tmp")) { try ELFImage(path: "/tmp") }
    }

    @Test func notELF() throws {
        try expectError(Array("#!/bin/sh\necho hello\n".utf8), { .notELF(path: $0) }, contains: "not an ELF file")
        try expectError([], { .notELF(path: $0) }, contains: "not an ELF file")
    }

    @Test func thirtyTwoBitHeaderOnAnX8664File() throws {
        var b = try fibBytes()
        b[4] = 1  // ELFCLASS32: ELF32 files must be i386 (Multiboot kernels)
        try expectError(b, { .wrongMachine(path: $0, machine: 62, is64Bit: false) }, contains: "ELF32 for machine 62 (x86-64), not i386")
    }

    @Test func wrongMachine() throws {
        var b = try fibBytes()
        b.put16(183, at: 18)  // EM_AARCH64
        try expectError(b, { .wrongMachine(path: $0, machine: 183, is64Bit: true) }, contains: "AArch64")
    }

    @Test func sharedObject() throws {
        var b = try fibBytes()
        b.put16(3, at: 16)  // ET_DYN
        try expectError(b, { .notExecutable(path: $0, type: 3) }, contains: "-static -no-pie")
    }

    @Test func truncated() throws {
        let b = try fibBytes()
        try expectError(Array(b[..<40]), { .truncated(path: $0, detail: "40 bytes, shorter than the 64-byte ELF64 header") },
                        contains: "truncated")
        // Header intact, segment bytes cut off.
        let path = try temporaryFile(Array(b[..<0x1010]), name: "cut.elf")
        #expect { try ELFImage(path: path) } throws: { e in
            guard case let .truncated(p, detail) = e as? ELFError else { return false }
            return p == path && detail.contains("file has 4112")
        }
    }

    @Test func noLoadSegments() throws {
        var b = try fibBytes()
        let phoff = Int(b.get64(at: 32)), phentsize = Int(b.get16(at: 54)), phnum = Int(b.get16(at: 56))
        for i in 0..<phnum where b.get32(at: phoff + i * phentsize) == 1 { b.put32(0, at: phoff + i * phentsize) }
        try expectError(b, { .noLoadSegments(path: $0) }, contains: "no PT_LOAD")
    }

    @Test func entryOutsideSegments() throws {
        var b = try fibBytes()
        b.put64(0x900000, at: 24)
        try expectError(b, { .entryOutsideSegments(path: $0, entry: 0x900000) }, contains: "0x900000")
    }
}
