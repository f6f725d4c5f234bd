import ArgumentParser
import Foundation
import NameSuggestions

/// flowtrace's version (`flowtrace --version`).
let flowtraceVersion = "0.23.0"

@main
struct FlowTraceCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "flowtrace",
        abstract: "Run x86-64 guests on KVM and trace their execution flow.",
        discussion: """
        Exit status: the guest's own status when it ends normally; 64 for bad input (file, \
        option or value); 69 when KVM is unavailable; 70 when the guest faults, a host call \
        fails or flowtrace has a bug; 74 when the records, the console or a message cannot be \
        written; 124 on --timeout; 129, 130, 143 when stopped by SIGHUP, SIGINT, SIGTERM.
        """,
        version: flowtraceVersion,
        subcommands: [RunCommand.self, GraphCommand.self, InspectCommand.self, DoctorCommand.self]
    )

    /// Parses and runs the command; every ending goes through here, so a failed write to
    /// stdout or stderr (anywhere, any thread) ends the command with exit 74 and one line on
    /// whichever stream still works, and every error has one style: `flowtrace: error: ...`.
    static func main() {
        let arguments = Array(CommandLine.arguments.dropFirst())
        var thrown: (any Error)?
        do {
            if let unknown = unknownSubcommand(arguments) { throw unknown }
            var command = try parseAsRoot(arguments)
            try command.run()
        } catch {
            thrown = error
        }
        if let f = standardOutput.failure {
            let other: StandardOutput.Stream = f.stream == .stdout ? .stderr : .stdout
            if standardOutput.works(other) { standardOutput.line("flowtrace: error: \(f.message)", to: other) }
            Foundation.exit(ExitStatus.ioError)
        }
        guard let thrown else { Foundation.exit(0) }
        // ExitCode: the command said everything already; success: --help, --version.
        let code = exitCode(for: thrown)
        if thrown is ExitCode || code == .success { exit(withError: thrown) }
        // ArgumentParser's own errors (unknown options, bad values) in flowtrace's style.
        var message = Self.message(for: thrown).trimmingCharacters(in: .whitespacesAndNewlines)
        message = message.split(separator: "\n").first.map(String.init) ?? message
        if message.hasPrefix("Error: ") { message.removeFirst(7) }
        if let f = message.first { message = f.lowercased() + message.dropFirst() }
        let sub = arguments.first.flatMap { a in configuration.subcommands.first { $0._commandName == a } }
        let help = sub.map { "flowtrace \($0._commandName) --help" } ?? "flowtrace --help"
        printError("flowtrace: error: \(message) (see '\(help)')")
        Foundation.exit(code == .success ? ExitStatus.usage : code.rawValue)
    }

    /// `flowtrace rn`: a first argument that is no command, with the near ones.
    private static func unknownSubcommand(_ arguments: [String]) -> ValidationError? {
        guard let first = arguments.first, !first.hasPrefix("-") else { return nil }
        let names = configuration.subcommands.map { $0._commandName }
        guard !names.contains(first) && first != "help" else { return nil }
        let near = closestNames(to: first, among: names, maxDistance: 2)
        let hint = near.isEmpty ? "" : "; did you mean '\(near[0])'?"
        return ValidationError("unknown command '\(first)' (commands: \(names.joined(separator: ", ")))\(hint)")
    }
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
    /// 128 + the signal, as a shell reports a process that signal killed.
    static func signalled(_ signal: Int32) -> Int32 { 128 + signal }
    static let interrupted: Int32 = 130
}

/// Prints `flowtrace: error: MESSAGE` (one line) to stderr and exits with `status`.
func fail(_ message: String, status: Int32) -> ExitCode {
    printError("flowtrace: error: \(message)")
    return ExitCode(status)
}

/// The KVM device: `$FLOWTRACE_KVM_DEVICE`, else `/dev/kvm`.
var kvmDevicePath: String { ProcessInfo.processInfo.environment["FLOWTRACE_KVM_DEVICE"] ?? "/dev/kvm" }
