import FlowTrace
import Foundation
import KVM
import Machine

/// Per-hit cost of each engine that works here: `counter` (1000 calls of tick) run with a
/// probe of 4 registers + 16 bytes on tick, minus the same guest run without probes.
func engines(guests: String) throws -> [Figure] {
    let path = guests + "/counter.elf"
    let host = try KVMHost()
    let support = EngineSelfTest.support(host: host)
    func elapsed(_ engine: BreakpointEngine?) throws -> (seconds: Double, hits: Int) {
        let m = try Machine(path: path, configuration: .init(engine: engine.map { .engine($0) } ?? .auto), host: host)
        var module: TraceModule?
        if engine != nil {
            let tick = m.symbolizer.address(of: "tick")!
            let table = m.symbolizer.address(of: "tick_sum")!
            let t = try TraceModule(target: m)
            try t.addProbe(Probe("bench", entries: try ["rdi", "rsi", "rax", "rsp"].map { try .register(named: $0) }
                                 + [try .memory(at: table, size: 16)]), at: tick)
            try t.enable()
            module = t
        }
        let r = try m.run(timeout: .seconds(120))
        guard r.ending == .exited(status: 0) else { throw MachineError.notRunning }
        return (seconds(r.elapsed), module?.report().count ?? 0)
    }
    var figures: [Figure] = []
    for e in BreakpointEngine.allCases {
        guard support.works(e) else {
            figures.append(Figure(label: "engine \(e) on counter (µs/hit)", value: "does not work here",
                                  json: #"{"bench":"engine.hit","engine":"\#(e)","works":false}"#))
            continue
        }
        var costs: [Double] = []
        for _ in 0..<runs {
            let base = try elapsed(nil)
            let traced = try elapsed(e)
            costs.append((traced.seconds - base.seconds) * 1e6 / Double(traced.hits))
        }
        costs.sort()
        let median = costs[costs.count / 2]
        figures.append(Figure(label: "engine \(e) on counter (µs/hit, median [min-max] of \(runs))",
                              value: "\(f1(median)) [\(f1(costs.first!))-\(f1(costs.last!))]",
                              json: #"{"bench":"engine.hit","engine":"\#(e)","us_per_hit":\#(f1(median)),"min":\#(f1(costs.first!)),"max":\#(f1(costs.last!)),"runs":\#(runs)}"#))
    }
    return figures
}
