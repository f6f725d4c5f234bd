/* /init of the initramfs the Linux tests boot a stock kernel with (static, no libc beyond
 * the syscalls it needs): it reports, one line per write(2) on /dev/console, what the
 * running kernel says about itself, then reboots. The tests compare these lines with what
 * flowtrace saw: the CPU count with --vcpus, the kallsyms addresses with probes armed on
 * them, the number and lengths of its writes with hits of a probe on ksys_write.
 *
 *   flowtrace-init: up
 *   flowtrace-init: cpus N                    (online CPUs, from /sys/devices/system/cpu/online)
 *   flowtrace-init: kallsyms NAME ADDRESS     (for each name in SYMBOLS, from /proc/kallsyms)
 *   flowtrace-init: sym ADDRESS TYPE NAME     (with flowtrace.sample=N: every Nth line of /proc/kallsyms
 *                                             that is not a module's)
 *   flowtrace-init: initcall ADDRESS NAME     (with flowtrace.initcalls: for each "calling  NAME+0x0/..."
 *                                             line of the kernel log (syslog(2)) but the console initcalls
 *                                             ("@ 0"), in order, NAME's address from /proc/kallsyms, or
 *                                             0xambiguous when two symbols have that name)
 *   flowtrace-init: toggles DONE of N          (with flowtrace.toggles=N: N writes of 1 and 0 in turn to
 *                                             /proc/sys/kernel/sched_schedstats, each one a jump-label
 *                                             update the kernel makes with text_poke_bp while two
 *                                             children ping-pong a byte through pipes, so the
 *                                             scheduler's patched sites run on every CPU meanwhile;
 *                                             pwrite(2), so ksys_write sees none of them)
 *   flowtrace-init: N writes before this one
 * then reboot(RB_AUTOBOOT): with reboot=k, the i8042 reset; with reboot=t, a triple fault.
 * With flowtrace.end=halt on the command line it halts instead (reboot(RB_HALT_SYSTEM):
 * without ACPI every CPU ends in cli; hlt). */
#include <fcntl.h>
#include <string.h>
#include <sys/klog.h>
#include <sys/mount.h>
#include <signal.h>
#include <sys/reboot.h>
#include <sys/wait.h>
#include <unistd.h>

static const char *const SYMBOLS[] = {"ksys_write", "__x64_sys_reboot", "start_kernel"};
static int writes;

static void say(const char *text) {
    char line[256];
    size_t n = strlen("flowtrace-init: ");
    memcpy(line, "flowtrace-init: ", n);
    size_t t = strlen(text);
    if (t > sizeof line - n - 1) t = sizeof line - n - 1;
    memcpy(line + n, text, t);
    line[n + t] = '\n';
    writes++;
    (void)!write(1, line, n + t + 1);
}

/* Counts the CPUs in a list like "0-1" or "0,2-3". */
static int count_cpus(const char *s) {
    int total = 0;
    while (*s && *s != '\n') {
        int a = 0, b;
        while (*s >= '0' && *s <= '9') a = a * 10 + (*s++ - '0');
        b = a;
        if (*s == '-') { s++; b = 0; while (*s >= '0' && *s <= '9') b = b * 10 + (*s++ - '0'); }
        total += b - a + 1;
        if (*s == ',') s++;
    }
    return total;
}

static char buffer[1 << 20];

/* The kernel's log and its whole /proc/kallsyms, for flowtrace.initcalls. */
static char klog[8 << 20];
static char ksyms[16 << 20];
#define SLOTS (1 << 19)
static char *slot_name[SLOTS];
static char *slot_address[SLOTS];
static char slot_ambiguous[SLOTS];

static unsigned hash(const char *s, size_t n) {
    unsigned h = 2166136261u;
    for (size_t i = 0; i < n; i++) h = (h ^ (unsigned char)s[i]) * 16777619u;
    return h;
}

static size_t read_all(const char *path, char *into, size_t size) {
    int fd = open(path, O_RDONLY | O_NONBLOCK);
    size_t have = 0;
    if (fd < 0) return 0;
    for (;;) {
        ssize_t got = read(fd, into + have, size - 1 - have);
        /* /dev/kmsg gives one record per read and EAGAIN at the end. */
        if (got <= 0) break;
        have += (size_t)got;
        if (have >= size - 1) break;
    }
    into[have] = 0;
    close(fd);
    return have;
}

