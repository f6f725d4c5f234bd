/* boot-timer: runs a command, times how long until a line of its output contains MARKER.
 *   boot-timer MARKER LOG TIMEOUT_S COMMAND [ARG...]
 * Its stdout and stderr go to LOG. Prints "marker SECONDS total SECONDS status N" (SECONDS
 * -1 when the marker never came; the command is killed after TIMEOUT_S, or 10 s after the
 * marker: what comes after it is not measured). Static, so it runs inside tools/bench
 * boot's nested machine as it is. */
#define _GNU_SOURCE
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    if (argc < 5) { fprintf(stderr, "usage: boot-timer MARKER LOG TIMEOUT_S COMMAND [ARG...]\n"); return 64; }
    const char *marker = argv[1];
    FILE *log = fopen(argv[2], "w");
    double timeout = atof(argv[3]);
    if (!log || timeout <= 0) { fprintf(stderr, "boot-timer: bad LOG or TIMEOUT_S\n"); return 64; }
    int fds[2];
    if (pipe(fds) != 0) { perror("pipe"); return 71; }
    double start = now();
    pid_t child = fork();
    if (child == 0) {
        dup2(fds[1], 1);
        dup2(fds[1], 2);
        close(fds[0]);
        execvp(argv[4], argv + 4);
        perror("exec");
        _exit(127);
    }
    close(fds[1]);
    double marked = -1;
    char buf[65536], line[4096];
    size_t used = 0;
    for (;;) {
        struct pollfd p = {fds[0], POLLIN, 0};
        double until = marked >= 0 && start + marked + 10 < start + timeout ? start + marked + 10 : start + timeout;
        int left = (int)((until - now()) * 1000);
        if (left <= 0) { kill(child, SIGKILL); break; }
        if (poll(&p, 1, left) <= 0) continue;
        ssize_t n = read(fds[0], buf, sizeof buf);
        if (n <= 0) break;
        fwrite(buf, 1, (size_t)n, log);
        for (ssize_t i = 0; i < n; i++) {
            if (buf[i] == '\n' || used == sizeof line - 1) {
                line[used] = 0;
                if (marked < 0 && strstr(line, marker)) marked = now() - start;
                used = 0;
            } else {
                line[used++] = buf[i];
            }
        }
    }
    int status = 0;
    waitpid(child, &status, 0);
    double total = now() - start;
    fclose(log);
    printf("marker %.3f total %.3f status %d\n", marked, total, WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status));
    return 0;
}
