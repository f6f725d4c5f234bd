import ArgumentParser
import Foundation
import KVM
import Machine

/// `FLOWTRACE_FAULT` (see docs/reliability.md): a host call to fail on purpose.
var faultInjection: String? { ProcessInfo.processInfo.environment["FLOWTRACE_FAULT"] }

func inject(_ text: String, into machine: Machine) throws(ExitCode) {
    let spec: FaultSpec
    do { spec = try FaultSpec(parsing: text) } catch { throw fail(error.description, status: ExitStatus.usage) }
    guard spec.vcpu < machine.vcpus.count else {
        throw fail("FLOWTRACE_FAULT '\(text)': the guest has vCPUs 0 to \(machine.vcpus.count - 1)", status: ExitStatus.usage)
    }
    if spec.call == .memoryWrite {
        machine.memory.faults.fail(.memoryWrite, onCall: spec.nth, errno: spec.errno)
    } else {
        machine.vcpus[spec.vcpu].faults.fail(spec.call, onCall: spec.nth, errno: spec.errno)
    }
}
