import ELF
import Foundation
import KVM
import Testing
import TestSupport

/// Mutated ELF files through `flowtrace inspect` and `flowtrace run --timeout`: no crash, no
/// hang, a one-line error or a clean run. FLOWTRACE_FUZZ_COUNT files (default 150 here;
/// tools/fuzz runs 10,000), fixed seed FLOWTRACE_FUZZ_SEED (default 12), so a failure replays.
@Suite("ELF fuzzing", .serialized, .timeLimit(.minutes(60)))
struct ELFFuzzTests {
    static let count = Int(ProcessInfo.processInfo.environment["FLOWTRACE_FUZZ_COUNT"] ?? "") ?? 150
    static let seed = UInt64(ProcessInfo.processInfo.environment["FLOWTRACE_FUZZ_SEED"] ?? "") ?? 12

    /// One mutation of `good`: a few bytes changed (mostly in the headers), a field set to an
    /// extreme, or the file cut short.
    static func mutate(_ good: [UInt8], _ rng: inout SplitMix64) -> [UInt8] {
        var b = good
        switch rng.next() % 8 {
        case 0:
            b = Array(b.prefix(Int(rng.next() % UInt64(b.count))))
        case 1:
            // An extreme value in a header word (offsets, sizes, counts, addresses).
            let at = Int(rng.next() % 0x100) & ~7
            let v: UInt64 = [0, .max, 0x8000_0000_0000_0000, 0xFFFF_FFFF, UInt64(b.count), 1][Int(rng.next() % 6)]
            b.put64(v, at: min(at, b.count - 8))
        default:
            for _ in 0..<(1 + rng.next() % 8) {
                let inHeaders = rng.next() % 4 != 0
                let at = Int(rng.next() % UInt64(inHeaders ? min(b.count, 0x200) : b.count))
                b[at] = UInt8(truncatingIfNeeded: rng.next())
            }
        }
        return b
    }

    /// Found by the 10,000-file run (file 7641): a program-header offset near 2^64 overflowed
    /// the end computation and trapped.
    @Test func aProgramHeaderOffsetNear2To64IsAnError() throws {
        var b = try [UInt8](Data(contentsOf: URL(fileURLWithPath: Guests.path("fib"))))
        b.put64(0xFFFF_FFFF_FFFF_FFF0, at: 0x20)  // e_phoff
        let r = try flowtrace("inspect", temporaryFile(b, name: "phoff.elf"))
        expectOneLineError(r, status: 64, "program headers end")
    }

    @Test func mutatedELFFilesEndCleanly() throws {
        let good = try [UInt8](Data(contentsOf: URL(fileURLWithPath: Guests.path("fib"))))
        var rng = SplitMix64(state: Self.seed)
        let kvm = KVMHost.isUsable()
        var outcomes: [String: Int] = [:]
        for i in 0..<Self.count {
            let file = try temporaryFile(Self.mutate(good, &rng), name: "fuzz.elf")
            let inspect = try run("/usr/bin/timeout", ["-s", "KILL", "30", Guests.flowtrace, "inspect", file])
            try Self.check(inspect, i, "inspect", allowed: [0, 64])
            guard inspect.status == 0, kvm else { outcomes["inspect \(inspect.status)", default: 0] += 1; continue }
            let r = try run("/usr/bin/timeout", ["-s", "KILL", "60", Guests.flowtrace, "run", file, "--timeout", "2"])
            try Self.check(r, i, "run", allowed: nil)
            outcomes["run \(r.status)", default: 0] += 1
        }
        print("ELF fuzzing: \(Self.count) files (seed \(Self.seed)):", outcomes.sorted { $0.key < $1.key }.map { "\($0.key): \($0.value)" }.joined(separator: ", "))
    }

    /// A bzImage as Linux builds one, small: the protocol test kernel's setup header
    /// (guests/kernels/linux-setup.S) with the test vmlinux compressed by xz as its payload,
    /// `payload_offset`/`payload_length` pointing at it.
    static func bzImageWithPayload() throws -> (image: [UInt8], payloadStart: Int) {
        var b = try [UInt8](Data(contentsOf: URL(fileURLWithPath: Guests.kernelPath("linux.bzimage"))))
        let vmlinux = try [UInt8](Data(contentsOf: URL(fileURLWithPath: Guests.kernelPath("vmlinux.elf"))))
        let payload = try compressedLikeLinux(vmlinux, format: "xz")
        let kernelOffset = (Int(b[0x1F1] == 0 ? 4 : b[0x1F1]) + 1) * 512
        let start = b.count
        b.put32(UInt32(start - kernelOffset), at: 0x248)
        b.put32(UInt32(payload.count), at: 0x24C)
        return (b + payload, start)
    }

