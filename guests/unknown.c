/* Probes for hardware flowtrace does not model, as a kernel looking for devices would: the
 * second serial port's line status (0x2FD, read twice), a write to its data port (0x2F8),
 * the game port (0x201, read) and, on the pc platform, the HPET's capability register
 * (MMIO 0xFED00000). Prints what the reads returned (all ones) on COM1 and exits through
 * port 0xF4 with status 0x55 ('U'). */
#include "pc.h"

int guest_main(int cpu, int ncpus) {
    (void)ncpus;
    if (cpu != 0) return 0;
    u64 a = inb(0x2FD), b = inb(0x2FD);
    outb(0x2F8, 'x');
    u64 c = inb(0x201);
    u64 hpet = *(volatile u32 *)0xFED00000ul;
    serial_puts("unknown: com2 ");
    serial_u64(a); serial_puts(" "); serial_u64(b);
    serial_puts(", game port "); serial_u64(c);
    serial_puts(", hpet "); serial_u64(hpet);
    serial_puts("\n");
    return 0x55;
}
