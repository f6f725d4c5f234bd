/* Serial input: receives a line on COM1 through received-data interrupts (IRQ 4), then
 * prints it back with its length and exits through port 0xF4 with status 0x45 ('E').
 * uart_received(c) runs once per byte received. Run with --platform pc --serial stdio. */
#include "pc.h"

static char line[256];
volatile u64 length;
volatile int done;

__attribute__((noinline)) void uart_received(u64 c) { __asm__ volatile("" : : "r"(c) : "memory"); }

__attribute__((used)) void uart_interrupt(void) {
    while (inb(COM1 + 5) & 0x01) {
        u8 c = inb(COM1);
        uart_received(c);
        if (c == '\n') { done = 1; continue; }
        if (!done && length < sizeof line - 1) line[length++] = (char)c;
    }
    pic_eoi(4);
}

INTERRUPT_ENTRY(uart_entry, uart_interrupt);

int guest_main(int cpu, int ncpus) {
    (void)ncpus;
    if (cpu != 0) return 0;
    outb(COM1 + 3, 0x03);
    outb(COM1 + 2, 0x07);        /* FIFOs on and cleared, trigger 1 */
    outb(COM1 + 4, 0x0B);
    idt_set(0x24, uart_entry);
    idt_load();
    pic_init(1 << 4);
    outb(COM1 + 1, 0x01);        /* received-data interrupts */
    serial_puts("echo: ready\n");
    while (!done) __asm__ volatile("sti; hlt; cli");
    outb(COM1 + 1, 0);
    line[length] = 0;
    serial_puts("echo: ");
    serial_u64(length);
    serial_puts(" bytes: ");
    serial_puts(line);
    serial_puts("\n");
    return 0x45;
}
