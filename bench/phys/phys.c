/*
 * phys: the machine's physical limits that bound the benchmarks of scripts/bench-compare.
 * Written for ferrocomm. Prints one JSON object per measurement.
 *
 *   phys memcpy SECS BYTES...   single-thread memcpy bandwidth (GB/s copied), pinned to CPU 0
 *   phys tcp-stream SECS        one TCP stream over 127.0.0.1 (GB/s), sender on CPU 0,
 *                               receiver on CPU 1 (when there are 2 CPUs)
 *   phys tcp-pingpong SECS      1-byte ping-pong over 127.0.0.1 with TCP_NODELAY and
 *                               blocking reads: median half round trip (µs)
 *   phys tcp-pingpong-spin SECS the same with non-blocking sockets and spinning reads
 *   phys shm-pingpong SECS      1-byte ping-pong through a shared-memory flag, both sides
 *                               spinning: median half round trip (µs), the floor for any
 *                               shared-memory transport
 *
 * Each figure is the median of 5 trials of SECS/5 seconds (memcpy: per size).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define TRIALS 5

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void die(const char *what)
{
    perror(what);
    exit(1);
}

/* The CPUs this program was allowed at start (children inherit a pinned parent's mask). */
static cpu_set_t allowed;

/* Pins the calling process to the n-th CPU of `allowed` (modulo their count). */
static void pin(int n)
{
    cpu_set_t set = allowed;
    int count = CPU_COUNT(&set), k = 0;
    if (count == 0) return;
    n %= count;
    for (int c = 0; c < CPU_SETSIZE; c++) {
        if (!CPU_ISSET(c, &set)) continue;
        if (k++ == n) {
            CPU_ZERO(&set);
            CPU_SET(c, &set);
            sched_setaffinity(0, sizeof set, &set);
            return;
        }
    }
}

