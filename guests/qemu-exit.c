/* qemu-exit: ends through QEMU's isa-debug-exit device (flowtrace --device isa-debug-exit),
 * the way test payloads written for QEMU do. vCPU 0 picks the access by the vCPU count:
 * 1: a byte 0x10 to port 0x501 (QEMU's default iobase), 2: a word 0x1234 to 0x502 (its
 * second port), 3: a dword 0x7 to 0xf4 (iobase=0xf4,iosize=4, what many kernels use). It
 * first prints what the port reads (QEMU's device reads 0). Without the device the write goes
 * nowhere and the guest ends through flowtrace's exit port with 0xEE. */
#include "runtime.h"

static inline unsigned char in8(unsigned short p) { unsigned char v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(p)); return v; }
static inline void out8(unsigned short p, unsigned char v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(p)); }
static inline void out16(unsigned short p, unsigned short v) { __asm__ volatile("outw %0, %1" : : "a"(v), "Nd"(p)); }
static inline void out32(unsigned short p, unsigned int v) { __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(p)); }

int guest_main(int cpu, int ncpus) {
    if (cpu != 0) return 0;
    unsigned short port = ncpus == 1 ? 0x501 : ncpus == 2 ? 0x502 : 0xf4;
    console_puts("qemu-exit: port ");
    console_u64(port);
    console_puts(" reads ");
    console_u64(in8(port));
    console_puts("\n");
    if (ncpus == 1) out8(port, 0x10);
    else if (ncpus == 2) out16(port, 0x1234);
    else out32(port, 0x7);
    guest_exit(0xEE);
    return 0;
}
