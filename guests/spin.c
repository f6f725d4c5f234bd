/* spin: vCPU 0 never ends (a pause loop), for timeouts and stop requests. Other vCPUs halt. */
#include "runtime.h"

volatile u64 spins;

int guest_main(int cpu, int ncpus) {
    (void)ncpus;
    if (cpu != 0) return 0;
    console_puts("spin: looping forever\n");
    for (;;) {
        spins++;
        __asm__ volatile("pause");
    }
}
