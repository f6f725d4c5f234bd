import ArgumentParser
import Foundation

@main
struct FlowTraceCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "flowtrace",
        abstract: "Run x86-64 ELF guests on KVM and trace their execution flow.",
        discussion: """
        Exit status: the guest's own status when it ends normally; 64 for bad input (file, \
        option or value); 69 when KVM is unavailable; 70 when the guest faults, a host call fails or flowtrace has a bug; 74 when the report cannot be written; 124 on \
        --timeout; 130 when interrupted (SIGINT).
        """,
        subcommands: [RunCommand.self, GraphCommand.self, InspectCommand.self, DoctorCommand.self]
    )
}

/// flowtrace's own exit statuses (sysexits.h where one fits).
enum ExitStatus {
    static let usage: Int32 = 64
    static let unavailable: Int32 = 69
    static let guestFault: Int32 = 70
    /// Internal errors (bugs) and host failures: EX_SOFTWARE.
    static let software: Int32 = 70
    static let ioError: Int32 = 74
    static let timeout: Int32 = 124
    static let interrupted: Int32 = 130
}

/// Prints `flowtrace: error: MESSAGE` (one line) to stderr and exits with `status`.
func fail(_ message: String, status: Int32) -> ExitCode {
    printError("flowtrace: error: \(message)")
    return ExitCode(status)
}

/// The KVM device: `$FLOWTRACE_KVM_DEVICE`, else `/dev/kvm`.
var kvmDevicePath: String { ProcessInfo.processInfo.environment["FLOWTRACE_KVM_DEVICE"] ?? "/dev/kvm" }
