#include "runtime.h"

static inline void outb(unsigned short port, unsigned char v) {
    __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port));
}

static inline void outl(unsigned short port, u32 v) {
    __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port));
}

void console_putc(char c) { outb(0xE9, (unsigned char)c); }

void console_puts(const char *s) {
    while (*s) console_putc(*s++);
}

void console_u64(u64 v) {
    char buf[21];
    int i = 20;
    buf[i] = 0;
    do { buf[--i] = (char)('0' + v % 10); v /= 10; } while (v);
    console_puts(buf + i);
}

void guest_exit(u32 status) {
    outl(0xF4, status);
    for (;;) __asm__ volatile("cli; hlt");
}

void vcpu_halt(void) {
    for (;;) __asm__ volatile("cli; hlt");
}

/* Called from _start with the loader's rdi/rsi. */
__attribute__((noreturn)) void guest_start(int cpu, int ncpus) {
    int status = guest_main(cpu, ncpus);
    if (status) guest_exit((u32)status);
    vcpu_halt();
}
