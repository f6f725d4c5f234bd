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
        defer { removeDirectory(dir) }
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
        defer { removeDirectory(dir) }
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

/// tools/test-nested's verdicts, with a stand-in for the nested machine (NESTED_RUN) that
/// prints what the real one prints in each case.
@Suite("the real-SVM tier cannot pass without running", .serialized)
struct NestedVerdictTests {
    /// Runs tools/test-nested with a runner that prints `console` and exits `status`.
    func verdict(console: String, status: Int32) throws -> ProcessOutput {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("flowtrace-nested-\(getpid())-\(console.count)-\(status)").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { removeDirectory(dir) }
        try console.write(toFile: dir + "/console", atomically: false, encoding: .utf8)
        try "#!/bin/sh\ncat \"\(dir)/console\"\nexit \(status)\n".write(toFile: dir + "/runner", atomically: false, encoding: .utf8)
        chmod(dir + "/runner", 0o755)
        var env = ProcessInfo.processInfo.environment
        env["NESTED_RUN"] = dir + "/runner"
        env["NESTED_LOG"] = dir + "/log"
        env["NESTED_NO_PREP"] = "1"
        env["NESTED_SUITES"] = "KernelBootTests"
        return try run("/bin/bash", [Guests.root.appendingPathComponent("tools/test-nested").path], environment: env)
    }

    /// The machine came up and QEMU's timeout killed it before the tests ended: FAILED, with
    /// the console's last lines (this passed as "skipped" before).
    @Test func aMachineKilledBeforeTheEndFails() throws {
        let r = try verdict(console: "== L1 up at 2.1s, kernel 6.1.0\n== kvm-caps start\n◇ Test boots() started.\nlast words of the console\n", status: 124)
        #expect(r.status == 1, "\(r.stdout)\(r.stderr)")
        #expect(r.stdout.contains("test-nested: FAILED: the nested machine came up but the tests did not finish (script exit 124: QEMU killed by its TIMEOUT)"))
        #expect(r.stdout.contains("  | last words of the console"))
    }

    /// A machine that never came up (a download refused, QEMU not built): skipped, loudly.
    @Test func aMachineThatCannotBeSetUpIsSkippedLoudly() throws {
        let r = try verdict(console: "### downloading qemu\nE: download refused\n", status: 1)
        #expect(r.status == 0)
        #expect(r.stdout.contains("test-nested: SKIPPED (the nested machine could not be set up; the real-SVM tier did not run)"))
    }

    /// Every suite passing inside: passed; a suite missing from the log: FAILED.
    @Test func onlyEverySuitePassingPasses() throws {
        let ok = try verdict(console: "== L1 up at 2s\n✔ Suite \"boot protocols: the test kernels boot\" passed after 3 seconds.\n== extra exit status 0 at 9s\n", status: 0)
        #expect(ok.status == 0, "\(ok.stdout)")
        #expect(ok.stdout.contains("test-nested: KernelBootTests passed inside the nested KVM"))
        let missing = try verdict(console: "== L1 up at 2s\n== extra exit status 0 at 9s\n", status: 0)
        #expect(missing.status == 1)
        #expect(missing.stdout.contains("FAILED: the suite \"boot protocols: the test kernels boot\" did not run or pass"))
    }
}
