/* bad-stack: prints a line, then points rsp at an address no page table maps and executes
 * popfq at the symbol bad_popf. With a probe there, the patching engines must read the
 * RFLAGS image popfq loads: the guest's own memory is at fault, not the host. Without a
 * probe the popfq's #PF cannot be delivered (no IDT): a guest fault as well. */
#include "runtime.h"

int guest_main(int cpu, int ncpus) {
    (void)ncpus;
    if (cpu != 0) return 0;
    console_puts("bad-stack: popfq from an unmapped stack\n");
    __asm__ volatile("movabs $0x7fff00000000, %%rax\n mov %%rax, %%rsp\n"
                     ".globl bad_popf\nbad_popf: popfq" ::: "rax", "memory");
    return 0;
}
