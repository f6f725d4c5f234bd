/* The local APIC timer through its MMIO page (0xFEE00000): software-enables the APIC,
 * programs its timer periodic on vector 0x40 (every 10 ms on KVM's 1 GHz APIC clock), and idles in hlt with
 * interrupts on while its handler counts TICKS ticks; then prints the count on COM1 and
 * exits through port 0xF4 with status 0x41 ('A'). apic_tick(n) runs once per tick with the
 * tick number. The PIC stays masked. Needs --platform pc. */
#include "pc.h"

#define TICKS 20
#define APIC_EOI 0xB0
#define APIC_SVR 0xF0
#define APIC_LVT_TIMER 0x320
#define APIC_TIMER_INITIAL 0x380
#define APIC_TIMER_DIVIDE 0x3E0

volatile u64 ticks;
volatile u64 tick_sum;
volatile u64 spurious;

__attribute__((noinline)) void apic_tick(u64 n) {
    tick_sum += n;
    __asm__ volatile("" ::: "memory");
}

__attribute__((used)) void apic_interrupt(void) {
    /* Ticks past TICKS are not counted: one can arrive between the last hlt's handler and
     * the loop's cli (a timer catching up after the vCPU was held, e.g. nested under TCG). */
    if (ticks < TICKS) {
        ticks++;
        apic_tick(ticks);
    }
    lapic_write(APIC_EOI, 0);
}

INTERRUPT_ENTRY(apic_entry, apic_interrupt);

/* Spurious interrupts take no EOI. */
__attribute__((used)) void spurious_interrupt(void) { spurious++; }

INTERRUPT_ENTRY(spurious_entry, spurious_interrupt);

int guest_main(int cpu, int ncpus) {
    (void)ncpus;
    if (cpu != 0) return 0;
    idt_set(0x40, apic_entry);
    idt_set(0xFF, spurious_entry);
    idt_load();
    pic_init(0);
    lapic_write(APIC_SVR, 0x100 | 0xFF);           /* enabled, spurious vector 0xFF */
    lapic_write(APIC_TIMER_DIVIDE, 0x0B);          /* divide by 1 */
    lapic_write(APIC_LVT_TIMER, (1u << 17) | 0x40); /* periodic, vector 0x40 */
    lapic_write(APIC_TIMER_INITIAL, 10000000);
    while (ticks < TICKS) __asm__ volatile("sti; hlt; cli");
    lapic_write(APIC_LVT_TIMER, 1u << 16);         /* masked */
    serial_puts("apic-timer: ");
    serial_u64(ticks);
    serial_puts(" ticks, sum ");
    serial_u64(tick_sum);
    serial_puts(", spurious ");
    serial_u64(spurious);
    serial_puts(", apic id ");
    serial_u64(lapic_read(0x20) >> 24);
    serial_puts("\n");
    return 0x41;
}
