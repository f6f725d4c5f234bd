/* raw-exits: the physical limit flowtrace's per-hit cost is compared with.
 *
 * Runs a guest ELF on one vCPU with the same boot state flowtrace gives it (identity map
 * of RAM with 2 MiB pages, flat GDT, CPL0 64-bit, no IDT) and the same breakpoint
 * mechanism, but does nothing per hit: for `hlt` it patches 0xF4 at ADDRESS and, at each
 * hit, puts the byte back, single-steps the instruction and patches again; for `hw` it
 * arms DR0 at ADDRESS and steps over on each hit; for `int3` it patches 0xCC with
 * KVM_GUESTDBG_USE_SW_BP; `none` runs untraced; `io` runs untraced and answers the guest's
 * COM1 port exits the least a UART can (bytes written to 0x3F8 collected and written to
 * /dev/null a line at a time, 0x3FD reads "transmitter empty"), counting them as hits: the
 * limit for flowtrace's port-I/O path (part `io`, guest uart-burst.elf). It prints one line:
 *   hits=N elapsed_ns=T exit=STATUS
 * Used by tools/bench (flowtrace-bench part `exits`). Needs /dev/kvm.
 *
 * Usage: raw-exits GUEST.elf ADDRESS none|hlt|hw|int3|io */
#define _GNU_SOURCE
#include <elf.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define RAM (64ull << 20)
#define GDT 0x1000ull
#define PML4 0x2000ull
#define PDPT 0x3000ull
#define PD 0x4000ull

static void die(const char *what) {
    fprintf(stderr, "raw-exits: %s: %s\n", what, strerror(errno));
    exit(1);
}

static void usage(const char *why) {
    fprintf(stderr, "raw-exits: %s\nusage: raw-exits GUEST.elf ADDRESS none|hlt|hw|int3|io\n", why);
    exit(64);
}

static uint64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_nsec;
}

/* Copies the PT_LOAD segments of `path` into RAM at their (identity-mapped) addresses. */
static uint64_t load_elf(const char *path, uint8_t *mem) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) die(path);
    struct stat st;
    if (fstat(fd, &st) < 0) die(path);
    uint8_t *file = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (file == MAP_FAILED) die(path);
    close(fd);
    if ((size_t)st.st_size < sizeof(Elf64_Ehdr)) usage("not an ELF64 file");
    const Elf64_Ehdr *eh = (const Elf64_Ehdr *)file;
    if (memcmp(eh->e_ident, ELFMAG, SELFMAG) != 0 || eh->e_ident[EI_CLASS] != ELFCLASS64 || eh->e_machine != EM_X86_64)
        usage("not an x86-64 ELF64 file");
    if (eh->e_phoff + (uint64_t)eh->e_phnum * sizeof(Elf64_Phdr) > (uint64_t)st.st_size) usage("truncated ELF file");
    for (int i = 0; i < eh->e_phnum; i++) {
        const Elf64_Phdr *ph = (const Elf64_Phdr *)(file + eh->e_phoff) + i;
        if (ph->p_type != PT_LOAD) continue;
        if (ph->p_vaddr < 0x10000 || ph->p_vaddr + ph->p_memsz > RAM - (64 << 10) || ph->p_filesz > ph->p_memsz ||
            ph->p_offset + ph->p_filesz > (uint64_t)st.st_size)
            usage("a segment does not fit in guest RAM");
        memcpy(mem + ph->p_vaddr, file + ph->p_offset, ph->p_filesz);
        memset(mem + ph->p_vaddr + ph->p_filesz, 0, ph->p_memsz - ph->p_filesz);
    }
    uint64_t entry = eh->e_entry;
    munmap(file, (size_t)st.st_size);
    return entry;
}

static void write_tables(uint8_t *mem) {
    uint64_t *gdt = (uint64_t *)(mem + GDT);
    gdt[0] = 0;
    gdt[1] = 0x00AF9A000000FFFFull; /* code, L=1 */
    gdt[2] = 0x00CF92000000FFFFull; /* data */
    *(uint64_t *)(mem + PML4) = PDPT | 3;
    *(uint64_t *)(mem + PDPT) = PD | 3;
    for (uint64_t e = 0; e < RAM >> 21; e++) *(uint64_t *)(mem + PD + e * 8) = (e << 21) | 0x83;
}

static void set_debug(int cpu, uint32_t control, uint64_t dr0, uint64_t dr7) {
    struct kvm_guest_debug d;
    memset(&d, 0, sizeof d);
    d.control = control;
    d.arch.debugreg[0] = dr0;
    d.arch.debugreg[7] = dr7;
    if (ioctl(cpu, KVM_SET_GUEST_DEBUG, &d) < 0) die("KVM_SET_GUEST_DEBUG");
}

