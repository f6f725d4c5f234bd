/* The port-I/O benchmark's guest (tools/bench io): 100,000 bytes written straight to COM1's
 * transmit register, a newline every 100, one port exit each; then its vCPU halts. */
#include "runtime.h"

#define BYTES 100000

static inline void outb(unsigned short port, unsigned char v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }

int guest_main(int cpu, int ncpus) {
    (void)ncpus;
    if (cpu != 0) return 0;
    for (u32 i = 0; i < BYTES; i++) outb(0x3F8, i % 100 == 99 ? '\n' : (unsigned char)('a' + i % 26));
    return 0;
}
