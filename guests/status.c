/* status: prints a line and ends the guest with exit status 42 through port 0xF4. */
#include "runtime.h"

#define STATUS 42

int guest_main(int cpu, int ncpus) {
    (void)ncpus;
    if (cpu != 0) return 0;
    console_puts("status: exiting with 42\n");
    return STATUS;
}
