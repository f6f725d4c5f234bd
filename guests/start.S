/* Entry of every guest. The loader starts each vCPU here in 64-bit mode at CPL0 with
 * interrupts off, rsp at the vCPU's own stack, rdi = vCPU index, rsi = vCPU count. */
    .section .text.start, "ax"
    .globl _start
_start:
    xor %ebp, %ebp
    call guest_start
    /* guest_start does not return; stop here if it ever does. */
1:  cli
    hlt
    jmp 1b
