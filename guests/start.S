/* Entry of every guest. The loader starts each vCPU here in 64-bit mode at CPL0 with
 * interrupts off, rsp at the vCPU's own stack as after a call (rsp + 8 16-byte aligned,
 * [rsp] an address that ends the guest with eax as its status), rdi = vCPU index, rsi =
 * vCPU count. */
    .section .text.start, "ax"
    .globl _start
_start:
    /* rbp is 0 at the entry; a zero pushed restores the call alignment for guest_start
     * (and keeps every bundled guest's addresses where they were: 2 bytes, as before). */
    push $0
    call guest_start
    /* guest_start does not return; stop here if it ever does. */
1:  cli
    hlt
    jmp 1b
