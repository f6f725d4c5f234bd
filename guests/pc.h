/* PC platform helpers for the test guests (run with --platform pc): port I/O, an IDT with
 * interrupt gates, the legacy PIC and PIT, the local APIC's MMIO page, and polled output
 * on COM1. */
#ifndef GUEST_PC_H
#define GUEST_PC_H

#include "runtime.h"

typedef unsigned short u16;
typedef unsigned char u8;

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }

/* Installs `entry` (an assembly stub ending in iretq) as the interrupt gate for `vector`,
 * and loads the IDT (the loader starts guests without one). */
void idt_set(int vector, void (*entry)(void));
void idt_load(void);

/* Remaps the PIC pair to vectors 0x20-0x2F and masks every line but those in `unmasked`
 * (bit n = IRQ n). End of interrupt for `irq`. */
void pic_init(u16 unmasked);
void pic_eoi(int irq);

/* Programs PIT channel 0 as a rate generator at `hz` (IRQ 0). */
void pit_start(u32 hz);

/* The legacy timer: `entry` on vector 0x20 (IRQ 0), the IDT loaded, the PIC remapped with
 * only IRQ 0 unmasked, the PIT at `hz`. Interrupts stay off until the caller's sti. */
void pit_timer_start(void (*entry)(void), u32 hz);

/* The local APIC's registers (xAPIC MMIO at 0xFEE00000). */
#define LAPIC_BASE 0xFEE00000ul
static inline u32 lapic_read(u32 reg) { return *(volatile u32 *)(LAPIC_BASE + reg); }
static inline void lapic_write(u32 reg, u32 v) { *(volatile u32 *)(LAPIC_BASE + reg) = v; }

/* COM1, polled: waits for THRE before each byte. */
#define COM1 0x3F8
void serial_putc(char c);
void serial_puts(const char *s);
void serial_u64(u64 v);

/* Defines `name` as an interrupt entry that saves the caller-saved registers, calls
 * `handler` (a C function without arguments) and returns with iretq. */
#define INTERRUPT_ENTRY(name, handler)                                                   \
    __asm__(".globl " #name "\n" #name ":\n"                                            \
            "push %rax\npush %rcx\npush %rdx\npush %rsi\npush %rdi\n"                    \
            "push %r8\npush %r9\npush %r10\npush %r11\n"                                 \
            "cld\ncall " #handler "\n"                                                   \
            "pop %r11\npop %r10\npop %r9\npop %r8\n"                                     \
            "pop %rdi\npop %rsi\npop %rdx\npop %rcx\npop %rax\niretq\n");               \
    void name(void)

#endif
