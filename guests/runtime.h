/* Tiny runtime for the test guests: console on port 0xE9, exit status on port 0xF4. */
#ifndef GUEST_RUNTIME_H
#define GUEST_RUNTIME_H

typedef unsigned long u64;
typedef unsigned int u32;

/* Every guest defines this; it runs on every vCPU. Return value 0: the vCPU halts;
 * anything else ends the whole guest with that exit status. */
int guest_main(int cpu, int ncpus);

void console_putc(char c);
void console_puts(const char *s);
void console_u64(u64 v);
/* Ends the whole guest with `status` (a 32-bit write to port 0xF4). */
__attribute__((noreturn)) void guest_exit(u32 status);
/* Ends this vCPU (hlt with interrupts off). */
__attribute__((noreturn)) void vcpu_halt(void);

#endif
