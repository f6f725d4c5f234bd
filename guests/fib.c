/* fib: recursive Fibonacci. Prints fib(FIB_N) and how many times fib() was entered
 * (2*fib(n+1)-1: 1973 for n = 15). Ground truth for entry and return probes. */
#include "runtime.h"

#define FIB_N 15

volatile u64 fib_calls;

__attribute__((noipa)) u64 fib(u64 n) {
    fib_calls++;
    if (n < 2) return n;
    return fib(n - 1) + fib(n - 2);
}

int guest_main(int cpu, int ncpus) {
    (void)ncpus;
    if (cpu != 0) return 0;
    u64 r = fib(FIB_N);
    console_puts("fib(");
    console_u64(FIB_N);
    console_puts(") = ");
    console_u64(r);
    console_puts(", calls = ");
    console_u64(fib_calls);
    console_puts("\n");
    return 0;
}
