import ArgumentParser
import ELF
import Foundation
import KVM
import Machine

struct RunCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "run",
        abstract: "Boot an ELF guest and run it to the end.",
        discussion: """
        The guest's console (port 0xE9) goes to stdout; a one-line summary goes to stderr. \
        Exit status: the guest's own (port 0xF4, or 0 when every vCPU halted), 64 bad input, \
        69 KVM unavailable, 70 guest fault, 124 timeout, 130 interrupted.
        """
    )

    @Argument(help: "A static x86-64 ELF executable (e.g. guests/build/fib.elf).")
    var guest: String

    @Option(help: "Number of vCPUs; each starts at the entry with its index in rdi.")
    var vcpus: Int = 1

    @Option(help: "Guest RAM: bytes or a K/M/G suffix, a multiple of 2M.")
    var memory: String = "64M"

    @Option(help: "Stop the guest after this many seconds (exit status 124).")
    var timeout: Double?

    func run() throws {
        let memorySize: UInt64
        do { memorySize = try parseMemorySize(memory) } catch { throw fail(error.description, status: ExitStatus.usage) }
        if let t = timeout, !(t > 0 && t.isFinite) {
            throw fail("--timeout \(t): must be a positive number of seconds", status: ExitStatus.usage)
        }
        // The image is checked first so a bad file is reported as such even without KVM.
        let image: ELFImage
        do { image = try ELFImage(path: guest) } catch { throw fail(error.description, status: ExitStatus.usage) }
        let host: KVMHost
        do { host = try KVMHost(path: kvmDevicePath) } catch { throw fail(error.description, status: ExitStatus.unavailable) }
        let machine: Machine
        do {
            machine = try Machine(image: image, configuration: MachineConfiguration(vcpuCount: vcpus, memorySize: memorySize), host: host)
        } catch {
            if case .kvm = error { throw fail(error.description, status: ExitStatus.unavailable) }
            throw fail(error.description, status: ExitStatus.usage)
        }

        // Ctrl-C stops every vCPU; what the run produced is still reported.
        signal(SIGINT, SIG_IGN)
        let interrupt = DispatchSource.makeSignalSource(signal: SIGINT, queue: .global())
        interrupt.setEventHandler { machine.stop() }
        interrupt.resume()
        defer { interrupt.cancel() }

        var result: RunResult
        do {
            result = try machine.run(timeout: timeout.map { .milliseconds(Int64($0 * 1000)) }) { line in
                printOut(line.text)
            }
            // No debugger to hand a halt to: report it and go on.
            while case let .halted(stop) = result.ending {
                printError("flowtrace: halt on vCPU \(stop.vcpu) at \(stop.location); resuming")
                result = try machine.resume()
            }
        } catch {
            throw fail(error.description, status: ExitStatus.usage)
        }
        let name = (guest as NSString).lastPathComponent
        let seconds = String(format: "%.3f s", Double(result.elapsed.components.seconds) + Double(result.elapsed.components.attoseconds) / 1e18)
        let cpus = "\(vcpus) vCPU\(vcpus == 1 ? "" : "s")"
        switch result.ending {
        case let .exited(status):
            printError("flowtrace: \(name): guest exited with status \(status) after \(seconds) (\(cpus))")
            if status != 0 { throw ExitCode(Int32(truncatingIfNeeded: status & 0xFF == 0 ? 1 : status & 0xFF)) }
        case let .fault(f):
            printError("flowtrace: \(name): \(f.description) after \(seconds)")
            printError(f.registerDump)
            throw ExitCode(ExitStatus.guestFault)
        case .timedOut:
            printError("flowtrace: \(name): timed out after \(seconds) (--timeout \(timeout ?? 0)); every vCPU was stopped")
            throw ExitCode(ExitStatus.timeout)
        case .halted:
            break
        case .stopped:
            printError("flowtrace: \(name): interrupted after \(seconds); every vCPU was stopped")
            throw ExitCode(ExitStatus.interrupted)
        }
    }
}
