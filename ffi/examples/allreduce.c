/*
 * Collectives from C: every rank all-reduces a vector (blocking, in place and out of place,
 * and non-blocking), averages a set of "gradients" with the bucketed
 * ferrocomm_allreduce_many, gathers everyone's rank, and all-reduces in a sub-communicator
 * of the even or odd ranks. Every result is checked against the value it must have.
 *
 *   cc allreduce.c -lferrocomm -o allreduce
 *   ferrorun --nproc-per-node 3 -- ./allreduce [ELEMENTS]
 */
#include <ferrocomm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#define CHECK(call)                                                                     \
    do {                                                                                \
        ferrocomm_result rc_ = (call);                                                  \
        if (rc_ != FERROCOMM_OK) {                                                      \
            fprintf(stderr, "allreduce: %s failed: %s: %s\n", #call,                   \
                    ferrocomm_strerror(rc_), ferrocomm_last_error());                   \
            exit(1);                                                                    \
        }                                                                               \
    } while (0)

static size_t wrong = 0;

static void expect(const char *what, size_t rank, double got, double want) {
    if (got != want) {
        if (wrong++ < 5)
            fprintf(stderr, "rank %zu: %s: got %g, want %g\n", rank, what, got, want);
    }
}

int main(int argc, char **argv) {
    size_t n = argc > 1 ? (size_t)strtoull(argv[1], NULL, 10) : 100000;
    ferrocomm_comm_t *comm = NULL;
    CHECK(ferrocomm_init(&comm));
    size_t rank, size;
    CHECK(ferrocomm_comm_rank(comm, &rank));
    CHECK(ferrocomm_comm_size(comm, &size));
    /* Sum over ranks r of (r + 1): */
    double ranks_sum = (double)(size * (size + 1) / 2);

    float *x = malloc(n * sizeof *x), *y = malloc(n * sizeof *y);
    if (!x || !y) return 1;

    /* 1. Out of place, sum: element i of rank r is (r + 1) * (i % 7). */
    for (size_t i = 0; i < n; i++) x[i] = (float)((rank + 1) * (i % 7));
    CHECK(ferrocomm_allreduce(comm, x, y, n, FERROCOMM_F32, FERROCOMM_SUM));
    for (size_t i = 0; i < n; i++) expect("sum", rank, y[i], ranks_sum * (double)(i % 7));

    /* 2. In place, max. */
    CHECK(ferrocomm_allreduce(comm, FERROCOMM_IN_PLACE, x, n, FERROCOMM_F32, FERROCOMM_MAX));
    for (size_t i = 0; i < n; i++) expect("max", rank, x[i], (double)(size * (i % 7)));

    /* 3. Non-blocking, in place: x is not touched until the request has completed. */
    ferrocomm_request_t *req = NULL;
    for (size_t i = 0; i < n; i++) x[i] = (float)rank;
    CHECK(ferrocomm_iallreduce(comm, FERROCOMM_IN_PLACE, x, n, FERROCOMM_F32, FERROCOMM_MIN,
                               &req));
    CHECK(ferrocomm_barrier(comm)); /* other work meanwhile */
    ferrocomm_status_t st;
    CHECK(ferrocomm_wait(req, &st));
    if (st.bytes != n * sizeof(float)) expect("iallreduce bytes", rank, (double)st.bytes, 0);
    for (size_t i = 0; i < n; i++) expect("min", rank, x[i], 0.0);

    /* 4. Gradients: three buffers of different sizes, averaged in buckets of 4 KiB. */
    enum { NB = 3 };
    size_t counts[NB] = {1000, 17, 3000};
    double *grads[NB];
    void *ptrs[NB];
    for (size_t b = 0; b < NB; b++) {
        grads[b] = malloc(counts[b] * sizeof(double));
        if (!grads[b]) return 1;
        for (size_t i = 0; i < counts[b]; i++) grads[b][i] = (double)(rank + b + i);
        ptrs[b] = grads[b];
    }
    CHECK(ferrocomm_allreduce_many(comm, ptrs, counts, NB, FERROCOMM_F64, FERROCOMM_AVG, 4096));
    for (size_t b = 0; b < NB; b++) {
        for (size_t i = 0; i < counts[b]; i++)
            expect("avg", rank, grads[b][i], (double)(size - 1) / 2.0 + (double)(b + i));
        free(grads[b]);
    }

    /* 5. all_gather of ranks. */
    int64_t *all = malloc(size * sizeof *all);
    if (!all) return 1;
    int64_t me = (int64_t)rank;
    CHECK(ferrocomm_allgather(comm, &me, all, 1, FERROCOMM_I64));
    for (size_t r = 0; r < size; r++) expect("allgather", rank, (double)all[r], (double)r);
    free(all);

    /* 6. Even and odd ranks in sub-communicators. */
    ferrocomm_comm_t *half = NULL;
    CHECK(ferrocomm_comm_split(comm, (int64_t)(rank % 2), 0, &half));
    size_t hsize;
    CHECK(ferrocomm_comm_size(half, &hsize));
    uint32_t one = 1;
    CHECK(ferrocomm_allreduce(half, FERROCOMM_IN_PLACE, &one, 1, FERROCOMM_U32, FERROCOMM_SUM));
    expect("split", rank, one, (double)hsize);
    CHECK(ferrocomm_comm_free(half));

    printf("rank %zu of %zu: collectives on %zu floats: %s\n", rank, size, n,
           wrong ? "WRONG" : "ok");
    free(x);
    free(y);
    CHECK(ferrocomm_comm_free(comm));
    CHECK(ferrocomm_finalize());
    return wrong ? 1 : 0;
}
