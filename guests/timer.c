/* The PC timer: installs its own IDT, programs the PIC and the PIT at 100 Hz, and idles in
 * hlt with interrupts on while its handler counts TICKS ticks (at 100 Hz: slow enough that a
 * traced handler is done long before the next tick, even nested under TCG); then prints the count on COM1
 * and exits through port 0xF4 with status 0x54 ('T'). timer_tick(n) runs once per tick with
 * the tick number: probes on it see 1, 2, ..., TICKS. Needs --platform pc. */
#include "pc.h"

#define TICKS 20

volatile u64 ticks;
volatile u64 tick_sum;

__attribute__((noinline)) void timer_tick(u64 n) {
    tick_sum += n;
    __asm__ volatile("" ::: "memory");
}

__attribute__((used)) void timer_interrupt(void) {
    /* Ticks past TICKS are not counted: one can arrive between the last hlt's handler and
     * the loop's cli (a timer catching up after the vCPU was held, e.g. nested under TCG). */
    if (ticks < TICKS) {
        ticks++;
        timer_tick(ticks);
    }
    pic_eoi(0);
}

INTERRUPT_ENTRY(timer_entry, timer_interrupt);

int guest_main(int cpu, int ncpus) {
    (void)ncpus;
    if (cpu != 0) return 0;
    pit_timer_start(timer_entry, 100);
    while (ticks < TICKS) __asm__ volatile("sti; hlt; cli");
    serial_puts("timer: ");
    serial_u64(ticks);
    serial_puts(" ticks, sum ");
    serial_u64(tick_sum);
    serial_puts("\n");
    return 0x54;
}
