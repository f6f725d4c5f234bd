// swift-tools-version:6.1
import PackageDescription

let package = Package(
    name: "flowtrace",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "flowtrace", targets: ["flowtrace"]),
        .library(name: "FlowTrace", targets: ["FlowTrace"]),
        .library(name: "FlowTraceGraphs", targets: ["FlowTraceGraphs"]),
        .library(name: "Machine", targets: ["Machine"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
    ],
    targets: [
        // C glue: one function per ioctl, nothing else.
        .target(name: "CKVM"),
        // libelf from Debian's libelf-dev.
        .systemLibrary(
            name: "CLibElf",
            pkgConfig: "libelf",
            providers: [.apt(["libelf-dev"])]
        ),
        // Zydis 4 from Debian's libzydis-dev (no pkg-config file: the module map links it).
        .systemLibrary(name: "CZydis", providers: [.apt(["libzydis-dev"])]),
        // zlib, liblzma, libzstd, liblz4, libbz2: the formats a bzImage's payload comes in.
        .systemLibrary(name: "CCompression", providers: [.apt(["zlib1g-dev", "liblzma-dev", "libzstd-dev", "liblz4-dev", "libbz2-dev"])]),
        // Locks ThreadSanitizer can see (see Locked.swift), and the record store's spin lock.
        .target(name: "Locking"),
        // File output that never destroys what it replaces, clocks, terminals: the CLI's and
        // the report writer's system calls.
        .target(name: "Sys", dependencies: ["Locking"]),
        .target(name: "KVM", dependencies: ["CKVM", "Locking"]),
        // The guest's devices on port-I/O and MMIO buses: pure Swift, no KVM.
        .target(name: "Devices", dependencies: ["Locking"]),
        // "Did you mean" for symbol and register names.
        .target(name: "NameSuggestions"),
        .target(name: "ELF", dependencies: ["CLibElf", "NameSuggestions"]),
        // A Linux kernel's own symbols: its compressed payload, its kallsyms tables, symbol files.
        .target(name: "LinuxKernel", dependencies: ["CCompression", "ELF"]),
        // x86-64 decoding and control-flow graphs of guest code.
        .target(name: "FlowGraph", dependencies: ["CZydis", "ELF", "NameSuggestions"]),
        // Probes, trace modules, records, reports, filters: pure Swift over TraceTarget.
        .target(name: "FlowTrace", dependencies: ["Locking", "NameSuggestions"]),
        // The bridge from control-flow graphs to probes (TraceModule.addFlowGraph).
        .target(name: "FlowTraceGraphs", dependencies: ["FlowTrace", "FlowGraph"]),
        // A TraceTarget without a machine: for tests and the core benchmark.
        .target(name: "FlowTraceSimulation", dependencies: ["FlowTrace", "Locking"]),
        .target(name: "Machine", dependencies: ["KVM", "Devices", "ELF", "LinuxKernel", "FlowTrace", "FlowGraph", "Locking"]),
        // The command line's languages: probe specs, filters, report formats.
        .target(name: "TraceSpec", dependencies: ["FlowTrace", "ELF", "NameSuggestions", "Sys"]),
        .executableTarget(
            name: "flowtrace",
            dependencies: [
                "Machine", "Devices", "ELF", "KVM", "FlowTrace", "FlowTraceGraphs", "FlowGraph", "Locking", "TraceSpec", "Sys", "NameSuggestions", "LinuxKernel",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),
        // Benchmarks (tools/bench), built in release mode.
        .executableTarget(name: "flowtrace-bench", dependencies: ["FlowTrace", "FlowTraceSimulation", "FlowGraph", "ELF", "Machine", "KVM", "Locking", "Sys"]),
        // Test helpers: builds the guests, runs the executable.
        .target(name: "TestSupport", dependencies: ["Locking"], path: "Tests/TestSupport"),
        .testTarget(name: "ELFTests", dependencies: ["ELF", "TestSupport"]),
        .testTarget(name: "LinuxKernelTests", dependencies: ["LinuxKernel", "ELF", "TestSupport"]),
        .testTarget(name: "KVMTests", dependencies: ["KVM"]),
        .testTarget(name: "DevicesTests", dependencies: ["Devices", "Locking", "TestSupport"]),
        .testTarget(name: "FlowGraphTests", dependencies: ["FlowGraph", "ELF", "TestSupport"]),
        .testTarget(name: "MachineTests", dependencies: ["Machine", "LinuxKernel", "ELF", "KVM", "FlowGraph", "FlowTraceGraphs", "TestSupport"]),
        .testTarget(name: "FlowTraceTests", dependencies: ["FlowTrace", "FlowTraceSimulation", "FlowGraph", "FlowTraceGraphs", "Locking", "TestSupport"]),
        // Depends on the executable so `swift test` always runs the current flowtrace binary.
        .testTarget(name: "CLITests", dependencies: ["KVM", "Machine", "FlowGraph", "ELF", "TestSupport", "flowtrace"]),
        .testTarget(name: "TraceSpecTests", dependencies: ["TraceSpec", "FlowTrace", "FlowTraceSimulation", "ELF", "TestSupport", "Sys"]),
    ],
    swiftLanguageModes: [.v6]
)
