/* COM1 as a driver finds and drives it: the checks Linux's 8250 probe makes (IER scratch,
 * loopback, FIFO type), then interrupt-driven output: IRQ 4 through the PIC, the handler
 * writing the message a byte per THR-empty interrupt until it is sent, then disabling the
 * interrupt. Reports on COM1 and exits through port 0xF4 with status 0x53 ('S').
 * uart_interrupt_hit(n) runs once per interrupt with its number. Needs --platform pc. */
#include "pc.h"

static const char message[] = "interrupt-driven output on COM1\n";
static const char *tx = message;
volatile u64 interrupts, sent;
volatile int tx_done;

__attribute__((noinline)) void uart_interrupt_hit(u64 n) { __asm__ volatile("" : : "r"(n) : "memory"); }

__attribute__((used)) void uart_interrupt(void) {
    interrupts++;
    uart_interrupt_hit(interrupts);
    for (;;) {
        u8 iir = inb(COM1 + 2);
        if (iir & 0x01) break;                 /* nothing (more) pending */
        if ((iir & 0x0E) == 0x02) {            /* THR empty */
            if (*tx) { outb(COM1, (u8)*tx++); sent++; }
            else { outb(COM1 + 1, 0); tx_done = 1; }
        }
    }
    pic_eoi(4);
}

INTERRUPT_ENTRY(uart_entry, uart_interrupt);

int guest_main(int cpu, int ncpus) {
    (void)ncpus;
    if (cpu != 0) return 0;
    u8 save = inb(COM1 + 1);
    outb(COM1 + 1, 0);
    u8 scratch2 = inb(COM1 + 1) & 0x0F;
    outb(COM1 + 1, 0x0F);
    u8 scratch3 = inb(COM1 + 1) & 0x0F;
    outb(COM1 + 1, save);
    u8 mcr = inb(COM1 + 4);
    outb(COM1 + 4, 0x10 | 0x0A);
    u8 status = inb(COM1 + 6) & 0xF0;
    outb(COM1 + 4, mcr);
    outb(COM1 + 2, 0x01);
    u8 fifo = inb(COM1 + 2) >> 6;
    outb(COM1 + 2, 0x00);
    serial_puts("serial: scratch ");
    serial_puts(scratch2 == 0 && scratch3 == 0x0F ? "ok" : "bad");
    serial_puts(", loopback ");
    serial_puts(status == 0x90 ? "ok" : "bad");
    serial_puts(fifo == 3 ? ", 16550A\n" : ", no FIFO\n");

    outb(COM1 + 3, 0x80);        /* DLAB: 115200 baud */
    outb(COM1 + 0, 1);
    outb(COM1 + 1, 0);
    outb(COM1 + 3, 0x03);        /* 8N1 */
    outb(COM1 + 2, 0xC7);        /* FIFOs on and cleared, trigger 14 */
    outb(COM1 + 4, 0x0B);        /* DTR RTS OUT2 */
    idt_set(0x24, uart_entry);
    idt_load();
    pic_init(1 << 4);
    outb(COM1 + 1, 0x02);        /* THR-empty interrupts: the first comes at once */
    while (!tx_done) __asm__ volatile("sti; hlt; cli");
    serial_puts("serial: sent ");
    serial_u64(sent);
    serial_puts(" bytes from ");
    serial_u64(interrupts);
    serial_puts(" interrupts\n");
    return 0x53;
}
