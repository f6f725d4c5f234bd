import Locking

/// Where a UART's transmitted bytes go.
public enum SerialOutput: Sendable {
    /// Into the run's console, as serial lines.
    case console(Console)
    /// To a byte sink (a file); called on the writing vCPU's thread, outside the UART's lock.
    case sink(@Sendable (UInt8) -> Void)
    /// Nowhere.
    case discard
}

/// A 16550A UART (the PC's COM ports), at `base` ... `base + 7` on interrupt line `irq`.
///
/// Transmission is instant: a byte written to THR goes out at once, so the transmitter is
/// always empty (LSR THRE|TEMT) and a THR-empty interrupt is pending again after each
/// write. Received bytes (`receive`) wait in the 16-byte FIFO (1 byte with FIFOs off);
/// below the FIFO's trigger level they are reported as a character timeout at once.
/// Loopback (MCR bit 4) sends THR to the receiver and the modem-control outputs to the
/// modem-status inputs (RTS->CTS, DTR->DSR, OUT1->RI, OUT2->DCD), as Linux's probe checks;
/// outside loopback the modem reads connected (CTS, DSR, DCD). The interrupt line is the
/// pending interrupt gated by OUT2, as on a PC, and is driven under the UART's lock, so
/// levels reach the irqchip in the order they changed.
public final class UART16550: PortDevice {
    public static let com1: UInt16 = 0x3F8
    public static let com1IRQ: UInt32 = 4
    public static let fifoSize = 16

    // Register offsets and bits, as the 16550A data sheet names them.
    public enum Register {
        public static let rbrTHR: UInt16 = 0, ier: UInt16 = 1, iirFCR: UInt16 = 2, lcr: UInt16 = 3
        public static let mcr: UInt16 = 4, lsr: UInt16 = 5, msr: UInt16 = 6, scr: UInt16 = 7
    }
    public enum IER { public static let rda: UInt8 = 0x01, thre: UInt8 = 0x02, rls: UInt8 = 0x04, ms: UInt8 = 0x08 }
    public enum IIR {
        public static let noInterrupt: UInt8 = 0x01, modemStatus: UInt8 = 0x00, thrEmpty: UInt8 = 0x02
        public static let receivedData: UInt8 = 0x04, lineStatus: UInt8 = 0x06, timeout: UInt8 = 0x0C
        public static let fifosEnabled: UInt8 = 0xC0
    }
    public enum LSR {
        public static let dataReady: UInt8 = 0x01, overrun: UInt8 = 0x02, thrEmpty: UInt8 = 0x20, transmitterEmpty: UInt8 = 0x40
    }
    public enum MCR { public static let dtr: UInt8 = 0x01, rts: UInt8 = 0x02, out1: UInt8 = 0x04, out2: UInt8 = 0x08, loop: UInt8 = 0x10 }
    public enum MSR { public static let cts: UInt8 = 0x10, dsr: UInt8 = 0x20, ri: UInt8 = 0x40, dcd: UInt8 = 0x80 }
    public static let lcrDLAB: UInt8 = 0x80

    public let name: String
    public let base: UInt16
    public let irq: UInt32
    public var ports: ClosedRange<UInt16> { base...(base + 7) }

    private struct State {
        var rx: [UInt8] = []
        var ier: UInt8 = 0
        var lcr: UInt8 = 0
        var mcr: UInt8 = 0
        var scr: UInt8 = 0
        var divisor: UInt16 = 12     // 9600 baud from the PC's 1.8432 MHz clock
        var fifos = false
        var trigger = 1
        var thrEmptyPending = false
        var overrun = false
        var msrDeltas: UInt8 = 0
        var line = false
        var transmitted: UInt64 = 0
        /// The guest's driver is set up to receive (see `receive`).
        var receiving = false
        var lcrWritten = false

        var loopback: Bool { mcr & MCR.loop != 0 }
        var capacity: Int { fifos ? UART16550.fifoSize : 1 }

        /// The modem-status inputs (MSR bits 4-7).
        var modemInputs: UInt8 {
            guard loopback else { return MSR.cts | MSR.dsr | MSR.dcd }
            var s: UInt8 = 0
            if mcr & MCR.rts != 0 { s |= MSR.cts }
            if mcr & MCR.dtr != 0 { s |= MSR.dsr }
            if mcr & MCR.out1 != 0 { s |= MSR.ri }
            if mcr & MCR.out2 != 0 { s |= MSR.dcd }
            return s
        }

        /// The highest-priority pending interrupt (IIR bits 0-3).
        var interrupt: UInt8 {
            if ier & IER.rls != 0, overrun { return IIR.lineStatus }
            if ier & IER.rda != 0, !rx.isEmpty { return rx.count >= trigger ? IIR.receivedData : IIR.timeout }
            if ier & IER.thre != 0, thrEmptyPending { return IIR.thrEmpty }
            if ier & IER.ms != 0, msrDeltas != 0 { return IIR.modemStatus }
            return IIR.noInterrupt
        }

        var wantsLine: Bool { !loopback && mcr & MCR.out2 != 0 && interrupt != IIR.noInterrupt }

        mutating func setMCR(_ v: UInt8) {
            let before = modemInputs
            mcr = v & 0x1F
            let after = modemInputs
            let changed = before ^ after
            if changed & MSR.cts != 0 { msrDeltas |= 0x01 }
            if changed & MSR.dsr != 0 { msrDeltas |= 0x02 }
            if before & MSR.ri != 0, after & MSR.ri == 0 { msrDeltas |= 0x04 }
            if changed & MSR.dcd != 0 { msrDeltas |= 0x08 }
        }

        mutating func push(_ byte: UInt8) -> Bool {
            guard rx.count < capacity else { overrun = true; return false }
            rx.append(byte)
            return true
        }
    }

