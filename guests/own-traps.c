/* A guest with its own breakpoint and single-step handlers, as a debugger inside the
 * guest (or a kernel's kprobes) has: #BP (vector 3) counts the guest's own int3s, #DB
 * (vector 1) counts the single-step traps of a region it runs with TF set. The counts are
 * the guest's, printed on the debug console; flowtrace's engines armed on the same code
 * must leave them exact. Exits through port 0xF4 with status 0x42 ('B') when both counts
 * are what the code implies, 1 otherwise.
 *
 * OWN_INT3=0 leaves the int3 part out (hosts where a guest int3 cannot run: PVM). */
#include "pc.h"

#ifndef OWN_INT3
#define OWN_INT3 1
#endif

#define BREAKPOINTS 5
/* Single-step traps: after each of the 10 nops, the pushfq, the andq and the popfq that
 * clears TF (TF was set when it began). */
#define STEPS 13

volatile u64 breakpoints, steps;

__attribute__((used)) void breakpoint_handler(void) { breakpoints++; }
/* Counts single-step traps as an OS does: DR6.BS says so; DR6 is cleared for the next. */
__attribute__((used)) void debug_handler(void) {
    u64 dr6;
    __asm__ volatile("mov %%dr6, %0" : "=r"(dr6));
    if (dr6 & 0x4000) steps++;
    __asm__ volatile("mov %0, %%dr6" : : "r"(0xFFFF0FF0ul));
}

INTERRUPT_ENTRY(bp_entry, breakpoint_handler);
INTERRUPT_ENTRY(db_entry, debug_handler);

/* One guest int3 per call, at the symbol own_int3. */
__attribute__((noinline)) void breakpoint_site(void) {
    __asm__ volatile(".globl own_int3\nown_int3: int3\n" ::: "memory");
}

/* Runs ten nops with TF set; stepped_nop is the fifth. */
__attribute__((noinline)) void stepped_region(void) {
    __asm__ volatile(
        "pushfq\n orq $0x100, (%%rsp)\n popfq\n"
        "nop\n nop\n nop\n nop\n .globl stepped_nop\nstepped_nop: nop\n nop\n nop\n nop\n nop\n nop\n"
        "pushfq\n andq $~0x100, (%%rsp)\n popfq\n" ::: "memory", "cc");
}

int guest_main(int cpu, int ncpus) {
    (void)ncpus;
    if (cpu != 0) return 0;
    idt_set(1, db_entry);
    idt_set(3, bp_entry);
    idt_load();
    for (int i = 0; OWN_INT3 && i < BREAKPOINTS; i++) breakpoint_site();
    stepped_region();
    console_puts("own-traps: ");
    console_u64(breakpoints);
    console_puts(" breakpoints, ");
    console_u64(steps);
    console_puts(" single steps\n");
    return (breakpoints == (OWN_INT3 ? BREAKPOINTS : 0) && steps == STEPS) ? 0x42 : 1;
}
