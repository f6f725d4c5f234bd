/* array: fills table[i] = 0x1000*(i+1) + i for i = 0..15, then for each i calls
 * sum(table, i, total), which adds element(table, i) to the running total, and prints the
 * total (557176). Ground truth for indirect-memory probes such as [rdi+rsi*8]:8 on sum or
 * element (both get the table in rdi and i in rsi). */
#include "runtime.h"

#define N 16

volatile u64 table[N];

__attribute__((noipa)) u64 element(const volatile u64 *a, u64 i) { return a[i]; }

__attribute__((noipa)) u64 sum(const volatile u64 *a, u64 i, u64 total) { return total + element(a, i); }

int guest_main(int cpu, int ncpus) {
    (void)ncpus;
    if (cpu != 0) return 0;
    for (u64 i = 0; i < N; i++) table[i] = 0x1000 * (i + 1) + i;
    u64 total = 0;
    for (u64 i = 0; i < N; i++) total = sum(table, i, total);
    console_puts("array: sum ");
    console_u64(total);
    console_puts("\n");
    return 0;
}
