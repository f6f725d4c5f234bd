/* What a hobby kernel does first: bytes straight to COM1's transmit register (0x3F8), no
 * set-up, no waiting. Prints two lines and exits through port 0xF4 with status 0 (a hlt
 * would wait forever on the pc platform). Any platform. */
#include "runtime.h"

static inline void outb(unsigned short port, unsigned char v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }

static void com1_puts(const char *s) { while (*s) outb(0x3F8, (unsigned char)*s++); }

int guest_main(int cpu, int ncpus) {
    (void)ncpus;
    if (cpu != 0) return 0;
    com1_puts("hello on COM1\r\n");
    com1_puts("second line\r\n");
    guest_exit(0);
}
