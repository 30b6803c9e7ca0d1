/*
 * mpi-bench: ferrocomm-bench's measurements over MPI, to put Open MPI and MPICH beside
 * ferrocomm in the same run (scripts/bench-compare). Written for ferrocomm; the loops are
 * the ones of src/bin/ferrocomm-bench (harness.rs, p2p.rs, coll.rs), the command line and
 * the JSON keys are the same, so the two programs' output is read alike.
 *
 *   mpicc -O2 -o mpi-bench mpi-bench.c
 *   mpirun -np 2 ./mpi-bench latency -b 1 -e 4M --json --impl openmpi --transport shm
 *
 * Subcommands: latency, bandwidth, bibw, allreduce, broadcast, allgather, reduce-scatter,
 * alltoall, barrier. Per size: barrier; warm-up calls (at most -w, and at most a quarter
 * of -T); barrier; timed calls in chunks, each call timed alone with CLOCK_MONOTONIC;
 * after each chunk rank 0 decides the next chunk's length (0: stop) from -n, --min-iters
 * and -T, outside the timed region. Results are checked (a wrong result exits 1). Control
 * traffic uses a duplicate of MPI_COMM_WORLD. After the last size rank 0 prints "# done"
 * (the driver uses it to tell a hang in MPI_Finalize from a hang in the benchmark).
 */
#define _GNU_SOURCE
#include <mpi.h>
#include <getopt.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define TAG 100
#define ACK 101
#define WINDOW_BYTES_CAP (256ull << 20)
#define POISON 127

enum op { LATENCY, BANDWIDTH, BIBW, ALLREDUCE, BROADCAST, ALLGATHER, REDUCE_SCATTER, ALLTOALL, BARRIER };
static const char *const op_cmd[] = { "latency", "bandwidth", "bibw", "allreduce", "broadcast",
                                      "allgather", "reduce-scatter", "alltoall", "barrier" };
static const char *const op_json[] = { "latency", "bandwidth", "bibw", "allreduce", "broadcast",
                                       "allgather", "reduce_scatter", "alltoall", "barrier" };

enum dtype { U8, I8, U16, I16, U32, I32, U64, I64, F32, F64, NTYPES };
static const char *const dtype_name[] = { "u8", "i8", "u16", "i16", "u32", "i32", "u64", "i64", "f32", "f64" };
static const size_t dtype_size[] = { 1, 1, 2, 2, 4, 4, 8, 8, 4, 8 };

typedef struct {
    enum op op;
    uint64_t min_bytes, max_bytes, step_factor, step_bytes;
    uint64_t iters, min_iters, warmup, window;
    double time_s;
    int dtype;
    int json, check_all, root;
    const char *impl, *transport;
} opts_t;

static opts_t o;
static int me, nranks;
static MPI_Comm ctl;

