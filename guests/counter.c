/* counter: calls tick() COUNTER_CALLS times with 0, 1, 2, ... and prints the call
 * count and the sum of the arguments. Ground truth for probe counts and rdi values. */
#include "runtime.h"

#define COUNTER_CALLS 1000

volatile u64 tick_calls;
volatile u64 tick_sum;

__attribute__((noipa)) void tick(u64 i) {
    tick_calls++;
    tick_sum += i;
}

int guest_main(int cpu, int ncpus) {
    (void)ncpus;
    if (cpu != 0) return 0;
    for (u64 i = 0; i < COUNTER_CALLS; i++) tick(i);
    console_puts("counter: ");
    console_u64(tick_calls);
    console_puts(" calls, sum ");
    console_u64(tick_sum);
    console_puts("\n");
    return 0;
}
