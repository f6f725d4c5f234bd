/* smp: every vCPU runs the same worker; vCPU k does 100*(k+1) work units, each an atomic
 * increment of a shared counter. Each vCPU prints its own line; vCPU 0 waits for all
 * and prints the total, 100*n*(n+1)/2 for n vCPUs. */
#include "runtime.h"

#define UNITS_PER_RANK 100

volatile u64 shared_units;
volatile u64 finished;

__attribute__((noipa)) void work_unit(u64 cpu, u64 i) {
    (void)cpu; (void)i;
    __atomic_fetch_add(&shared_units, 1, __ATOMIC_SEQ_CST);
}

int guest_main(int cpu, int ncpus) {
    u64 units = UNITS_PER_RANK * (u64)(cpu + 1);
    for (u64 i = 0; i < units; i++) work_unit((u64)cpu, i);
    console_puts("vcpu ");
    console_u64((u64)cpu);
    console_puts(": ");
    console_u64(units);
    console_puts(" units\n");
    __atomic_fetch_add(&finished, 1, __ATOMIC_SEQ_CST);
    if (cpu == 0) {
        while (__atomic_load_n(&finished, __ATOMIC_SEQ_CST) < (u64)ncpus) __asm__ volatile("pause");
        console_puts("total: ");
        console_u64(shared_units);
        console_puts(" units on ");
        console_u64((u64)ncpus);
        console_puts(" vcpus\n");
    }
    return 0;
}