    /// A bzImage whose setup header (the payload's offset and length, setup_sects, init_size,
    /// the version pointer) or compressed payload is damaged, or the file cut short: `inspect`
    /// reads the symbols from the payload, so it decompresses and parses what it finds.
    static func mutateBzImage(_ good: [UInt8], payloadStart: Int, _ rng: inout SplitMix64) -> [UInt8] {
        var b = good
        switch rng.next() % 4 {
        case 0:
            b = Array(b.prefix(Int(rng.next() % UInt64(b.count))))
        case 1:
            let v: UInt32 = [0, .max, 0x8000_0000, UInt32(b.count), 1, UInt32(truncatingIfNeeded: rng.next())][Int(rng.next() % 6)]
            switch rng.next() % 5 {
            case 0: b.put32(v, at: 0x248)
            case 1: b.put32(v, at: 0x24C)
            case 2: b.put32(v, at: 0x260)
            case 3: b[0x1F1] = UInt8(truncatingIfNeeded: v)
            default: b.put16(UInt16(truncatingIfNeeded: v), at: 0x20E)
            }
        default:
            for _ in 0..<(1 + rng.next() % 8) {
                b[payloadStart + Int(rng.next() % UInt64(b.count - payloadStart))] = UInt8(truncatingIfNeeded: rng.next())
            }
        }
        return b
    }

    @Test func mutatedBzImagesEndCleanly() throws {
        let (good, payloadStart) = try Self.bzImageWithPayload()
        // The undamaged image: its symbols are the compressed vmlinux's own.
        let symbols = try ELFImage(path: Guests.kernelPath("vmlinux.elf")).symbols
        let functions = symbols.filter { $0.kind == .function }.count
        let clean = try flowtrace("inspect", temporaryFile(good, name: "payload.bzimage"))
        #expect(clean.status == 0, "\(clean.stderr)")
        #expect(clean.stdout.contains("payload: xz, \(good.count - payloadStart) bytes at 0x\(String(payloadStart, radix: 16))"), "\(clean.stdout)")
        #expect(clean.stdout.contains("symbols: \(symbols.count) (\(functions) functions) from the image's .symtab"), "\(clean.stdout)")
        var rng = SplitMix64(state: Self.seed)
        var outcomes: [String: Int] = [:]
        for i in 0..<Self.count {
            let file = try temporaryFile(Self.mutateBzImage(good, payloadStart: payloadStart, &rng), name: "fuzz.bzimage")
            let r = try run("/usr/bin/timeout", ["-s", "KILL", "30", Guests.flowtrace, "inspect", file])
            try Self.check(r, i, "inspect of a bzImage", allowed: [0, 64])
            outcomes["inspect \(r.status)", default: 0] += 1
        }
        // Both endings happen: the mutations reach the decompressor and the ELF parser.
        #expect(outcomes["inspect 0", default: 0] > 0 && outcomes["inspect 64", default: 0] > 0, "\(outcomes)")
        print("bzImage fuzzing: \(Self.count) files (seed \(Self.seed)):", outcomes.sorted { $0.key < $1.key }.map { "\($0.key): \($0.value)" }.joined(separator: ", "))
    }

    /// No hang (killed by `timeout`: 137), no crash (a signal, or no line of flowtrace's own),
    /// errors on one line.
    static func check(_ r: ProcessOutput, _ i: Int, _ what: String, allowed: Set<Int32>?) throws {
        let label = "file \(i) (seed \(seed)), \(what): status \(r.status)\n\(r.stderr.prefix(2000))"
        #expect(r.status != 137, "hang: \(label)")
        let ours = r.stderr.split(separator: "\n").contains { $0.hasPrefix("flowtrace: ") }
        #expect(r.status == 0 || ours, "a failure without a message of flowtrace's (a crash?): \(label)")
        #expect(!r.stderr.contains("Fatal error") && !r.stderr.contains("Crash"), "crash: \(label)")
        if let allowed { #expect(allowed.contains(r.status), "unexpected status: \(label)") }
        if r.stderr.contains("flowtrace: error:") {
            #expect(r.stderr.split(separator: "\n").count == 1, "an error of more than one line: \(label)")
        }
    }
}
