/* The protocol test kernels: each reports, on COM1, what its loader handed it (the magic,
 * the memory map, the command line, each module's address, size and FNV-1a hash, and the
 * protocol's own fields), one fact per line, then ends through port 0xF4 with status 0x4B
 * ('K') when the magic was right (0x4D otherwise). The tests compare the lines with
 * what they passed (--append, --initrd, --module, --memory). */
#include "kernel.h"

typedef unsigned long u64;
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;

u32 boot_magic;
u64 boot_info;
u8 boot_stack[16384] __attribute__((aligned(16)));
__asm__(".globl boot_stack_top\n.set boot_stack_top, boot_stack + 16384");

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port)); }

static void putc(char c) {
    while (!(inb(0x3F8 + 5) & 0x20)) {}
    outb(0x3F8, (u8)c);
}
static void puts(const char *s) { while (*s) putc(*s++); }
static void puthex(u64 v) {
    char buf[19];
    int i = 18;
    buf[i] = 0;
    do { buf[--i] = "0123456789abcdef"[v & 15]; v >>= 4; } while (v);
    buf[--i] = 'x';
    buf[--i] = '0';
    puts(buf + i);
}
static void putdec(u64 v) {
    char buf[21];
    int i = 20;
    buf[i] = 0;
    do { buf[--i] = (char)('0' + v % 10); v /= 10; } while (v);
    puts(buf + i);
}
static void line(const char *key, u64 v) { puts(key); puthex(v); putc('\n'); }

/* FNV-1a, 32 bits, of `n` bytes at physical address `p` (identity-mapped). */
static u32 fnv(u64 p, u64 n) {
    u32 h = 2166136261u;
    for (u64 i = 0; i < n; i++) { h ^= ((const volatile u8 *)p)[i]; h *= 16777619u; }
    return h;
}

/* One memory map entry: "map: BASE SIZE TYPE". */
__attribute__((noinline)) void report_map_entry(u64 base, u64 size, u32 type) {
    puts("map: "); puthex(base); putc(' '); puthex(size); putc(' '); putdec(type); putc('\n');
}

/* One module: "module: START SIZE fnv HASH cmdline TEXT". A probe target: called once per module. */
__attribute__((noinline)) void report_module(u64 start, u64 end, const char *cmdline) {
    puts("module: "); puthex(start); putc(' '); putdec(end - start);
    puts(" fnv "); puthex(fnv(start, end - start));
    puts(" cmdline "); puts(cmdline ? cmdline : ""); putc('\n');
}

static void report_cmdline(const char *s) { puts("cmdline: "); puts(s ? s : ""); putc('\n'); }

static __attribute__((noreturn)) void finish(int ok) {
    puts(ok ? "kernel: done\n" : "kernel: bad magic\n");
    outl(0xF4, ok ? 0x4B : 0x4D);
    for (;;) __asm__ volatile("cli; hlt");
}

static u32 rd32(u64 a) { return *(const volatile u32 *)a; }
static u64 rd64(u64 a) { return *(const volatile u64 *)a; }

void kernel_main(void) {
    u64 i = boot_info;
#if PROTO == PROTO_MULTIBOOT
    puts("boot: multiboot\n");
    line("magic: ", boot_magic);
    u32 flags = rd32(i);
    line("flags: ", flags);
    if (flags & 1) { puts("mem: lower "); putdec(rd32(i + 4)); puts(" upper "); putdec(rd32(i + 8)); putc('\n'); }
    if (flags & 4) report_cmdline((const char *)(u64)rd32(i + 16));
    if (flags & 8)
        for (u32 k = 0; k < rd32(i + 20); k++) {
            u64 m = rd32(i + 24) + 16 * k;
            report_module(rd32(m), rd32(m + 4), (const char *)(u64)rd32(m + 8));
        }
    if (flags & 64)
        for (u64 e = rd32(i + 48); e < (u64)rd32(i + 48) + rd32(i + 44); e += rd32(e) + 4)
            report_map_entry(rd64(e + 4), rd64(e + 12), rd32(e + 20));
    if (flags & 512) { puts("loader: "); puts((const char *)(u64)rd32(i + 64)); putc('\n'); }
    finish(boot_magic == 0x2BADB002);
#elif PROTO == PROTO_MULTIBOOT2
    puts("boot: multiboot2\n");
    line("magic: ", boot_magic);
    u32 total = rd32(i);
    line("size: ", total);
    for (u64 t = i + 8; t < i + total;) {
        u32 type = rd32(t), size = rd32(t + 4);
        if (type == 0) break;
        switch (type) {
        case 1: report_cmdline((const char *)(t + 8)); break;
        case 2: puts("loader: "); puts((const char *)(t + 8)); putc('\n'); break;
        case 3: report_module(rd32(t + 8), rd32(t + 12), (const char *)(t + 16)); break;
        case 4: puts("mem: lower "); putdec(rd32(t + 8)); puts(" upper "); putdec(rd32(t + 12)); putc('\n'); break;
        case 6:
            for (u64 e = t + 16; e < t + size; e += rd32(t + 8)) report_map_entry(rd64(e), rd64(e + 8), rd32(e + 16));
            break;
        default: line("tag: ", type); break;
        }
        t += (size + 7) & ~7u;
    }
    finish(boot_magic == 0x36D76289);
#elif PROTO == PROTO_PVH
    puts("boot: pvh\n");
    line("magic: ", rd32(i));
    line("version: ", rd32(i + 4));
    report_cmdline((const char *)rd64(i + 24));
    for (u32 k = 0; k < rd32(i + 12); k++) {
        u64 m = rd64(i + 16) + 32 * k;
        report_module(rd64(m), rd64(m) + rd64(m + 8), (const char *)rd64(m + 16));
    }
    for (u32 k = 0; k < rd32(i + 48); k++) {
        u64 e = rd64(i + 40) + 24 * k;
        report_map_entry(rd64(e), rd64(e + 8), rd32(e + 16));
    }
    finish(rd32(i) == 0x336EC578);
#elif PROTO == PROTO_LINUX
    puts("boot: linux\n");
    line("header: ", rd32(i + 0x202));
    line("version: ", *(const volatile u16 *)(i + 0x206));
    line("loader: ", *(const volatile u8 *)(i + 0x210));
    report_cmdline((const char *)(u64)rd32(i + 0x228));
    if (rd32(i + 0x218)) report_module(rd32(i + 0x218), (u64)rd32(i + 0x218) + rd32(i + 0x21C), "initrd");
    u8 n = *(const volatile u8 *)(i + 0x1E8);
    for (u8 k = 0; k < n; k++) {
        u64 e = i + 0x2D0 + 20 * (u64)k;
        report_map_entry(rd64(e), rd64(e + 8), rd32(e + 16));
    }
    finish(rd32(i + 0x202) == 0x53726448);
#else
#error "PROTO must name a protocol"
#endif
}
