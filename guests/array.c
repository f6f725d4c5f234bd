/* array: fills table[i] = 0x1000*(i+1) + i for i = 0..15, then calls element(table, i)
 * for each i and prints the sum of what it returned. Ground truth for indirect-memory
 * probes such as [rdi+rsi*8]:8 on element. */
#include "runtime.h"

#define N 16

volatile u64 table[N];

__attribute__((noipa)) u64 element(const volatile u64 *a, u64 i) { return a[i]; }

int guest_main(int cpu, int ncpus) {
    (void)ncpus;
    if (cpu != 0) return 0;
    for (u64 i = 0; i < N; i++) table[i] = 0x1000 * (i + 1) + i;
    u64 sum = 0;
    for (u64 i = 0; i < N; i++) sum += element(table, i);
    console_puts("array: sum ");
    console_u64(sum);
    console_puts("\n");
    return 0;
}
