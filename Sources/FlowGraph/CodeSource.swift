import ELF

/// Where a flow graph's bytes come from: an ELF image, guest memory, or a byte buffer.
public protocol CodeSource {
    /// Up to `count` bytes at `address` meant to be executed: fewer where the executable
    /// memory ends, an error with the reason where there is none at `address`.
    func code(at address: UInt64, count: Int) -> Result<[UInt8], CodeSourceError>
    /// Exactly `count` bytes of data (jump tables) at `address`, from any readable memory.
    func data(at address: UInt64, count: Int) -> Result<[UInt8], CodeSourceError>
}

/// Why a code source had nothing at an address.
public struct CodeSourceError: Error, Sendable, Hashable, CustomStringConvertible {
    public let reason: String
    public init(_ reason: String) { self.reason = reason }
    public var description: String { reason }
}

/// The bytes of an ELF image's segments, as the loader maps them (the part past a segment's
/// file bytes reads as zeros).
public struct ImageCodeSource: CodeSource {
    public let image: ELFImage

    public init(image: ELFImage) { self.image = image }

    public func code(at address: UInt64, count: Int) -> Result<[UInt8], CodeSourceError> {
        guard let s = image.segments.first(where: { $0.range.contains(address) }) else {
            return .failure(CodeSourceError("0x\(String(address, radix: 16)) is outside every segment of \(image.path)"))
        }
        guard s.isExecutable else {
            return .failure(CodeSourceError("0x\(String(address, radix: 16)) is in a segment that is not executable"))
        }
        return .success(Self.bytes(of: s, at: address, count: min(count, Int(s.range.upperBound - address))))
    }

    public func data(at address: UInt64, count: Int) -> Result<[UInt8], CodeSourceError> {
        guard let s = image.segments.first(where: { $0.range.contains(address) }),
              address.addingReportingOverflow(UInt64(count)).partialValue <= s.range.upperBound else {
            return .failure(CodeSourceError("\(count) bytes at 0x\(String(address, radix: 16)) are not inside one segment of \(image.path)"))
        }
        return .success(Self.bytes(of: s, at: address, count: count))
    }

    private static func bytes(of s: ELFImage.Segment, at address: UInt64, count: Int) -> [UInt8] {
        let offset = Int(address - s.virtualAddress)
        var out = [UInt8](repeating: 0, count: count)
        let fromFile = max(0, min(count, s.data.count - offset))
        if fromFile > 0 { out.replaceSubrange(0..<fromFile, with: s.data[offset ..< offset + fromFile]) }
        return out
    }
}

/// A byte buffer at an address, all of it executable and readable (tests, fuzzing).
public struct BufferCodeSource: CodeSource {
    public let base: UInt64
    public let bytes: [UInt8]

    public init(base: UInt64, bytes: [UInt8]) { self.base = base; self.bytes = bytes }

    public func code(at address: UInt64, count: Int) -> Result<[UInt8], CodeSourceError> {
        guard address >= base, address - base < UInt64(bytes.count) else {
            return .failure(CodeSourceError("0x\(String(address, radix: 16)) is outside the buffer"))
        }
        let o = Int(address - base)
        return .success(Array(bytes[o ..< min(bytes.count, o + count)]))
    }

    public func data(at address: UInt64, count: Int) -> Result<[UInt8], CodeSourceError> {
        guard address >= base, address - base <= UInt64(bytes.count), UInt64(count) <= UInt64(bytes.count) - (address - base) else {
            return .failure(CodeSourceError("\(count) bytes at 0x\(String(address, radix: 16)) are outside the buffer"))
        }
        let o = Int(address - base)
        return .success(Array(bytes[o ..< o + count]))
    }
}