static void hex_line(const char *tag, const char *address, size_t alen, const char *rest, size_t rlen) {
    char text[240];
    size_t t = strlen(tag);
    if (alen > 16) alen = 16;
    if (rlen > 200 - t - alen) rlen = 200 - t - alen;
    memcpy(text, tag, t);
    memcpy(text + t, "0x", 2);
    memcpy(text + t + 2, address, alen);
    text[t + 2 + alen] = ' ';
    memcpy(text + t + 3 + alen, rest, rlen);
    text[t + 3 + alen + rlen] = 0;
    say(text);
}

/* Every line of /proc/kallsyms into the hash table; every Nth non-module line said. */
static void load_kallsyms(int sample) {
    size_t n = read_all("/proc/kallsyms", ksyms, sizeof ksyms);
    int count = 0;
    for (char *line = ksyms; line < ksyms + n;) {
        char *end = strchr(line, '\n');
        if (!end) break;
        *end = 0;
        char *type = strchr(line, ' ');
        char *name = type ? strchr(type + 1, ' ') : 0;
        if (name) {
            name++;
            char *tab = strchr(name, '\t');
            size_t len = tab ? (size_t)(tab - name) : strlen(name);
            unsigned h = hash(name, len) & (SLOTS - 1);
            while (slot_name[h] && !(strncmp(slot_name[h], name, len) == 0 && slot_name[h][len] == 0)) h = (h + 1) & (SLOTS - 1);
            name[len] = 0;
            if (slot_name[h]) {
                slot_ambiguous[h] = 1; /* two symbols of that name: the log cannot say which */
            } else {
                slot_name[h] = name;
                slot_address[h] = line;
            }
            *type = 0;
            if (sample > 0 && !tab && count++ % sample == 0) hex_line("sym ", line, strlen(line), type + 1, strlen(type + 1));
            if (!tab) *type = ' ';
        }
        line = end + 1;
    }
}

static void report_initcalls(void) {
    /* The whole log buffer (syslog(2) READ_ALL: no /dev/kmsg in this initramfs). */
    int got = klogctl(3, klog, (int)sizeof klog - 1);
    size_t n = got > 0 ? (size_t)got : 0;
    klog[n] = 0;
    for (char *p = klog; p < klog + n && (p = strstr(p, "calling  ")); p++) {
        char *name = p + strlen("calling  ");
        size_t len = 0;
        while (name[len] && name[len] != '+' && name[len] != ' ' && name[len] != '\n') len++;
        /* "@ 0": console initcalls, which start_kernel calls itself (console_init), not
         * through do_one_initcall; the rest run in kernel_init (pid 1) or its workers. */
        char *at = strstr(name, " @ ");
        if (!at || (at[3] == '0' && (at[4] < '0' || at[4] > '9'))) continue;
        unsigned h = hash(name, len) & (SLOTS - 1);
        while (slot_name[h] && !(strncmp(slot_name[h], name, len) == 0 && slot_name[h][len] == 0)) h = (h + 1) & (SLOTS - 1);
        if (!slot_name[h]) continue;
        if (slot_ambiguous[h]) hex_line("initcall ", "ambiguous", 9, name, len);
        else hex_line("initcall ", slot_address[h], strcspn(slot_address[h], " "), name, len);
    }
}

/* A child that passes a byte from one pipe to the other for ever: with two of them the
 * byte goes round, each blocking read a dequeue and each write a wakeup. */
static pid_t relay(int from, int to) {
    pid_t child = fork();
    if (child == 0) {
        char c;
        for (;;) if (read(from, &c, 1) == 1) (void)!write(to, &c, 1);
    }
    return child;
}

/* Appends v in decimal to text. */
static void number(char *text, long v) {
    char digits[24];
    int d = 0;
    do { digits[d++] = (char)('0' + v % 10); v /= 10; } while (v);
    size_t at = strlen(text);
    while (d) text[at++] = digits[--d];
    text[at] = 0;
}

