/* Reboots the way Linux does with reboot=k: command 0xFE (pulse the reset line) to the
 * i8042's command port 0x64, after waiting for its input buffer to be empty. Prints a line
 * on COM1 first. The run must end "guest reset (i8042)". */
#include "runtime.h"

static inline void outb(unsigned short port, unsigned char v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline unsigned char inb(unsigned short port) { unsigned char v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }

int guest_main(int cpu, int ncpus) {
    (void)ncpus;
    if (cpu != 0) return 0;
    for (const char *s = "reset: rebooting through the i8042\n"; *s; s++) outb(0x3F8, (unsigned char)*s);
    while (inb(0x64) & 0x02) {}
    outb(0x64, 0xFE);
    for (;;) __asm__ volatile("cli; hlt");
}
