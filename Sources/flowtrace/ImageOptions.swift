import ArgumentParser

/// The options that name an image and how it boots, one group for `run`, `inspect` and
/// `graph`: the guest, `--boot`, `--append`, `--initrd`, `--module` and `--symbol-file`.
struct ImageOptions: ParsableArguments {
    @Argument(help: "A payload (static x86-64 ELF, e.g. guests/build/fib.elf) or a kernel: Linux bzImage or vmlinux, PVH, Multiboot 1 or 2.")
    var guest: String

    @Option(help: "Boot protocol: auto (what the image is), payload, linux, pvh, multiboot or multiboot2.")
    var boot: BootOption = .auto

    @Option(help: ArgumentHelp("The kernel's command line (QEMU's -append).", valueName: "cmdline"))
    var append: String?

    @Option(help: ArgumentHelp("An initrd (Linux), or the first module (Multiboot, PVH); QEMU's -initrd.", valueName: "file"))
    var initrd: String?

    @Option(name: .customLong("module"), help: ArgumentHelp("A Multiboot or PVH module with its command line (repeatable).", valueName: "file[,args]"))
    var modules: [String] = []

    @Option(name: .customLong("symbol-file"), help: ArgumentHelp("A kernel's symbols from System.map, /proc/kallsyms or nm output, for an image without .symtab (default: the kernel's own kallsyms tables).", valueName: "file"))
    var symbolFile: String?

    /// The boot-file options given, by name (`--append`, `--initrd`, `--module`).
    var bootFileOptions: [String] {
        [append.map { _ in "--append" }, initrd.map { _ in "--initrd" }, modules.isEmpty ? nil : "--module"].compactMap { $0 }
    }
}
