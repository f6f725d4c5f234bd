/* Interrupts arriving while the guest works: the PIT at 1 kHz ticks into a handler that
 * counts (timer_tick(n)) while vCPU 0 calls busy_step(i) for i = 0..1999 with interrupts
 * on, so ticks land anywhere, also in the middle of a step over a probe on busy_step.
 * Prints both counts on COM1 and exits through port 0xF4 with status 0x62 ('b'). */
#include "pc.h"

#define STEPS 2000

volatile u64 ticks, work;

__attribute__((noinline)) void timer_tick(u64 n) { __asm__ volatile("" : : "r"(n) : "memory"); }

__attribute__((used)) void timer_interrupt(void) {
    ticks++;
    timer_tick(ticks);
    pic_eoi(0);
}

INTERRUPT_ENTRY(timer_entry, timer_interrupt);

__attribute__((noinline)) void busy_step(u64 i) {
    work += i;
    for (volatile int k = 0; k < 20; k++) {}
}

int guest_main(int cpu, int ncpus) {
    (void)ncpus;
    if (cpu != 0) return 0;
    pit_timer_start(timer_entry, 1000);
    __asm__ volatile("sti");
    for (u64 i = 0; i < STEPS; i++) busy_step(i);
    __asm__ volatile("cli");
    serial_puts("busy: ");
    serial_u64(STEPS);
    serial_puts(" steps, work ");
    serial_u64(work);
    serial_puts(", ticks ");
    serial_u64(ticks);
    serial_puts("\n");
    return 0x62;
}
