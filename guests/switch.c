/* switch: the control-flow-graph subject. dispatch(op, x) switches over op with a jump
 * table (cases 0-7 and a default), with a loop in cases 1 and 3, early returns, and a tail
 * call to finish() in case 7 (this file is built with sibling calls on and as
 * position-independent code, so the table is the lea/movsxd/add/jmp form).
 * guest_main calls dispatch(op(i), i) for i = 0..CALLS-1 with op(i) = (5*i + i/3) % 10,
 * counts each case in its own variable and prints the counts and the sum of the results:
 * ground truth for the block hits of `flowtrace run --flow dispatch`. */
#include "runtime.h"

#define CALLS 240

volatile u64 case0_hits, case1_hits, case2_hits, case3_hits, case4_hits, case5_hits, case6_hits,
    case7_hits, default_hits, finish_calls;

__attribute__((noipa)) u64 finish(u64 x) {
    finish_calls++;
    return x ^ 0x5a;
}

__attribute__((noipa)) u64 dispatch(u64 op, u64 x) {
    switch (op) {
    case 0:
        case0_hits++;
        return x + 1;
    case 1: {
        case1_hits++;
        u64 s = 0;
        for (u64 i = 0; i < x % 8; i++) s += i * x;
        return s;
    }
    case 2:
        case2_hits++;
        if (x & 1) return x * 3;
        x /= 2;
        break;
    case 3:
        case3_hits++;
        while (x > 10) x -= 7;
        break;
    case 4:
        case4_hits++;
        return x << 2;
    case 5:
        case5_hits++;
        x = x * x + 5;
        break;
    case 6:
        case6_hits++;
        if (x == 0) return 0;
        x -= 1;
        break;
    case 7:
        case7_hits++;
        return finish(x);
    default:
        default_hits++;
        return 0;
    }
    return x + 100;
}

static void show(const char *name, u64 v) {
    console_puts(name);
    console_u64(v);
}

int guest_main(int cpu, int ncpus) {
    (void)ncpus;
    if (cpu != 0) return 0;
    u64 total = 0;
    for (u64 i = 0; i < CALLS; i++) total += dispatch((5 * i + i / 3) % 10, i);
    show("switch: calls ", CALLS);
    show(" cases ", case0_hits);
    show(" ", case1_hits);
    show(" ", case2_hits);
    show(" ", case3_hits);
    show(" ", case4_hits);
    show(" ", case5_hits);
    show(" ", case6_hits);
    show(" ", case7_hits);
    show(" default ", default_hits);
    show(" finish ", finish_calls);
    show(" total ", total);
    console_puts("\n");
    return 0;
}
