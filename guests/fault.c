/* fault: prints a line, then executes ud2 at the symbol fault_here. There is no IDT, so
 * the #UD cannot be delivered: the host must report a guest fault at fault_here. */
#include "runtime.h"

int guest_main(int cpu, int ncpus) {
    (void)ncpus;
    if (cpu != 0) return 0;
    console_puts("fault: executing ud2\n");
    __asm__ volatile(".globl fault_here\nfault_here: ud2");
    return 0;
}