static int cmp_d(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}
static double median(double *v, int n)
{
    qsort(v, n, sizeof(double), cmp_d);
    return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

static void memcpy_bw(double secs, size_t bytes)
{
    char *src, *dst;
    if (posix_memalign((void **)&src, 4096, bytes) || posix_memalign((void **)&dst, 4096, bytes)) die("alloc");
    memset(src, 1, bytes);
    memset(dst, 2, bytes);
    double r[TRIALS];
    for (int t = 0; t < TRIALS; t++) {
        double t0 = now(), el;
        long n = 0;
        do {
            memcpy(dst, src, bytes);
            __asm__ volatile("" ::"r"(dst) : "memory");
            n++;
        } while ((el = now() - t0) < secs / TRIALS);
        r[t] = (double)bytes * n / el / 1e9;
    }
    printf("{\"impl\":\"phys\",\"op\":\"memcpy\",\"bytes\":%zu,\"gbps\":%.4g}\n", bytes, median(r, TRIALS));
    free(src);
    free(dst);
}

/* A connected pair of TCP sockets over 127.0.0.1. */
static void tcp_pair(int *a, int *b)
{
    int l = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    socklen_t len = sizeof sa;
    if (l < 0 || bind(l, (struct sockaddr *)&sa, sizeof sa) || listen(l, 1) ||
        getsockname(l, (struct sockaddr *)&sa, &len))
        die("tcp listen");
    *a = socket(AF_INET, SOCK_STREAM, 0);
    if (*a < 0 || connect(*a, (struct sockaddr *)&sa, sizeof sa)) die("tcp connect");
    *b = accept(l, NULL, NULL);
    if (*b < 0) die("tcp accept");
    close(l);
    int one = 1;
    setsockopt(*a, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    setsockopt(*b, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

static int read_full(int fd, void *buf, size_t n)
{
    size_t got = 0;
    while (got < n) {
        ssize_t r = read(fd, (char *)buf + got, n - got);
        if (r < 0 && (errno == EINTR || errno == EAGAIN)) continue;
        if (r <= 0) return -1;
        got += r;
    }
    return 0;
}
static int write_full(int fd, const void *buf, size_t n)
{
    size_t put = 0;
    while (put < n) {
        ssize_t r = write(fd, (const char *)buf + put, n - put);
        if (r < 0 && (errno == EINTR || errno == EAGAIN)) continue;
        if (r <= 0) return -1;
        put += r;
    }
    return 0;
}

static void tcp_stream(double secs)
{
    const size_t chunk = 1 << 20;
    double r[TRIALS];
    for (int t = 0; t < TRIALS; t++) {
        int a, b;
        tcp_pair(&a, &b);
        pid_t pid = fork();
        if (pid < 0) die("fork");
        if (pid == 0) {
            /* receiver: count bytes until EOF, then report the count */
            pin(1);
            close(a);
            char *buf = malloc(chunk);
            uint64_t total = 0;
            ssize_t n;
            while ((n = read(b, buf, chunk)) > 0) total += n;
            write_full(b, &total, sizeof total);
            _exit(0);
        }
        pin(0);
        close(b);
        char *buf = malloc(chunk);
        memset(buf, 3, chunk);
        double t0 = now();
        while (now() - t0 < secs / TRIALS)
            if (write_full(a, buf, chunk)) die("tcp write");
        shutdown(a, SHUT_WR);
        uint64_t total = 0;
        if (read_full(a, &total, sizeof total)) die("tcp read count");
        r[t] = total / (now() - t0) / 1e9;
        close(a);
        free(buf);
        waitpid(pid, NULL, 0);
    }
    printf("{\"impl\":\"phys\",\"op\":\"tcp_stream\",\"bytes\":%zu,\"gbps\":%.4g}\n", chunk, median(r, TRIALS));
}

static void tcp_pingpong(double secs, int spin)
{
    double r[TRIALS];
    for (int t = 0; t < TRIALS; t++) {
        int a, b;
        tcp_pair(&a, &b);
        pid_t pid = fork();
        if (pid < 0) die("fork");
        char c = 0;
        if (spin) {
            fcntl(a, F_SETFL, O_NONBLOCK);
            fcntl(b, F_SETFL, O_NONBLOCK);
        }
        if (pid == 0) {
            pin(1);
            close(a);
            while (read_full(b, &c, 1) == 0)
                if (write_full(b, &c, 1)) break;
            _exit(0);
        }
        pin(0);
        close(b);
        size_t cap = 1 << 16, n = 0;
        double *s = malloc(cap * sizeof(double)), t0 = now();
        while (now() - t0 < secs / TRIALS && n < cap) {
            double t1 = now();
            if (write_full(a, &c, 1) || read_full(a, &c, 1)) die("tcp ping-pong");
            s[n++] = (now() - t1) / 2 * 1e6;
        }
        close(a);
        waitpid(pid, NULL, 0);
        r[t] = median(s, (int)n);
        free(s);
    }
    printf("{\"impl\":\"phys\",\"op\":\"%s\",\"bytes\":1,\"usec\":%.4g}\n",
           spin ? "tcp_pingpong_spin" : "tcp_pingpong", median(r, TRIALS));
}

static void shm_pingpong(double secs)
{
    double r[TRIALS];
    for (int t = 0; t < TRIALS; t++) {
        _Atomic uint64_t *flag = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
        if (flag == MAP_FAILED) die("mmap");
        atomic_store(flag, 0);
        pid_t pid = fork();
        if (pid < 0) die("fork");
        if (pid == 0) {
            /* answer every odd value with the next even one; UINT64_MAX ends */
            pin(1);
            for (uint64_t want = 1;; want += 2) {
                uint64_t v;
                while ((v = atomic_load_explicit(flag, memory_order_acquire)) != want && v != UINT64_MAX)
                    __builtin_ia32_pause();
                if (v == UINT64_MAX) _exit(0);
                atomic_store_explicit(flag, want + 1, memory_order_release);
            }
        }
        pin(0);
        size_t cap = 1 << 20, n = 0;
        double *s = malloc(cap * sizeof(double)), t0 = now();
        uint64_t v = 0;
        while (now() - t0 < secs / TRIALS && n < cap) {
            double t1 = now();
            atomic_store_explicit(flag, v + 1, memory_order_release);
            while (atomic_load_explicit(flag, memory_order_acquire) != v + 2) __builtin_ia32_pause();
            v += 2;
            s[n++] = (now() - t1) / 2 * 1e6;
        }
        atomic_store(flag, UINT64_MAX);
        waitpid(pid, NULL, 0);
        munmap((void *)flag, 4096);
        r[t] = median(s, (int)n);
        free(s);
    }
    printf("{\"impl\":\"phys\",\"op\":\"shm_pingpong\",\"bytes\":1,\"usec\":%.4g}\n", median(r, TRIALS));
}

int main(int argc, char **argv)
{
    signal(SIGPIPE, SIG_IGN);
    if (sched_getaffinity(0, sizeof allowed, &allowed) != 0) CPU_ZERO(&allowed);
    if (argc < 3) {
        fprintf(stderr, "usage: phys {memcpy SECS BYTES...|tcp-stream SECS|tcp-pingpong[-spin] SECS|shm-pingpong SECS}\n");
        return 2;
    }
    double secs = atof(argv[2]);
    if (!strcmp(argv[1], "memcpy")) {
        pin(0);
        for (int i = 3; i < argc; i++) memcpy_bw(secs, strtoull(argv[i], NULL, 0));
    } else if (!strcmp(argv[1], "tcp-stream")) {
        tcp_stream(secs);
    } else if (!strcmp(argv[1], "tcp-pingpong")) {
        tcp_pingpong(secs, 0);
    } else if (!strcmp(argv[1], "tcp-pingpong-spin")) {
        tcp_pingpong(secs, 1);
    } else if (!strcmp(argv[1], "shm-pingpong")) {
        shm_pingpong(secs);
    } else {
        fprintf(stderr, "phys: unknown measurement %s\n", argv[1]);
        return 2;
    }
    fflush(stdout);
    return 0;
}