    private let state = ConditionLock(State())
    private let output: SerialOutput
    private let interrupts: any InterruptLines

    public init(base: UInt16 = UART16550.com1, irq: UInt32 = UART16550.com1IRQ, name: String = "16550A UART (COM1)",
                output: SerialOutput, interrupts: any InterruptLines = NoInterruptLines()) {
        self.base = base
        self.irq = irq
        self.name = name
        self.output = output
        self.interrupts = interrupts
    }

    /// Bytes sent so far (THR writes outside loopback).
    public var transmitted: UInt64 { state.withLock { $0.transmitted } }

    public func read(port: UInt16, size: Int, context: IOContext) -> UInt32 {
        let offset = port &- base
        let value: UInt8 = update { s in
            let dlab = s.lcr & UART16550.lcrDLAB != 0
            switch offset {
            case Register.rbrTHR:
                if dlab { return UInt8(truncatingIfNeeded: s.divisor) }
                s.receiving = true
                return s.rx.isEmpty ? 0 : s.rx.removeFirst()
            case Register.ier:
                return dlab ? UInt8(truncatingIfNeeded: s.divisor >> 8) : s.ier
            case Register.iirFCR:
                let id = s.interrupt
                // Reading IIR while it reports THR empty acknowledges that interrupt.
                if id == IIR.thrEmpty { s.thrEmptyPending = false }
                return id | (s.fifos ? IIR.fifosEnabled : 0)
            case Register.lcr: return s.lcr
            case Register.mcr: return s.mcr
            case Register.lsr:
                if s.lcrWritten { s.receiving = true }
                var v = LSR.thrEmpty | LSR.transmitterEmpty
                if !s.rx.isEmpty { v |= LSR.dataReady }
                if s.overrun { v |= LSR.overrun; s.overrun = false }
                return v
            case Register.msr:
                let v = s.modemInputs | s.msrDeltas
                s.msrDeltas = 0
                return v
            default: return s.scr
            }
        }
        if size == 1 { return UInt32(value) }
        // Wider reads of a byte-wide device: the other bytes float high.
        return UInt32(value) | (allOnes(size) & ~0xFF)
    }

    public func write(port: UInt16, size: Int, value: UInt32, context: IOContext) -> DeviceEvent? {
        let offset = port &- base
        let v = UInt8(truncatingIfNeeded: value)
        let sent: UInt8? = update { s in
            let dlab = s.lcr & UART16550.lcrDLAB != 0
            switch offset {
            case Register.rbrTHR:
                if dlab { s.divisor = s.divisor & 0xFF00 | UInt16(v); return nil }
                // The byte leaves at once; the holding register is empty again.
                s.thrEmptyPending = true
                if s.loopback { _ = s.push(v); return nil }
                s.transmitted += 1
                return v
            case Register.ier:
                if dlab { s.divisor = s.divisor & 0x00FF | UInt16(v) << 8; return nil }
                let before = s.ier
                s.ier = v & 0x0F
                if s.ier & IER.rda != 0 { s.receiving = true }
                // Enabling the THR-empty interrupt with the holding register empty raises it.
                if before & IER.thre == 0, s.ier & IER.thre != 0 { s.thrEmptyPending = true }
            case Register.iirFCR:
                let enable = v & 0x01 != 0
                if enable != s.fifos { s.rx.removeAll() }
                s.fifos = enable
                if v & 0x02 != 0 { s.rx.removeAll() }
                s.trigger = enable ? [1, 4, 8, 14][Int(v >> 6)] : 1
            case Register.lcr: s.lcr = v; s.lcrWritten = true
            case Register.mcr: s.setMCR(v)
            case Register.lsr, Register.msr: break   // read-only (factory test modes not modelled)
            default: s.scr = v
            }
            return nil
        }
        if let sent {
            switch output {
            case let .console(c): c.writeSerial(byte: sent, from: context.vcpu)
            case let .sink(f): f(sent)
            case .discard: break
            }
        }
        return nil
    }

    /// Offers `bytes` to the receiver; returns how many the FIFO took (it never overruns
    /// for input from here: the rest waits for room, see `waitForRoom`). Nothing is taken
    /// before the guest's driver is set up to receive: it enabled received-data interrupts,
    /// read the receive register, or programmed the line and then polls its status. Bytes
    /// arriving earlier would be lost when the driver clears the FIFO, as it does at start.
    @discardableResult
    public func receive(_ bytes: some Collection<UInt8>) -> Int {
        update { s in
            guard s.receiving else { return 0 }
            var n = 0
            for b in bytes {
                guard s.rx.count < s.capacity else { break }
                s.rx.append(b)
                n += 1
            }
            return n
        }
    }

    /// Waits until the receiver takes bytes (set up, with room in the FIFO) or `giveUp` says so (checked whenever the
    /// FIFO changes and on `wake()`); true when there is room.
    public func waitForRoom(orUntil giveUp: @escaping () -> Bool) -> Bool {
        var room = false
        _ = state.wait(until: { s in
            room = s.receiving && s.rx.count < s.capacity
            return room || giveUp()
        })
        return room
    }

    /// Makes `waitForRoom` check its give-up condition again.
    public func wake() { state.withLock { _ in } }

    /// Runs `body` on the state and drives the interrupt line to the new level (under the
    /// lock, see the type's note); leaving the lock wakes input waiting for room.
    private func update<R>(_ body: (inout State) -> R) -> R {
        state.withLock { s -> R in
            let r = body(&s)
            let want = s.wantsLine
            if want != s.line {
                s.line = want
                interrupts.set(irq: irq, level: want)
            }
            return r
        }
    }
}
