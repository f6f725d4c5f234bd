import ArgumentParser
import Foundation
import KVM
import Machine
import Sys

struct DoctorCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "doctor",
        abstract: "Check this host's KVM: API version, capabilities, and which breakpoint engines work.",
        discussion: """
        Runs the engine self-test (a four-instruction guest per engine) and shows what each \
        engine did, which engines each platform (payload, pc) can use, whether the pc platform's \
        in-kernel irqchip and PIT and interrupt-free single steps (BLOCKIRQ) are there, and \
        which engine 'auto' picks for 1, 4 and 5 probe locations on each platform. \
        Exit status 0 when at least one engine works, 69 when KVM is unavailable or none does.
        """
    )

    func run() throws {
        let host: KVMHost
        do { host = try KVMHost(path: kvmDevicePath) } catch {
            printOut("KVM device: \(kvmDevicePath): unavailable")
            throw fail(error.description, status: ExitStatus.unavailable)
        }
        printOut("KVM device: \(host.path), API version \(host.apiVersion)")
        let kernel = hostKernel()
        printOut("host kernel: \(kernel.release) \(kernel.machine)")
        if let module = loadedKVMModule() { printOut("KVM module: \(module)") }
        printOut("KVM: \(KVMFlavor.current().summary)")

        printOut("capabilities:")
        let caps: [(Capability, String)] = [
            (.setGuestDebug, "needed by the int3, hw and step engines"),
            (.setGuestDebug2, "guest-debug flags the host supports (bitmask)"),
            (.syncRegs, "registers without an ioctl per exit"),
            (.immediateExit, "stopping vCPUs for arming and Ctrl-C"),
            (.debugRegs, "reading dr0-dr7 in probes"),
            (.vcpuEvents, "re-injecting a guest's own #BP"),
            (.x86RobustSinglestep, "single-step over instructions that exit"),
            (.irqchip, "the pc platform's in-kernel PIC, IOAPIC and LAPIC"),
            (.pit2, "the pc platform's in-kernel PIT"),
            (.tscDeadlineTimer, "LAPIC TSC-deadline timer mode"),
            (.nrVCPUs, "recommended vCPUs"),
            (.maxVCPUs, "maximum vCPUs"),
        ]
        var rows: [[String]] = []
        for (cap, why) in caps {
            let shown: String
            do {
                let v = try host.capability(cap)
                shown = cap == .setGuestDebug2 ? (v == 0 ? "0" : hex(UInt64(v))) : "\(v)"
            } catch {
                shown = "error: \(error.description)"
            }
            rows.append([cap.description, shown, why])
        }
        printOut(table(rows))

        printOut("breakpoint engines (self-test):")
        let support = EngineSelfTest.support(host: host)
        rows = []
        for e in BreakpointEngine.allCases {
            switch support.status(e) {
            case .works: rows.append([e.rawValue, "works", engineNote(e)])
            case let .unavailable(why): rows.append([e.rawValue, "does not work", why])
            }
        }
        printOut(table(rows))

        printOut("platforms:")
        let blockIRQ: String
        do { blockIRQ = try host.blocksInterruptsWhileStepping() ? "BLOCKIRQ" : "an STI interrupt shadow (KVM_GUESTDBG_BLOCKIRQ not offered)" } catch {
            blockIRQ = "unknown (\(error.description))"
        }
        func present(_ cap: Capability) -> String {
            do { return try host.capability(cap) == 0 ? "missing" : "yes" } catch { return "unknown (\(error.description))" }
        }
        let irqchip = present(.irqchip), pit = present(.pit2)
        rows = [["PLATFORM", "ENGINES", "NOTES"]]
        for p in Platform.allCases {
            let s = support.restricted(to: p)
            let engines = BreakpointEngine.allCases.filter(s.works).map(\.rawValue)
            let note = switch p {
            case .payload: "no interrupt controller; hlt ends a vCPU"
            case .pc: "irqchip \(irqchip), PIT \(pit), step-overs keep interrupts out with \(blockIRQ)"
                + (s.works(.hlt) ? "" : "; no hlt engine (KVM handles hlt itself)")
            }
            rows.append([p.rawValue, engines.isEmpty ? "none" : engines.joined(separator: ", "), note])
        }
        printOut(table(rows))

        printOut("auto chooses:")
        rows = []
        for p in Platform.allCases {
            for n in [1, 4, 5] {
                let label = "\(p.rawValue), \(n) location\(n == 1 ? "" : "s")"
                do {
                    let (e, why) = try EngineRequest.auto.resolve(locations: n, support: support.restricted(to: p))
                    rows.append([label, e.rawValue, why])
                } catch {
                    rows.append([label, "none", error.description])
                }
            }
        }
        printOut(table(rows))
        if !BreakpointEngine.allCases.contains(where: support.works) {
            throw fail("no breakpoint engine works on this host", status: ExitStatus.unavailable)
        }
    }

    private func engineNote(_ e: BreakpointEngine) -> String {
        switch e {
        case .int3: "patches 0xCC; any number of locations"
        case .hlt: "patches 0xF4 (CPL0 guest code); any number of locations"
        case .hw: "DR0-DR3; at most 4 locations"
        case .step: "single-steps every instruction; slowest"
        }
    }

    /// The kvm_* modules that are loaded (`kvm_intel`, `kvm_amd`, `kvm_pvm`), from /proc/modules.
    private func loadedKVMModule() -> String? {
        guard let text = try? String(contentsOfFile: "/proc/modules", encoding: .utf8) else { return nil }
        let names = text.split(separator: "\n").compactMap { $0.split(separator: " ").first.map(String.init) }
            .filter { $0.hasPrefix("kvm") }
        return names.isEmpty ? nil : names.joined(separator: ", ")
    }
}

