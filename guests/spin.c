/* spin: vCPU 0 never ends: it calls spin_step(0), spin_step(1), ... forever, for timeouts,
 * stop requests and Ctrl-C while tracing; it prints a line once spin_step has run 1000
 * times, and one every 5000 calls after that (console lines while a run goes on). Other
 * vCPUs halt. */
#include "runtime.h"

volatile u64 spins;

__attribute__((noipa)) void spin_step(u64 i) {
    spins = i + 1;
    __asm__ volatile("pause");
}

int guest_main(int cpu, int ncpus) {
    (void)ncpus;
    if (cpu != 0) return 0;
    console_puts("spin: looping forever\n");
    for (u64 i = 0;; i++) {
        spin_step(i);
        /* A line to synchronise on: spin_step has run 1000 times by now. */
        if (i == 999) console_puts("spin: 1000 steps\n");
        if ((i + 1) % 5000 == 0) {
            console_puts("spin: ");
            console_u64(i + 1);
            console_puts(" steps\n");
        }
    }
}
