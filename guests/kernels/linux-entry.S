/* The protected-mode code of the Linux-protocol test kernel, loaded at 1 MiB: the 32-bit
 * entry (unused by the 64-bit protocol, it stops) and at +0x200 the 64-bit entry with
 * rsi = boot_params. Built twice: as a bzImage (linux-setup.S in front) and as a vmlinux
 * ELF with a "Linux" note. */
#include "kernel.h"

    .section .text.head, "ax"
    .code32
    .globl startup_32
startup_32:
    cli
1:  hlt
    jmp 1b

    .org 0x200
    .code64
    .globl startup_64
startup_64:
    cli
    mov %rsi, boot_info(%rip)
    lea boot_stack_top(%rip), %rsp
    call kernel_main
1:  cli
    hlt
    jmp 1b

#ifdef VMLINUX
    .section .note.Linux, "a", @note
    .align 4
    .long 6, 4, 0x100                   /* name "Linux", a 4-byte descriptor */
    .asciz "Linux"
    .align 4
    .long 0
#endif
