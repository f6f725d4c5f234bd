import Devices
import Locking
import Testing

/// Records every level the UART drives its line to.
final class LineRecorder: InterruptLines {
    let levels = Locked<[(irq: UInt32, level: Bool)]>([])
    func set(irq: UInt32, level: Bool) { levels.withLock { $0.append((irq, level)) } }
    var history: [Bool] { levels.withLock { $0.map(\.level) } }
    var current: Bool { levels.withLock { $0.last?.level ?? false } }
}

/// A UART on COM1 with its register file addressed by offset, as a driver sees it.
struct Port {
    let uart: UART16550
    func inb(_ offset: UInt16) -> UInt8 { UInt8(uart.read(port: 0x3F8 + offset, size: 1, context: .init(vcpu: 0))) }
    func outb(_ offset: UInt16, _ v: UInt8) { _ = uart.write(port: 0x3F8 + offset, size: 1, value: UInt32(v), context: .init(vcpu: 0)) }
}

@Suite struct UARTTests {
    let sent = Locked<[UInt8]>([])
    let line = LineRecorder()

    func makePort() -> Port {
        let sent = self.sent
        return Port(uart: UART16550(output: .sink { b in sent.withLock { $0.append(b) } }, interrupts: line))
    }

    /// The checks Linux's 8250 driver makes when it probes a port (autoconfig): the IER
    /// scratch test, the loopback test (MCR = LOOP|OUT2|RTS must read CTS|DCD in MSR), the
    /// FIFO test (IIR bits 6-7 after enabling FIFOs), and the start-up THRE test (enabling
    /// THRI with the transmitter empty raises the interrupt, again after IIR acknowledged it).
    @Test func linuxProbeSequenceFindsA16550A() {
        let p = makePort()
        // Scratch test through IER.
        let savedIER = p.inb(1)
        p.outb(1, 0)
        let scratch2 = p.inb(1) & 0x0F
        p.outb(1, 0x0F)
        let scratch3 = p.inb(1) & 0x0F
        p.outb(1, savedIER)
        #expect(scratch2 == 0 && scratch3 == 0x0F)
        // Loopback test.
        let savedMCR = p.inb(4)
        p.outb(4, 0x10 | 0x0A)
        let status1 = p.inb(6) & 0xF0
        p.outb(4, savedMCR)
        #expect(status1 == 0x90)
        // FIFO test: IIR >> 6 == 3 is a 16550A (2 would be the buggy 16550, 0 an 8250/16450).
        p.outb(2, 0x01)
        #expect(p.inb(2) >> 6 == 3)
        p.outb(2, 0)
        #expect(p.inb(2) >> 6 == 0)
        // The scratch register holds what is written (8250 vs 8250A/16450 check).
        p.outb(7, 0xA5)
        #expect(p.inb(7) == 0xA5)
        // Start-up THRE test (UART_BUG_THRE when the second read finds nothing pending).
        p.outb(3, 0x03)
        p.outb(1, 0x02)
        let iir1 = p.inb(2)
        p.outb(1, 0)
        p.outb(1, 0x02)
        let iir = p.inb(2)
        p.outb(1, 0)
        #expect(iir1 & 0x01 == 0 && iir1 & 0x0E == 0x02)
        #expect(iir & 0x01 == 0 && iir & 0x0E == 0x02)
        // The loopback test sent nothing out.
        #expect(sent.withLock { $0 } == [])
    }

    /// The divisor latch: DLAB set, offsets 0 and 1 are the divisor; cleared, THR and IER again.
    @Test func divisorLatch() {
        let p = makePort()
        p.outb(3, 0x80)
        p.outb(0, 0x01)     // 115200 baud
        p.outb(1, 0x00)
        #expect(p.inb(0) == 0x01 && p.inb(1) == 0x00)
        p.outb(3, 0x03)     // 8N1, DLAB off
        #expect(p.inb(3) == 0x03)
        #expect(p.inb(1) == 0)
        p.outb(0, UInt8(ascii: "x"))
        #expect(sent.withLock { $0 } == [UInt8(ascii: "x")])
    }

    /// Polled output as an early console does it: wait for LSR.THRE, write THR.
    @Test func polledOutput() {
        let p = makePort()
        for c in "hello\n".utf8 {
            var spins = 0
            while p.inb(5) & 0x20 == 0 { spins += 1; if spins > 10 { break } }
            #expect(spins == 0)
            p.outb(0, c)
        }
        #expect(p.inb(5) == 0x60)   // THRE | TEMT, no data
        #expect(String(decoding: sent.withLock { $0 }, as: UTF8.self) == "hello\n")
        #expect(line.history == [])   // no interrupts enabled: the line never moved
    }

