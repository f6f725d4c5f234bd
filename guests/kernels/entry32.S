/* The 32-bit entry shared by the Multiboot 1, Multiboot 2 and PVH test kernels: the boot
 * header for PROTO, then entry in 32-bit protected mode with paging off (eax = the
 * protocol's magic, ebx = its boot information), a switch to long mode on the kernel's own
 * identity page tables (the low 4 GiB, 2 MiB pages), and kernel_main in 64-bit mode. */
#include "kernel.h"

#if PROTO == PROTO_MULTIBOOT
    .section .multiboot, "a"
    .align 4
    .long 0x1BADB002
    .long 0x00000003                    /* page-aligned modules, memory information */
    .long -(0x1BADB002 + 0x00000003)
#elif PROTO == PROTO_MULTIBOOT2
    .section .multiboot, "a"
    .align 8
mb2_header:
    .long 0xE85250D6, 0, mb2_end - mb2_header, -(0xE85250D6 + (mb2_end - mb2_header))
    .word 1, 0                          /* information request: command line, modules, memory, map */
    .long 24
    .long 1, 3, 4, 6
    .word 3, 0                          /* entry address */
    .long 12
    .long _start32
    .long 0                             /* padding to 8 bytes */
    .word 0, 0                          /* end */
    .long 8
mb2_end:
#elif PROTO == PROTO_PVH
    .section .note.Xen, "a", @note
    .align 4
    .long 4, 4, 18                      /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .long _start32
#endif

    .section .text.entry32, "ax"
    .code32
    .globl _start32
_start32:
    cli
    mov %eax, boot_magic
    mov %ebx, boot_info
    mov $boot_stack_top, %esp
    /* Identity map of the low 4 GiB (modules may sit just below 3 GiB): PML4[0] -> PDPT,
     * PDPT[0..3] -> four page directories of 512 2 MiB pages each. */
    mov $pdpt, %eax
    or $3, %eax
    mov %eax, pml4
    xor %ecx, %ecx
1:  mov %ecx, %eax
    shl $12, %eax
    add $pd, %eax
    or $3, %eax
    mov %eax, pdpt(,%ecx,8)
    inc %ecx
    cmp $4, %ecx
    jne 1b
    xor %ecx, %ecx
1:  mov %ecx, %eax
    shl $21, %eax
    or $0x83, %eax
    mov %eax, pd(,%ecx,8)
    mov %ecx, %eax
    shr $11, %eax                       /* bits 63:32 of the frame: page index / 2048 */
    mov %eax, pd+4(,%ecx,8)
    inc %ecx
    cmp $2048, %ecx
    jne 1b
    mov $pml4, %eax
    mov %eax, %cr3
    mov %cr4, %eax
    or $0x20, %eax                      /* PAE */
    mov %eax, %cr4
    mov $0xC0000080, %ecx               /* EFER.LME */
    rdmsr
    or $0x100, %eax
    wrmsr
    mov %cr0, %eax
    or $0x80000001, %eax                /* PG, PE */
    mov %eax, %cr0
    lgdt gdt64_descriptor
    ljmp $0x08, $start64

    .code64
start64:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov %ax, %fs
    mov %ax, %gs
    mov $boot_stack_top, %rsp
    call kernel_main
1:  cli
    hlt
    jmp 1b

    .section .rodata
    .align 8
gdt64:
    .quad 0
    .quad 0x00AF9A000000FFFF            /* 0x08: 64-bit code */
    .quad 0x00CF92000000FFFF            /* 0x10: data */
gdt64_descriptor:
    .word 3 * 8 - 1
    .long gdt64

    .section .bss
    .align 4096
pml4: .skip 4096
pdpt: .skip 4096
pd:   .skip 4 * 4096