static void die(const char *msg)
{
    fprintf(stderr, "mpi-bench: rank %d: %s\n", me, msg);
    MPI_Abort(MPI_COMM_WORLD, 1);
    exit(1);
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static MPI_Datatype mpi_type(int d)
{
    switch (d) {
    case U8: return MPI_UINT8_T;
    case I8: return MPI_INT8_T;
    case U16: return MPI_UINT16_T;
    case I16: return MPI_INT16_T;
    case U32: return MPI_UINT32_T;
    case I32: return MPI_INT32_T;
    case U64: return MPI_UINT64_T;
    case I64: return MPI_INT64_T;
    case F32: return MPI_FLOAT;
    default: return MPI_DOUBLE;
    }
}

/* ---------------------------------------------------------------- test data (values.rs) */
static unsigned modulus(int n)
{
    unsigned m = 120 / (unsigned)(n > 0 ? n : 1);
    return m < 1 ? 1 : m > 8 ? 8 : m;
}
static unsigned input(int rank, size_t i, int n) { return (unsigned)((rank + i * 3) % modulus(n)); }
static unsigned sum(size_t i, int n)
{
    unsigned s = 0;
    for (int r = 0; r < n; r++) s += input(r, i, n);
    return s;
}

static void set(void *b, size_t i, unsigned v)
{
    switch (o.dtype) {
    case U8: ((uint8_t *)b)[i] = v; break;
    case I8: ((int8_t *)b)[i] = v; break;
    case U16: ((uint16_t *)b)[i] = v; break;
    case I16: ((int16_t *)b)[i] = v; break;
    case U32: ((uint32_t *)b)[i] = v; break;
    case I32: ((int32_t *)b)[i] = v; break;
    case U64: ((uint64_t *)b)[i] = v; break;
    case I64: ((int64_t *)b)[i] = v; break;
    case F32: ((float *)b)[i] = (float)v; break;
    default: ((double *)b)[i] = v; break;
    }
}
static double get(const void *b, size_t i)
{
    switch (o.dtype) {
    case U8: return ((const uint8_t *)b)[i];
    case I8: return ((const int8_t *)b)[i];
    case U16: return ((const uint16_t *)b)[i];
    case I16: return ((const int16_t *)b)[i];
    case U32: return ((const uint32_t *)b)[i];
    case I32: return ((const int32_t *)b)[i];
    case U64: return (double)((const uint64_t *)b)[i];
    case I64: return (double)((const int64_t *)b)[i];
    case F32: return ((const float *)b)[i];
    default: return ((const double *)b)[i];
    }
}
static void poison(void *b, size_t count)
{
    for (size_t i = 0; i < count; i++) set(b, i, POISON);
}
static void *xalloc(size_t bytes)
{
    void *p = NULL;
    if (posix_memalign(&p, 4096, bytes ? bytes : 1) != 0 || !p) die("out of memory");
    memset(p, 0, bytes ? bytes : 1);
    return p;
}

/* First wrong element: writes a message to `why` and returns 1. */
static int mismatch(const void *b, size_t i, unsigned want, const char *what, char *why)
{
    double got = get(b, i);
    if (got == (double)want) return 0;
    snprintf(why, 256, "%s: element %zu is %g, expected %u", what, i, got, want);
    return 1;
}

/* ---------------------------------------------------------------- the kernels */
typedef struct {
    size_t count;          /* elements of the whole operation (see each op) */
    size_t chunk;          /* elements per rank for allgather/reduce_scatter/alltoall */
    uint64_t window;
    void *sbuf, *rbuf;
    void **rwin;           /* window receive buffers */
    MPI_Request *req;
} kern_t;

static kern_t k;

static double call(void)
{
    MPI_Datatype t = mpi_type(o.dtype);
    int c = (int)k.count;
    double t0 = now();
    switch (o.op) {
    case LATENCY:
        if (me == 0) {
            MPI_Send(k.sbuf, c, t, 1, TAG, MPI_COMM_WORLD);
            MPI_Recv(k.rbuf, c, t, 1, TAG, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
            return (now() - t0) / 2.0;
        } else if (me == 1) {
            MPI_Recv(k.rbuf, c, t, 0, TAG, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
            MPI_Send(k.sbuf, c, t, 0, TAG, MPI_COMM_WORLD);
        }
        return 0.0;
    case BANDWIDTH:
    case BIBW: {
        if (me > 1) return 0.0;
        int peer = 1 - me, both = o.op == BIBW, nreq = 0;
        char ack = 0;
        if (me == 1 || both)
            for (uint64_t w = 0; w < k.window; w++)
                MPI_Irecv(k.rwin[w], c, t, peer, TAG, MPI_COMM_WORLD, &k.req[nreq++]);
        if (me == 0 || both)
            for (uint64_t w = 0; w < k.window; w++)
                MPI_Isend(k.sbuf, c, t, peer, TAG, MPI_COMM_WORLD, &k.req[nreq++]);
        MPI_Waitall(nreq, k.req, MPI_STATUSES_IGNORE);
        if (!both) {
            if (me == 0) MPI_Recv(&ack, 1, MPI_CHAR, 1, ACK, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
            else MPI_Send(&ack, 1, MPI_CHAR, 0, ACK, MPI_COMM_WORLD);
        }
        return now() - t0;
    }
    case ALLREDUCE:
        MPI_Allreduce(k.sbuf, k.rbuf, c, t, MPI_SUM, MPI_COMM_WORLD);
        break;
    case BROADCAST:
        MPI_Bcast(k.rbuf, c, t, o.root, MPI_COMM_WORLD);
        break;
    case ALLGATHER:
        MPI_Allgather(k.sbuf, (int)k.chunk, t, k.rbuf, (int)k.chunk, t, MPI_COMM_WORLD);
        break;
    case REDUCE_SCATTER:
        MPI_Reduce_scatter_block(k.sbuf, k.rbuf, (int)k.chunk, t, MPI_SUM, MPI_COMM_WORLD);
        break;
    case ALLTOALL:
        MPI_Alltoall(k.sbuf, (int)k.chunk, t, k.rbuf, (int)k.chunk, t, MPI_COMM_WORLD);
        break;
    case BARRIER:
        MPI_Barrier(MPI_COMM_WORLD);
        break;
    }
    return now() - t0;
}

static void kpoison(void)
{
    switch (o.op) {
    case LATENCY: poison(k.rbuf, k.count); break;
    case BANDWIDTH:
    case BIBW:
        if (k.rwin)
            for (uint64_t w = 0; w < k.window; w++) poison(k.rwin[w], k.count);
        break;
    case BROADCAST:
        if (me != o.root) poison(k.rbuf, k.count);
        break;
    case REDUCE_SCATTER: poison(k.rbuf, k.chunk); break;
    case BARRIER: break;
    default: poison(k.rbuf, k.count); break;
    }
}

static int kcheck(char *why)
{
    size_t i;
    switch (o.op) {
    case LATENCY:
        if (me > 1) return 0;
        for (i = 0; i < k.count; i++)
            if (mismatch(k.rbuf, i, input(1 - me, i, 2), "received", why)) return 1;
        return 0;
    case BANDWIDTH:
    case BIBW:
        if (!k.rwin) return 0;
        for (uint64_t w = 0; w < k.window; w++)
            for (i = 0; i < k.count; i++)
                if (mismatch(k.rwin[w], i, input(me == 0 ? 1 : 0, i, 2), "received", why)) return 1;
        return 0;
    case ALLREDUCE:
        for (i = 0; i < k.count; i++)
            if (mismatch(k.rbuf, i, sum(i, nranks), "allreduce output", why)) return 1;
        return 0;
    case BROADCAST:
        for (i = 0; i < k.count; i++)
            if (mismatch(k.rbuf, i, input(o.root, i, nranks), "broadcast output", why)) return 1;
        return 0;
    case ALLGATHER:
        for (i = 0; i < k.count; i++)
            if (mismatch(k.rbuf, i, input((int)(i / k.chunk), i, nranks), "allgather output", why)) return 1;
        return 0;
    case REDUCE_SCATTER:
        for (i = 0; i < k.chunk; i++)
            if (mismatch(k.rbuf, i, sum(me * k.chunk + i, nranks), "reduce_scatter output", why)) return 1;
        return 0;
    case ALLTOALL:
        for (i = 0; i < k.count; i++) {
            size_t from = i / k.chunk, j = i % k.chunk;
            if (mismatch(k.rbuf, i, input((int)from, me * k.chunk + j, nranks), "alltoall output", why)) return 1;
        }
        return 0;
    case BARRIER: return 0;
    }
    return 0;
}

/* Sets up buffers for `count` elements (already rounded as the op needs). */
static void ksetup(size_t count, uint64_t window)
{
    size_t esz = dtype_size[o.dtype], i;
    memset(&k, 0, sizeof k);
    k.count = count;
    k.chunk = nranks > 0 ? count / nranks : count;
    k.window = window;
    switch (o.op) {
    case LATENCY:
        k.sbuf = xalloc(count * esz);
        k.rbuf = xalloc(count * esz);
        for (i = 0; i < count; i++) set(k.sbuf, i, input(me, i, 2));
        break;
    case BANDWIDTH:
    case BIBW:
        k.sbuf = xalloc(count * esz);
        for (i = 0; i < count; i++) set(k.sbuf, i, input(me, i, 2));
        k.req = calloc(2 * window, sizeof(MPI_Request));
        if (me == 1 || (o.op == BIBW && me == 0)) {
            k.rwin = calloc(window, sizeof(void *));
            for (uint64_t w = 0; w < window; w++) k.rwin[w] = xalloc(count * esz);
        }
        break;
    case ALLREDUCE:
    case ALLTOALL:
        k.sbuf = xalloc(count * esz);
        k.rbuf = xalloc(count * esz);
        for (i = 0; i < count; i++) set(k.sbuf, i, input(me, i, nranks));
        break;
    case BROADCAST:
        k.rbuf = xalloc(count * esz);
        if (me == o.root)
            for (i = 0; i < count; i++) set(k.rbuf, i, input(me, i, nranks));
        break;
    case ALLGATHER:
        k.sbuf = xalloc(k.chunk * esz);
        k.rbuf = xalloc(count * esz);
        for (i = 0; i < k.chunk; i++) set(k.sbuf, i, input(me, me * k.chunk + i, nranks));
        break;
    case REDUCE_SCATTER:
        k.sbuf = xalloc(count * esz);
        k.rbuf = xalloc(k.chunk * esz);
        for (i = 0; i < count; i++) set(k.sbuf, i, input(me, i, nranks));
        break;
    case BARRIER: break;
    }
}

static void kfree(void)
{
    if (k.rwin)
        for (uint64_t w = 0; w < k.window; w++) free(k.rwin[w]);
    free(k.rwin);
    free(k.req);
    free(k.sbuf);
    free(k.rbuf);
}

/* ---------------------------------------------------------------- the loop (harness.rs) */
static uint64_t next_chunk(uint64_t max, uint64_t min, double target, uint64_t done, uint64_t chunk,
                           double elapsed)
{
    if (done >= max) return 0;
    uint64_t left = max - done, need = min > done ? min - done : 0, next = chunk * 2;
    if (next < 1) next = 1;
    if (target > 0) {
        if (elapsed >= target) {
            if (need == 0) return 0;
            uint64_t r = need < next ? need : next;
            return r < left ? r : left;
        }
        if (done > 0) {
            double per = elapsed / done;
            uint64_t fits = per > 0 ? (uint64_t)ceil((target - elapsed) / per) : UINT64_MAX;
            if (fits < 1) fits = 1;
            uint64_t floor_ = need < next ? need : next;
            if (fits < floor_) fits = floor_;
            if (fits < next) next = fits;
        }
    }
    if (next > left) next = left;
    return next < 1 ? 1 : next;
}

/* Runs calls in chunks until rank 0 says stop; fills samples (if not NULL). Returns the
 * number of calls; *wrong is set when --check all found a wrong result. */
static uint64_t phase(uint64_t max, uint64_t min, double target, double **samples, size_t *cap,
                      int keep, int *wrong, char *why)
{
    uint64_t done = 0, chunk = max < 1 ? max : 1;
    double start = now();
    while (chunk > 0) {
        for (uint64_t j = 0; j < chunk; j++) {
            double s = call();
            if (keep) {
                if (done + j >= *cap) {
                    *cap = *cap ? *cap * 2 : 1024;
                    *samples = realloc(*samples, *cap * sizeof(double));
                    if (!*samples) die("out of memory");
                }
                (*samples)[done + j] = s;
                if (o.check_all) {
                    if (!*wrong) *wrong = kcheck(why);
                    kpoison();
                }
            }
        }
        done += chunk;
        uint64_t next = 0;
        if (me == 0) next = next_chunk(max, min, target, done, chunk, now() - start);
        MPI_Bcast(&next, 1, MPI_UINT64_T, 0, ctl);
        chunk = next;
    }
    return done;
}

static int cmp_d(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}
static double median(double *v, size_t n)
{
    if (n == 0) return 0;
    qsort(v, n, sizeof(double), cmp_d);
    return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2.0;
}
static double quantile_sorted(const double *v, size_t n, double q)
{
    if (n == 0) return 0;
    size_t i = (size_t)ceil(n * q);
    if (i < 1) i = 1;
    if (i > n) i = n;
    return v[i - 1];
}

static double busbw_factor(void)
{
    double n = nranks;
    switch (o.op) {
    case ALLREDUCE: return 2.0 * (n - 1) / n;
    case ALLGATHER:
    case REDUCE_SCATTER:
    case ALLTOALL: return (n - 1) / n;
    default: return 1.0;
    }
}

static double gbps(double bytes, double usec) { return usec > 0 ? bytes / usec / 1e3 : 0; }

static void print_row(uint64_t bytes, size_t count, double usec, double umin, double uthird, int is_p2p,
                      double algbw, double busbw, uint64_t iters, uint64_t window)
{
    if (o.json) {
        printf("{\"impl\":\"%s\",\"op\":\"%s\",\"transport\":\"%s\",\"ranks\":%d,\"dtype\":\"%s\","
               "\"bytes\":%llu,\"count\":%zu,\"usec\":%.6g,\"usec_min\":%.6g,\"%s\":%.6g,"
               "\"algbw_gbps\":%.6g,\"busbw_gbps\":%.6g,\"iters\":%llu",
               o.impl, op_json[o.op], o.transport, nranks, dtype_name[o.dtype],
               (unsigned long long)bytes, count, usec, umin, is_p2p ? "usec_p99" : "usec_max", uthird,
               algbw, busbw, (unsigned long long)iters);
        if (o.op == BANDWIDTH || o.op == BIBW) printf(",\"window\":%llu", (unsigned long long)window);
        if (o.op == BROADCAST) printf(",\"root\":%d", o.root);
        printf(",\"check\":\"ok\"}\n");
    } else {
        printf("  %12llu %12zu %5s %11.3f %11.3f %11.3f %9.3f %9.3f %8llu %5s\n",
               (unsigned long long)bytes, count, dtype_name[o.dtype], usec, umin, uthird, algbw, busbw,
               (unsigned long long)iters, "ok");
    }
    fflush(stdout);
}

/* One size. */
static void point(size_t count)
{
    size_t esz = dtype_size[o.dtype];
    uint64_t bytes = (uint64_t)count * esz;
    int is_p2p = o.op == LATENCY || o.op == BANDWIDTH || o.op == BIBW;
    uint64_t window = 1;
    if (o.op == BANDWIDTH || o.op == BIBW) {
        uint64_t cap = WINDOW_BYTES_CAP / (bytes ? bytes : 1);
        window = o.window < (cap ? cap : 1) ? o.window : (cap ? cap : 1);
        if (window < 1) window = 1;
    }
    ksetup(count, window);
    double *samples = NULL;
    size_t cap = 0;
    int wrong = 0;
    char why[256] = "";
    uint64_t min_iters = o.min_iters < (o.iters ? o.iters : 1) ? o.min_iters : (o.iters ? o.iters : 1);

    MPI_Barrier(ctl);
    if (o.warmup > 0) phase(o.warmup, 1, o.time_s / 4, NULL, NULL, 0, &wrong, why);
    kpoison();
    MPI_Barrier(ctl);
    uint64_t iters = phase(o.iters ? o.iters : 1, min_iters, o.time_s, &samples, &cap, 1, &wrong, why);
    if (!o.check_all) wrong = kcheck(why);
    if (wrong) fprintf(stderr, "mpi-bench: rank %d: wrong result: %s\n", me, why);
    int any_wrong = 0;
    MPI_Allreduce(&wrong, &any_wrong, 1, MPI_INT, MPI_MAX, ctl);
    if (any_wrong) {
        if (me == 0) fprintf(stderr, "mpi-bench: a rank received or computed wrong data\n");
        MPI_Abort(MPI_COMM_WORLD, 1);
    }

    if (is_p2p) {
        if (me == 0) {
            double scale = 1e6 / (double)window;
            double usec = median(samples, iters) * scale;
            double dirs = o.op == BIBW ? 2.0 : 1.0;
            double algbw = gbps(dirs * bytes, usec);
            print_row(bytes, count, usec, samples[0] * scale, quantile_sorted(samples, iters, 0.99) * scale, 1,
                      algbw, algbw * busbw_factor(), iters, window);
        }
    } else {
        double mine = median(samples, iters) * 1e6;
        double *all = me == 0 ? calloc(nranks, sizeof(double)) : NULL;
        MPI_Gather(&mine, 1, MPI_DOUBLE, all, 1, MPI_DOUBLE, 0, ctl);
        if (me == 0) {
            double lo = all[0], hi = all[0], s = 0;
            for (int r = 0; r < nranks; r++) {
                s += all[r];
                if (all[r] < lo) lo = all[r];
                if (all[r] > hi) hi = all[r];
            }
            double usec = s / nranks, algbw = gbps((double)bytes, usec);
            print_row(bytes, count, usec, lo, hi, 0, algbw, algbw * busbw_factor(), iters, 0);
        }
        free(all);
    }
    free(samples);
    kfree();
}

/* ---------------------------------------------------------------- command line */
static int parse_size(const char *s, uint64_t *out)
{
    char *end;
    unsigned long long v = strtoull(s, &end, 10);
    if (end == s) return -1;
    uint64_t m = 1;
    if (*end == 'k' || *end == 'K') m = 1ull << 10, end++;
    else if (*end == 'm' || *end == 'M') m = 1ull << 20, end++;
    else if (*end == 'g' || *end == 'G') m = 1ull << 30, end++;
    if (*end == 'i' || *end == 'I') end++;
    if (*end == 'b' || *end == 'B') end++;
    if (*end) return -1;
    *out = v * m;
    return 0;
}

static void usage(void)
{
    if (me == 0)
        fprintf(stderr,
                "usage: mpi-bench {latency|bandwidth|bibw|allreduce|broadcast|allgather|reduce-scatter|"
                "alltoall|barrier}\n"
                "  [-b MIN] [-e MAX] [-f FACTOR] [-i STEP] [-n ITERS] [--min-iters N] [-T SECS] [-w WARMUP]\n"
                "  [-d TYPE] [-W WINDOW] [--root R] [--check last|all] [--json] [--impl NAME] [--transport NAME]\n");
}

int main(int argc, char **argv)
{
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &me);
    MPI_Comm_size(MPI_COMM_WORLD, &nranks);
    MPI_Comm_dup(MPI_COMM_WORLD, &ctl);

    char lib[MPI_MAX_LIBRARY_VERSION_STRING];
    int len;
    MPI_Get_library_version(lib, &len);
    o.impl = strstr(lib, "Open MPI") ? "openmpi" : strstr(lib, "MPICH") ? "mpich" : "mpi";
    o.transport = "unknown";
    o.step_factor = 2;
    o.iters = 10000;
    o.min_iters = 10;
    o.time_s = 0.5;
    o.warmup = 10;
    o.window = 64;
    o.dtype = -1;
    int have_min = 0, have_max = 0;

    if (argc < 2) {
        usage();
        MPI_Abort(MPI_COMM_WORLD, 2);
    }
    int found = 0;
    for (int i = 0; i <= BARRIER; i++)
        if (!strcmp(argv[1], op_cmd[i])) o.op = i, found = 1;
    if (!found) {
        usage();
        MPI_Abort(MPI_COMM_WORLD, 2);
    }
    static const struct option longs[] = {
        { "minbytes", 1, 0, 'b' }, { "maxbytes", 1, 0, 'e' }, { "stepfactor", 1, 0, 'f' },
        { "stepbytes", 1, 0, 'i' }, { "iters", 1, 0, 'n' },   { "min-iters", 1, 0, 'm' },
        { "time", 1, 0, 'T' },      { "warmup", 1, 0, 'w' },  { "dtype", 1, 0, 'd' },
        { "window", 1, 0, 'W' },    { "root", 1, 0, 'r' },    { "check", 1, 0, 'c' },
        { "json", 0, 0, 'j' },      { "impl", 1, 0, 'I' },    { "transport", 1, 0, 't' },
        { 0, 0, 0, 0 }
    };
    int c;
    optind = 2;
    while ((c = getopt_long(argc, argv, "b:e:f:i:n:T:w:d:W:", longs, NULL)) != -1) {
        switch (c) {
        case 'b': if (parse_size(optarg, &o.min_bytes)) goto bad; have_min = 1; break;
        case 'e': if (parse_size(optarg, &o.max_bytes)) goto bad; have_max = 1; break;
        case 'f': o.step_factor = strtoull(optarg, NULL, 10); break;
        case 'i': if (parse_size(optarg, &o.step_bytes)) goto bad; break;
        case 'n': o.iters = strtoull(optarg, NULL, 10); break;
        case 'm': o.min_iters = strtoull(optarg, NULL, 10); break;
        case 'T': o.time_s = atof(optarg); break;
        case 'w': o.warmup = strtoull(optarg, NULL, 10); break;
        case 'W': o.window = strtoull(optarg, NULL, 10); break;
        case 'r': o.root = atoi(optarg); break;
        case 'c': o.check_all = !strcmp(optarg, "all"); break;
        case 'j': o.json = 1; break;
        case 'I': o.impl = optarg; break;
        case 't': o.transport = optarg; break;
        case 'd':
            for (int t = 0; t < NTYPES; t++)
                if (!strcmp(optarg, dtype_name[t])) o.dtype = t;
            if (o.dtype < 0) die("unknown element type (u8 i8 u16 i16 u32 i32 u64 i64 f32 f64)");
            break;
        default:
        bad:
            usage();
            MPI_Abort(MPI_COMM_WORLD, 2);
        }
    }
    int is_p2p = o.op == LATENCY || o.op == BANDWIDTH || o.op == BIBW;
    if (o.dtype < 0) o.dtype = is_p2p ? U8 : F32;
    if (!have_min) o.min_bytes = is_p2p ? 1 : 4;
    if (!have_max) o.max_bytes = is_p2p ? (4ull << 20) : (64ull << 20);
    if (o.step_factor < 2) o.step_factor = 2;
    if (is_p2p && nranks < 2) die("point-to-point benchmarks need at least 2 ranks");
    if (o.root < 0 || o.root >= nranks) die("--root out of range");

    if (me == 0 && !o.json) {
        printf("# mpi-bench %s (%s): %d ranks, transport %s, type %s\n#\n", op_json[o.op], o.impl, nranks,
               o.transport, dtype_name[o.dtype]);
        printf("# %12s %12s %5s %11s %11s %11s %9s %9s %8s %5s\n", "size", "count", "type", "time", "min",
               is_p2p ? "p99" : "max", "algbw", "busbw", "iters", "check");
    }
    size_t esz = dtype_size[o.dtype];
    uint64_t last = UINT64_MAX;
    if (o.op == BARRIER) {
        point(0);
    } else {
        for (uint64_t s = o.min_bytes; s <= o.max_bytes;) {
            size_t count = s / esz;
            if (o.op == ALLGATHER || o.op == REDUCE_SCATTER || o.op == ALLTOALL) count -= count % nranks;
            uint64_t bytes = (uint64_t)count * esz;
            if (bytes != last && (count > 0 || is_p2p)) point(count);
            last = bytes;
            uint64_t next = o.step_bytes ? s + o.step_bytes : s == 0 ? 1 : s * o.step_factor;
            if (next <= s) break;
            s = next;
        }
    }
    MPI_Barrier(ctl);
    if (me == 0) {
        printf("# done\n");
        fflush(stdout);
    }
    MPI_Comm_free(&ctl);
    MPI_Finalize();
    return 0;
}
