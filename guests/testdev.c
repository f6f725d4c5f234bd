/* testdev: drives every register of QEMU's pc-testdev (flowtrace --device pc-testdev, on the
 * pc platform) and prints what it read back, then exits with status 0x54 through port 0xF4:
 *   the data register through 0xE0-0xE3 and 0xE8-0xEB at every width and byte offset,
 *   the flush port (a write, then a read: 0),
 *   the interrupt-line port of IRQ 5 (unused by the platform's devices): raising it takes
 *   exactly one interrupt through the PIC, lowering it none,
 *   the MMIO window at 0xFF000000: stores and loads of every width, and an add to memory
 *   (an instruction the host must emulate on MMIO).
 * Without the device every port reads all ones and no interrupt comes. */
#include "pc.h"

static inline void outw(u16 p, u16 v) { __asm__ volatile("outw %0, %1" : : "a"(v), "Nd"(p)); }
static inline void outl(u16 p, u32 v) { __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(p)); }
static inline u16 inw(u16 p) { u16 v; __asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(p)); return v; }
static inline u32 inl(u16 p) { u32 v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(p)); return v; }

volatile u64 irqs;

__attribute__((used)) void line_interrupt(void) {
    irqs++;
    pic_eoi(5);
}

INTERRUPT_ENTRY(line_entry, line_interrupt);

static void hex(const char *label, u64 v) {
    serial_puts(label);
    serial_puts(" 0x");
    for (int s = 60; s >= 0; s -= 4) {
        int d = (v >> s) & 15;
        if (d || s == 0 || (v >> s)) serial_putc("0123456789abcdef"[d]);
    }
    serial_puts("\n");
}

int guest_main(int cpu, int ncpus) {
    (void)ncpus;
    if (cpu != 0) return 0;
    /* The data register. */
    outl(0xE0, 0x11223344);
    hex("testdev: data", inl(0xE0));
    hex("testdev: byte 1", inb(0xE1));
    hex("testdev: word at 2", inw(0xE2));
    outb(0xEA, 0xAA);
    hex("testdev: after byte 0xaa at 0xea", inl(0xE8));
    outw(0xE8, 0xBEEF);
    hex("testdev: after word 0xbeef at 0xe8", inl(0xE0));
    /* The flush port. */
    outl(0xE4, 0x100000);
    hex("testdev: flush reads", inl(0xE4));
    /* IRQ 5 through the PIC. */
    idt_set(0x25, line_entry);
    idt_load();
    pic_init(1 << 5);
    __asm__ volatile("sti");
    outb(0x2005, 1);
    for (volatile int i = 0; i < 1000 && !irqs; i++) {}
    outb(0x2005, 0);
    for (volatile int i = 0; i < 1000; i++) {}
    __asm__ volatile("cli");
    hex("testdev: interrupts on irq 5", irqs);
    hex("testdev: irq port reads", inb(0x2005));
    /* MMIO. */
    volatile u64 *q = (volatile u64 *)0xFF000010ul;
    volatile u32 *d = (volatile u32 *)0xFF000020ul;
    volatile u16 *w = (volatile u16 *)0xFF00FFFEul;
    *q = 0x0102030405060708ull;
    hex("testdev: mmio qword", *q);
    hex("testdev: mmio dword at +4", *(volatile u32 *)0xFF000014ul);
    *d = 5;
    __asm__ volatile("addl $3, (%0)" : : "r"(d) : "memory");
    hex("testdev: mmio after add 3", *d);
    *w = 0x1234;
    hex("testdev: mmio last word", *w);
    return 0x54;
}
