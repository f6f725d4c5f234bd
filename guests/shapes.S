/* shapes: hand-written functions whose control-flow graphs are known exactly, for the
 * flow-graph tests (built and read, not traced; guest_main returns at once). The comment
 * above each gives its blocks in address order: [instructions] end kind -> successors. */
    .intel_syntax noprefix
    .text

    .globl guest_main
    .type guest_main, @function
guest_main:
    xor eax, eax
    ret
    .size guest_main, . - guest_main

/* B0 [mov add ret] exit */
    .globl shape_straight
    .type shape_straight, @function
shape_straight:
    mov rax, rdi
    add rax, 1
    ret
    .size shape_straight, . - shape_straight

/* B0 [test je] conditional -> B2 taken, B1 not taken; B1 [mov jmp] jump -> B3;
 * B2 [mov] fall-through -> B3; B3 [ret] exit */
    .globl shape_diamond
    .type shape_diamond, @function
shape_diamond:
    test rdi, rdi
    je 1f
    mov eax, 1
    jmp 2f
1:  mov eax, 2
2:  ret
    .size shape_diamond, . - shape_diamond

/* B0 [xor] fall-through -> B1; B1 [add dec jnz] conditional -> B1 taken, B2 not taken;
 * B2 [ret] exit */
    .globl shape_loop
    .type shape_loop, @function
shape_loop:
    xor eax, eax
1:  add rax, rdi
    dec rdi
    jnz 1b
    ret
    .size shape_loop, . - shape_loop

/* B0 [xor mov] fall-through -> B1; B1 [mov] fall-through -> B2;
 * B2 [add dec jnz] conditional -> B2, B3; B3 [dec jnz] conditional -> B1, B4; B4 [ret] exit */
    .globl shape_nested
    .type shape_nested, @function
shape_nested:
    xor eax, eax
    mov rcx, rdi
1:  mov rdx, rsi
2:  add rax, 1
    dec rdx
    jnz 2b
    dec rcx
    jnz 1b
    ret
    .size shape_nested, . - shape_nested

/* A position-independent jump table, indexed through a copy of the compared register:
 * B0 [cmp ja] conditional -> B5 (default) taken, B1 not taken;
 * B1 [mov lea movsxd add jmp] indirect -> table cases 0,3 -> B2, 1 -> B3, 2 -> B4;
 * B2, B3, B4 [mov ret] exit; B5 [xor ret] exit */
    .globl shape_pic_table
    .type shape_pic_table, @function
shape_pic_table:
    cmp edi, 3
    ja .Lpic_default
    mov eax, edi
    lea rdx, [rip + .Lpic_table]
    movsxd rax, dword ptr [rdx + rax*4]
    add rax, rdx
    jmp rax
.Lpic_a:
    mov eax, 10
    ret
.Lpic_b:
    mov eax, 11
    ret
.Lpic_c:
    mov eax, 12
    ret
.Lpic_default:
    xor eax, eax
    ret
    .size shape_pic_table, . - shape_pic_table

/* An absolute jump table: B0 [cmp jae] conditional -> B4 taken, B1 not taken;
 * B1 [jmp] indirect -> case 0 -> B2, case 1 -> B3; B2, B3 [mov ret] exit; B4 [xor ret] exit */
    .globl shape_abs_table
    .type shape_abs_table, @function
shape_abs_table:
    cmp rdi, 2
    jae .Labs_default
    jmp qword ptr [rdi*8 + .Labs_table]
.Labs_a:
    mov eax, 20
    ret
.Labs_b:
    mov eax, 21
    ret
.Labs_default:
    xor eax, eax
    ret
    .size shape_abs_table, . - shape_abs_table

/* A position-independent table with no range check: found by scanning (2 entries).
 * B0 [lea movsxd add jmp] indirect -> B1, B2; B1, B2 [mov ret] exit */
    .globl shape_scan_table
    .type shape_scan_table, @function
shape_scan_table:
    lea rdx, [rip + .Lscan_table]
    movsxd rax, dword ptr [rdx + rdi*4]
    add rax, rdx
    jmp rax
.Lscan_a:
    mov eax, 30
    ret
.Lscan_b:
    mov eax, 31
    ret
    .size shape_scan_table, . - shape_scan_table

/* B0 [test jz] conditional -> B2, B1; B1 [jmp shape_straight] jump out of the graph
 * (a tail call); B2 [ret] exit */
    .globl shape_tail
    .type shape_tail, @function
shape_tail:
    test rdi, rdi
    jz 1f
    jmp shape_straight
1:  ret
    .size shape_tail, . - shape_tail

/* B0 [push call call pop ret] exit; split at calls: B0 [push call] call -> B1,
 * B1 [call] call -> B2, B2 [pop ret] exit */
    .globl shape_calls
    .type shape_calls, @function
shape_calls:
    push rbx
    call shape_straight
    call shape_loop
    pop rbx
    ret
    .size shape_calls, . - shape_calls

/* B0 [mov jmp] indirect, unresolved (no table) */
    .globl shape_indirect
    .type shape_indirect, @function
shape_indirect:
    mov rax, rsi
    jmp rax
    .size shape_indirect, . - shape_indirect

/* B0 [mov] incomplete: 0x06 (push es) is invalid in 64-bit mode */
    .globl shape_bad
    .type shape_bad, @function
shape_bad:
    mov eax, 1
    .byte 0x06
    ret
    .size shape_bad, . - shape_bad

/* B0 [mov add] incomplete: runs past the end of the function */
    .globl shape_runoff
    .type shape_runoff, @function
shape_runoff:
    mov eax, 1
    add eax, 2
    .size shape_runoff, . - shape_runoff
    nop

/* Jumps into the middle of an instruction: B0 [test jnz] conditional -> B2, B1;
 * B1 [mov eax, 0xc3c03148 ; ret] exit; B2 [xor rax, rax ; ret] exit, inside B1's mov:
 * B1 and B2 overlap */
    .globl shape_overlap
    .type shape_overlap, @function
shape_overlap:
    test rdi, rdi
    jnz .Loverlap_whole + 1
.Loverlap_whole:
    .byte 0xb8, 0x48, 0x31, 0xc0, 0xc3
    ret
    .size shape_overlap, . - shape_overlap

/* The entry block is its own loop head: B0 [dec jnz] conditional -> B0 taken, B1 not taken;
 * B1 [ret] exit */
    .globl shape_entry_loop
    .type shape_entry_loop, @function
shape_entry_loop:
    dec rdi
    jnz shape_entry_loop
    ret
    .size shape_entry_loop, . - shape_entry_loop

/* B0 [cli hlt] exit */
    .globl shape_hlt
    .type shape_hlt, @function
shape_hlt:
    cli
    hlt
    .size shape_hlt, . - shape_hlt

    .section .rodata
    .balign 4
.Lpic_table:
    .long .Lpic_a - .Lpic_table, .Lpic_b - .Lpic_table, .Lpic_c - .Lpic_table, .Lpic_a - .Lpic_table
.Lscan_table:
    .long .Lscan_a - .Lscan_table, .Lscan_b - .Lscan_table
    .long 0x40000000
    .balign 8
.Labs_table:
    .quad .Labs_a, .Labs_b