static void toggle_schedstats(long times) {
    int a[2], b[2];
    if (pipe(a) || pipe(b)) return;
    pid_t one = relay(a[0], b[1]), two = relay(b[0], a[1]);
    (void)!write(a[1], "x", 1);
    int fd = open("/proc/sys/kernel/sched_schedstats", O_WRONLY);
    long done = 0;
    for (long i = 0; i < times && fd >= 0; i++) done += pwrite(fd, i % 2 ? "0" : "1", 1, 0) == 1;
    if (fd >= 0) close(fd);
    kill(one, SIGKILL);
    kill(two, SIGKILL);
    waitpid(one, 0, 0);
    waitpid(two, 0, 0);
    char text[64] = "toggles ";
    number(text, done);
    strcat(text, " of ");
    number(text, times);
    say(text);
}

int main(void) {
    mount("proc", "/proc", "proc", 0, 0);
    mount("sysfs", "/sys", "sysfs", 0, 0);
    int console = open("/dev/console", O_WRONLY);
    if (console >= 0 && console != 1) dup2(console, 1);
    say("up");

    char text[200];
    int fd = open("/sys/devices/system/cpu/online", O_RDONLY);
    ssize_t n = fd >= 0 ? read(fd, buffer, 255) : -1;
    buffer[n > 0 ? n : 0] = 0;
    strcpy(text, "cpus ");
    number(text, count_cpus(buffer));
    say(text);

    /* /proc/kallsyms: "ADDRESS TYPE NAME [module]" per line, read in chunks. */
    fd = open("/proc/kallsyms", O_RDONLY);
    size_t have = 0;
    int found[sizeof SYMBOLS / sizeof *SYMBOLS] = {0};
    for (;;) {
        ssize_t got = fd >= 0 ? read(fd, buffer + have, sizeof buffer - 1 - have) : 0;
        if (got <= 0 && have == 0) break;
        have += got > 0 ? (size_t)got : 0;
        buffer[have] = 0;
        char *line = buffer, *end;
        while ((end = strchr(line, '\n'))) {
            *end = 0;
            char *name = strchr(line, ' ');
            if (name && (name = strchr(name + 1, ' '))) {
                name++;
                for (size_t k = 0; k < sizeof SYMBOLS / sizeof *SYMBOLS; k++) {
                    if (!found[k] && strcmp(name, SYMBOLS[k]) == 0) {
                        found[k] = 1;
                        strcpy(text, "kallsyms ");
                        strcat(text, SYMBOLS[k]);
                        strcat(text, " 0x");
                        size_t l = strlen(text);
                        memcpy(text + l, line, (size_t)(strchr(line, ' ') - line));
                        text[l + (size_t)(strchr(line, ' ') - line)] = 0;
                        say(text);
                    }
                }
            }
            line = end + 1;
        }
        size_t rest = have - (size_t)(line - buffer);
        memmove(buffer, line, rest);
        have = rest;
        if (got <= 0) break;
    }

    /* The command line decides the optional reports. */
    fd = open("/proc/cmdline", O_RDONLY);
    n = fd >= 0 ? read(fd, buffer, 4095) : -1;
    buffer[n > 0 ? n : 0] = 0;
    if (fd >= 0) close(fd);
    char *sample = strstr(buffer, "flowtrace.sample=");
    int every = 0;
    if (sample) for (sample += strlen("flowtrace.sample="); *sample >= '0' && *sample <= '9'; sample++) every = every * 10 + (*sample - '0');
    int initcalls = strstr(buffer, "flowtrace.initcalls") != 0;
    if (every > 0 || initcalls) load_kallsyms(every);
    if (initcalls) report_initcalls();
    char *toggles = strstr(buffer, "flowtrace.toggles=");
    long times = 0;
    if (toggles) for (toggles += strlen("flowtrace.toggles="); *toggles >= '0' && *toggles <= '9'; toggles++) times = times * 10 + (*toggles - '0');
    if (times > 0) toggle_schedstats(times);

    strcpy(text, "");
    number(text, writes);
    strcat(text, " writes before this one");
    say(text);
    sync();
    fd = open("/proc/cmdline", O_RDONLY);
    n = fd >= 0 ? read(fd, buffer, 4095) : -1;
    buffer[n > 0 ? n : 0] = 0;
    reboot(strstr(buffer, "flowtrace.end=halt") ? RB_HALT_SYSTEM : RB_AUTOBOOT);
    return 0;
}
