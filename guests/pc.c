#include "pc.h"

struct gate {
    u16 offset0, selector;
    u8 ist, type;
    u16 offset1;
    u32 offset2, zero;
} __attribute__((packed));

static struct gate idt[256] __attribute__((aligned(16)));

void idt_set(int vector, void (*entry)(void)) {
    u64 a = (u64)entry;
    idt[vector].offset0 = (u16)a;
    idt[vector].selector = 0x08;   /* the loader's 64-bit code segment */
    idt[vector].ist = 0;
    idt[vector].type = 0x8E;       /* present, DPL 0, interrupt gate */
    idt[vector].offset1 = (u16)(a >> 16);
    idt[vector].offset2 = (u32)(a >> 32);
    idt[vector].zero = 0;
}

void idt_load(void) {
    struct { u16 limit; u64 base; } __attribute__((packed)) d = { sizeof idt - 1, (u64)idt };
    __asm__ volatile("lidt %0" : : "m"(d));
}

void pic_init(u16 unmasked) {
    outb(0x20, 0x11); outb(0xA0, 0x11);   /* ICW1: edge, cascade, ICW4 follows */
    outb(0x21, 0x20); outb(0xA1, 0x28);   /* ICW2: vector bases */
    outb(0x21, 0x04); outb(0xA1, 0x02);   /* ICW3: slave on IRQ 2 */
    outb(0x21, 0x01); outb(0xA1, 0x01);   /* ICW4: 8086 mode */
    outb(0x21, (u8)~unmasked); outb(0xA1, (u8)~(unmasked >> 8));
}

void pic_eoi(int irq) {
    if (irq >= 8) outb(0xA0, 0x20);
    outb(0x20, 0x20);
}

void pit_start(u32 hz) {
    u32 divisor = 1193182 / hz;
    outb(0x43, 0x34);                     /* channel 0, lobyte/hibyte, mode 2 */
    outb(0x40, (u8)divisor);
    outb(0x40, (u8)(divisor >> 8));
}

void pit_timer_start(void (*entry)(void), u32 hz) {
    idt_set(0x20, entry);
    idt_load();
    pic_init(1 << 0);
    pit_start(hz);
}

void serial_putc(char c) {
    while (!(inb(COM1 + 5) & 0x20)) {}
    outb(COM1, (u8)c);
}

void serial_puts(const char *s) {
    while (*s) serial_putc(*s++);
}

void serial_u64(u64 v) {
    char buf[21];
    int i = 20;
    buf[i] = 0;
    do { buf[--i] = (char)('0' + v % 10); v /= 10; } while (v);
    serial_puts(buf + i);
}
