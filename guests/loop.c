/* loop: every vCPU calls tick(i) for i = 0 .. LOOP_CALLS-1 (20000 unless built as
 * build/loop-N.elf, which makes N calls), then vCPU 0 prints its count. The benchmarks'
 * guest: one probe location, one hit per call, on as many vCPUs as the machine has. */
#include "runtime.h"

#ifndef LOOP_CALLS
#define LOOP_CALLS 20000
#endif

#define MAX_VCPUS 64

/* One counter per vCPU, a cache line apart, so vCPUs share nothing. */
volatile u64 tick_calls[MAX_VCPUS * 8];

__attribute__((noipa)) void tick(u64 cpu, u64 i) {
    (void)i;
    tick_calls[cpu * 8]++;
}

int guest_main(int cpu, int ncpus) {
    (void)ncpus;
    if (cpu >= MAX_VCPUS) return 0;
    for (u64 i = 0; i < LOOP_CALLS; i++) tick((u64)cpu, i);
    if (cpu == 0) {
        console_puts("loop: ");
        console_u64(tick_calls[0]);
        console_puts(" calls on vcpu 0\n");
    }
    return 0;
}
