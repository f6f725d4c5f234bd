import Foundation
import Glibc
import Testing
import TestSupport

@Suite("guest builds fail when a stage fails", .serialized)
struct GuestBuildTests {
    /// The initramfs the Linux tests boot has /init in it (listed by cpio itself).
    @Test func theInitramfsListsInit() throws {
        let guests = Guests.root.appendingPathComponent("guests").path
        let built = try run("/usr/bin/env", ["make", "-s", "-C", guests, "build/linux/initrd.cpio.gz"])
        #expect(built.status == 0, "\(built.stderr)")
        let listed = try run("/bin/sh", ["-c", "gzip -dc \"$0\" | cpio -it --quiet", guests + "/build/linux/initrd.cpio.gz"])
        #expect(listed.status == 0)
        #expect(listed.stdout.split(separator: "\n").contains { $0 == "init" || $0 == "./init" }, "\(listed.stdout)")
    }

    /// A cpio that fails (or is missing) fails the recipe instead of leaving a valid, empty
    /// gzip that would then be "up to date" for ever; no initramfs is left behind.
    @Test func aFailingStageFailsTheRecipe() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("flowtrace-build-\(getpid())").path
        try FileManager.default.createDirectory(atPath: dir + "/bin", withIntermediateDirectories: true)
        defer { _ = try? FileManager.default.removeItem(atPath: dir) }
        try "#!/bin/sh\necho 'cpio: refusing' >&2\nexit 1\n".write(toFile: dir + "/bin/cpio", atomically: false, encoding: .utf8)
        chmod(dir + "/bin/cpio", 0o755)
        let guests = Guests.root.appendingPathComponent("guests").path
        var env = ProcessInfo.processInfo.environment
        env["PATH"] = dir + "/bin:" + (env["PATH"] ?? "/usr/bin:/bin")
        let target = dir + "/build/linux/initrd.cpio.gz"
        let r = try run("/usr/bin/env", ["make", "-s", "-C", guests, "BUILD=\(dir)/build", target], environment: env)
        #expect(r.status != 0, "make succeeded with a failing cpio: \(r.stdout)\(r.stderr)")
        #expect(r.stderr.contains("cpio: refusing"))
        #expect(!FileManager.default.fileExists(atPath: target))
    }
}

@Suite("flowtrace as a versioned dependency", .serialized, .timeLimit(.minutes(5)))
struct VersionedDependencyTests {
    /// A package that depends on flowtrace by version (a clone of this repository's HEAD,
    /// tagged) and uses the Machine product: SwiftPM makes its build plan, the step where it
    /// refuses products whose targets carry unsafe flags (LinuxKernel's `-O` did).
    @Test func aPackageDependingOnMachineByVersionIsAccepted() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("flowtrace-consumer-\(getpid())").path
        defer { _ = try? FileManager.default.removeItem(atPath: dir) }
        try FileManager.default.createDirectory(atPath: dir + "/consumer/Sources/consumer", withIntermediateDirectories: true)
        let clone = try run("/usr/bin/env", ["git", "clone", "--quiet", Guests.root.path, dir + "/flowtrace"])
        try #require(clone.status == 0, "git clone: \(clone.stderr)")
        let tag = try run("/usr/bin/env", ["git", "-C", dir + "/flowtrace", "tag", "99.0.0"])
        try #require(tag.status == 0, "git tag: \(tag.stderr)")
        let manifest = """
        // swift-tools-version:6.1
        import PackageDescription
        let package = Package(
            name: "consumer",
            dependencies: [.package(url: "file://\(dir)/flowtrace", from: "99.0.0")],
            targets: [.executableTarget(name: "consumer", dependencies: [.product(name: "Machine", package: "flowtrace")])]
        )
        """
        try manifest.write(toFile: dir + "/consumer/Package.swift", atomically: false, encoding: .utf8)
        try "import Machine\nprint(KernelLayout.kernelLoad)\n".write(toFile: dir + "/consumer/Sources/consumer/main.swift", atomically: false, encoding: .utf8)
        let plan = try run("/usr/bin/env", ["swift", "build", "--package-path", dir + "/consumer", "--print-manifest-job-graph"])
        #expect(plan.status == 0, "\(plan.stderr)")
        #expect(!plan.stderr.contains("unsafe build flags"))
        #expect(plan.stdout.contains("LinuxKernel"), "the plan has no LinuxKernel target: \(plan.stdout.prefix(300))")
    }
}