int main(int argc, char **argv) {
    if (argc != 4) usage("expected 3 arguments");
    char *end;
    uint64_t address = strtoull(argv[2], &end, 0);
    if (*end != 0) usage("ADDRESS is not a number");
    const char *engine = argv[3];
    int hlt = !strcmp(engine, "hlt"), hw = !strcmp(engine, "hw"), int3 = !strcmp(engine, "int3"), io = !strcmp(engine, "io");
    if (!hlt && !hw && !int3 && !io && strcmp(engine, "none")) usage("unknown engine");
    int sink = io ? open("/dev/null", O_WRONLY | O_CLOEXEC) : -1;
    char line[4096];
    size_t used = 0;
    if ((hlt || int3) && (address < 0x10000 || address >= RAM)) usage("ADDRESS is outside guest RAM");

    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0) die("/dev/kvm");
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (vm < 0) die("KVM_CREATE_VM");
    uint8_t *mem = mmap(NULL, RAM, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (mem == MAP_FAILED) die("mmap");
    struct kvm_userspace_memory_region region = {.slot = 0, .guest_phys_addr = 0, .memory_size = RAM,
                                                 .userspace_addr = (uint64_t)(uintptr_t)mem};
    if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0) die("KVM_SET_USER_MEMORY_REGION");
    uint64_t entry = load_elf(argv[1], mem);
    write_tables(mem);

    int cpu = ioctl(vm, KVM_CREATE_VCPU, 0);
    if (cpu < 0) die("KVM_CREATE_VCPU");
    int run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    if (run_size < 0) die("KVM_GET_VCPU_MMAP_SIZE");
    struct kvm_run *run = mmap(NULL, (size_t)run_size, PROT_READ | PROT_WRITE, MAP_SHARED, cpu, 0);
    if (run == MAP_FAILED) die("mmap kvm_run");

    struct kvm_sregs s;
    if (ioctl(cpu, KVM_GET_SREGS, &s) < 0) die("KVM_GET_SREGS");
    struct kvm_segment code = {.base = 0, .limit = 0xFFFFFFFF, .selector = 0x08, .type = 11, .present = 1,
                               .dpl = 0, .db = 0, .s = 1, .l = 1, .g = 1};
    struct kvm_segment data = {.base = 0, .limit = 0xFFFFFFFF, .selector = 0x10, .type = 3, .present = 1,
                               .dpl = 0, .db = 1, .s = 1, .l = 0, .g = 1};
    s.cs = code;
    s.ds = s.es = s.fs = s.gs = s.ss = data;
    s.gdt.base = GDT;
    s.gdt.limit = 3 * 8 - 1;
    s.idt.base = 0;
    s.idt.limit = 0;
    s.cr0 = 0x80050033;
    s.cr3 = PML4;
    s.cr4 = 0x620;
    s.efer = 0x500;
    if (ioctl(cpu, KVM_SET_SREGS, &s) < 0) die("KVM_SET_SREGS");
    struct kvm_regs r;
    memset(&r, 0, sizeof r);
    r.rip = entry;
    r.rsp = RAM;
    r.rdi = 0;
    r.rsi = 1;
    r.rflags = 2;
    if (ioctl(cpu, KVM_SET_REGS, &r) < 0) die("KVM_SET_REGS");

    uint8_t trap = int3 ? 0xCC : 0xF4, original = 0;
    uint32_t base_control = 0;
    if (hlt || int3) {
        original = mem[address];
        mem[address] = trap;
        if (int3) base_control = KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_SW_BP;
    } else if (hw) {
        base_control = KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP;
    }
    uint64_t base_dr7 = hw ? 1 : 0;
    if (base_control) set_debug(cpu, base_control, hw ? address : 0, base_dr7);

    uint64_t hits = 0, start = now_ns();
    int status = -1, stepping = 0;
    while (status < 0) {
        if (ioctl(cpu, KVM_RUN, 0) < 0) {
            if (errno == EINTR) continue;
            die("KVM_RUN");
        }
        switch (run->exit_reason) {
        case KVM_EXIT_IO:
            if (io && run->io.port == 0x3F8 && run->io.direction == KVM_EXIT_IO_OUT) {
                char c = *((char *)run + run->io.data_offset);
                hits++;
                if (used < sizeof line) line[used++] = c;
                if (c == '\n' || used == sizeof line) {
                    if (write(sink, line, used) < 0) die("write");
                    used = 0;
                }
                break;
            }
            if (io && run->io.port == 0x3FD && run->io.direction == KVM_EXIT_IO_IN) {
                *((uint8_t *)run + run->io.data_offset) = 0x60;
                hits++;
                break;
            }
            if (run->io.port == 0xF4 && run->io.direction == KVM_EXIT_IO_OUT)
                status = (int)*(uint32_t *)((uint8_t *)run + run->io.data_offset);
            break; /* console output (0xE9) is dropped */
        case KVM_EXIT_HLT: {
            if (ioctl(cpu, KVM_GET_REGS, &r) < 0) die("KVM_GET_REGS");
            if (hlt && r.rip == address + 1) {
                /* Ours: put the byte back, step the instruction, patch again. */
                hits++;
                r.rip = address;
                if (ioctl(cpu, KVM_SET_REGS, &r) < 0) die("KVM_SET_REGS");
                mem[address] = original;
                set_debug(cpu, KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP, 0, 0);
                stepping = 1;
                break;
            }
            status = 0; /* the guest's own hlt: the vCPU is done */
            break;
        }
        case KVM_EXIT_DEBUG:
            if (stepping) {
                stepping = 0;
                if (hlt || int3) mem[address] = trap;
                set_debug(cpu, base_control, hw ? address : 0, base_dr7);
                break;
            }
            if ((int3 && run->debug.arch.exception == 3 && run->debug.arch.pc == address) ||
                (hw && run->debug.arch.exception == 1 && (run->debug.arch.dr6 & 1))) {
                hits++;
                if (int3) mem[address] = original;
                set_debug(cpu, KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP, 0, 0);
                stepping = 1;
                break;
            }
            fprintf(stderr, "raw-exits: unexpected debug exit, exception %u at 0x%llx\n", run->debug.arch.exception,
                    (unsigned long long)run->debug.arch.pc);
            return 70;
        default:
            fprintf(stderr, "raw-exits: unexpected exit %u\n", run->exit_reason);
            return 70;
        }
    }
    uint64_t elapsed = now_ns() - start;
    printf("hits=%llu elapsed_ns=%llu exit=%d\n", (unsigned long long)hits, (unsigned long long)elapsed, status);
    return 0;
}
