import ArgumentParser
import ELF
import FlowTrace
import FlowTraceGraphs
import Foundation
import KVM
import FlowGraph
import LinuxKernel
import Locking
import Devices
import Machine
import Sys
import TraceSpec

/// Why flowtrace stopped a run itself (the machine's ending is then `.stopped`).
enum StopCause: Sendable, Equatable {
    /// SIGINT, SIGTERM or SIGHUP.
    case signal(Int32)
    /// Writing the records, the console or a message failed.
    case outputFailed(String)

    var exitStatus: Int32 {
        switch self {
        case let .signal(s): ExitStatus.signalled(s)
        case .outputFailed: ExitStatus.ioError
        }
    }
}

/// The signals that end `flowtrace run` in order: SIGINT (Ctrl-C), SIGTERM (what `timeout`,
/// systemd and docker send) and SIGHUP (a closed terminal). Installed first thing, so none
/// is lost to the default action. While nothing runs yet the command exits at once (128 +
/// the signal); once the guest runs, the first one stops every vCPU and the run ends as
/// usual (every record taken written, the summary). A second one means "stop now": the
/// command exits at once, leaving -o FILE as it was (what was written is in the named
/// temporary file).
final class Interruption: Sendable {
    static let signals: [Int32] = [SIGINT, SIGTERM, SIGHUP]
    private struct State {
        var machine: Machine?
        var cause: StopCause?
        var signals = 0
        /// Said when a second signal ends the command at once: where the records are.
        var partial: String?
    }
    private let state = Locked(State())
    /// Dispatch sources are not Sendable: these are only touched under their lock.
    private let sources: Locked<[any DispatchSourceSignal]>

    init() {
        let state = self.state
        // A parent may have started flowtrace with these blocked (the mask is inherited, as
        // from a thread of a test runner): unblocked here, on the main thread, before any
        // thread of the run exists, so every thread that takes signals inherits that.
        var unblock = sigset_t()
        sigemptyset(&unblock)
        for sig in Self.signals { sigaddset(&unblock, sig) }
        pthread_sigmask(SIG_UNBLOCK, &unblock, nil)
        var sources: [any DispatchSourceSignal] = []
        for sig in Self.signals {
            signal(sig, SIG_IGN)
            let source = DispatchSource.makeSignalSource(signal: sig, queue: .global())
            source.setEventHandler { Interruption.received(sig, state) }
            source.resume()
            sources.append(source)
        }
        self.sources = Locked(sources)
    }

    private static func received(_ sig: Int32, _ state: Locked<State>) {
        let (machine, count, partial) = state.withLock { s -> (Machine?, Int, String?) in
            s.signals += 1
            if s.cause == nil { s.cause = .signal(sig) }
            return (s.machine, s.signals, s.partial)
        }
        let name = signalName(sig)
        guard let machine else {
            printError("flowtrace: \(name) before the guest ran; nothing was traced")
            exit(ExitStatus.signalled(sig))
        }
        guard count == 1 else {
            // Not through the output lock: the thread holding it may be what is stuck.
            let line = "flowtrace: second signal (\(name)): stopping now" + (partial.map { "; the records written so far are in \($0)" } ?? "") + "\n"
            do throws(SystemError) { try writeAll(STDERR_FILENO, Array(line.utf8)) } catch {}
            _exit(ExitStatus.signalled(sig))
        }
        printError("flowtrace: \(name): stopping every vCPU; every record taken so far is written (a second signal stops at once)")
        machine.stop()
    }

    /// From now on a signal stops `m`; `partial` names where the records are written.
    func stops(_ m: Machine, partial: String?) { state.withLock { $0.machine = m; $0.partial = partial } }

    /// Stops the run because output failed (the first cause is kept).
    func stopForOutputFailure(_ message: String) {
        let machine = state.withLock { s -> Machine? in
            if s.cause == nil { s.cause = .outputFailed(message) }
            return s.machine
        }
        machine?.stop()
    }

    /// What stopped the run, if flowtrace did.
    var cause: StopCause? { state.withLock { $0.cause } }

    func cancel() { sources.withLock { for s in $0 { s.cancel() } } }
}

func signalName(_ sig: Int32) -> String {
    switch sig {
    case SIGINT: "SIGINT"
    case SIGTERM: "SIGTERM"
    case SIGHUP: "SIGHUP"
    default: "signal \(sig)"
    }
}