    /// Interrupt-driven output: OUT2 and THRI on, the line rises; the handler reads IIR
    /// (THR empty), writes a byte (pending again), finally disables THRI: the line drops.
    @Test func interruptDrivenOutput() {
        let p = makePort()
        p.outb(4, 0x0B)      // DTR RTS OUT2
        #expect(line.history == [])
        p.outb(1, 0x02)
        #expect(line.current == true)
        var out = Array("irq".utf8)
        var interrupts = 0
        while line.current {
            interrupts += 1
            let iir = p.inb(2)
            #expect(iir & 0x0F == 0x02)
            #expect(line.current == false)   // reading IIR acknowledged it
            if out.isEmpty { p.outb(1, 0); break }
            p.outb(0, out.removeFirst())
            #expect(line.current == true)    // empty again at once
        }
        #expect(interrupts == 4)
        #expect(String(decoding: sent.withLock { $0 }, as: UTF8.self) == "irq")
        #expect(line.current == false)
        // Without OUT2 the line stays low whatever is pending (the PC's gate).
        p.outb(4, 0x03)
        p.outb(1, 0x02)
        #expect(line.current == false)
        #expect(p.inb(2) & 0x0F == 0x02)
    }

    /// Input: bytes wait in the FIFO; below the trigger level IIR reports a timeout,
    /// at it received data; RBR returns them in order; the FIFO holds 16.
    @Test func receiveThroughTheFIFO() {
        let p = makePort()
        #expect(p.uart.receive(Array("early".utf8)) == 0)   // no driver set up to receive yet
        p.outb(2, 0x81)      // FIFOs on, trigger 8
        p.outb(4, 0x08)
        p.outb(1, 0x01)      // received-data interrupts
        #expect(p.inb(5) & 0x01 == 0)
        #expect(p.uart.receive(Array("abc".utf8)) == 3)
        #expect(line.current)
        #expect(p.inb(2) == 0xCC)   // FIFOs on, character timeout
        #expect(p.uart.receive(Array("defgh".utf8)) == 5)
        #expect(p.inb(2) == 0xC4)   // at the trigger level: received data
        var got: [UInt8] = []
        while p.inb(5) & 0x01 != 0 { got.append(p.inb(0)) }
        #expect(String(decoding: got, as: UTF8.self) == "abcdefgh")
        #expect(p.inb(2) == 0xC1 && !line.current)
        // Full at 16: the rest is refused, not overrun.
        #expect(p.uart.receive([UInt8](repeating: 0x41, count: 20)) == 16)
        #expect(p.inb(5) & 0x02 == 0)
        // Clearing the receive FIFO (FCR bit 1) empties it.
        p.outb(2, 0x83)
        #expect(p.inb(5) & 0x01 == 0)
        // FIFOs off: a single holding register.
        p.outb(2, 0x00)
        #expect(p.uart.receive(Array("xy".utf8)) == 1)
    }

    /// Loopback: THR comes back in RBR, nothing leaves, modem deltas raise the MS interrupt.
    @Test func loopbackEchoAndModemStatus() {
        let p = makePort()
        p.outb(4, 0x10)
        _ = p.inb(6)          // clear deltas of entering loopback
        p.outb(0, 0x5A)
        #expect(p.inb(5) & 0x01 == 0x01)
        #expect(p.inb(0) == 0x5A)
        #expect(sent.withLock { $0 } == [])
        p.outb(1, 0x08)
        p.outb(4, 0x10 | 0x02)  // RTS -> CTS: delta CTS
        #expect(p.inb(2) & 0x0F == 0x00)
        #expect(p.inb(6) == 0x10 | 0x01)
        #expect(p.inb(2) & 0x0F == 0x01)
        #expect(line.history == [])   // loopback disconnects the interrupt output
        // Out of loopback the modem reads connected.
        p.outb(4, 0)
        #expect(p.inb(6) & 0xF0 == 0xB0)
    }

    /// Input waits for room: a waiter blocked on a full FIFO is released when the guest
    /// reads a byte (no sleep: the waiter's result says what released it).
    @Test func waitForRoomReleasedByARead() async {
        let p = makePort()
        p.outb(2, 0x01)
        p.outb(3, 0x03)
        _ = p.inb(5)          // a polled driver: line programmed, status read
        #expect(p.uart.receive([UInt8](repeating: 1, count: 16)) == 16)
        let uart = p.uart
        async let released = Task.detached { uart.waitForRoom(orUntil: { false }) }.value
        _ = p.inb(0)
        #expect(await released)
    }
}
