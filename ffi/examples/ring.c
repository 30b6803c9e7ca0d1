/*
 * A sum over all ranks computed by passing blocks around the ring with non-blocking sends
 * and receives (isend/irecv/test/waitall): after size-1 steps every rank holds the sum of
 * every rank's vector, which it checks.
 *
 *   cc ring.c -lferrocomm -o ring
 *   ferrorun --nproc-per-node 3 -- ./ring [ELEMENTS]
 */
#include <ferrocomm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CHECK(call)                                                                     \
    do {                                                                                \
        ferrocomm_result rc_ = (call);                                                  \
        if (rc_ != FERROCOMM_OK) {                                                      \
            fprintf(stderr, "ring: %s failed: %s: %s\n", #call, ferrocomm_strerror(rc_), \
                    ferrocomm_last_error());                                            \
            exit(1);                                                                    \
        }                                                                               \
    } while (0)

/* Rank r's vector: element i is r * 1000 + i, exact in a double. */
static double value(size_t r, size_t i) { return (double)(r * 1000 + i); }

int main(int argc, char **argv) {
    size_t n = argc > 1 ? (size_t)strtoull(argv[1], NULL, 10) : 1000;
    ferrocomm_comm_t *comm = NULL;
    CHECK(ferrocomm_init(&comm));
    size_t rank, size;
    CHECK(ferrocomm_comm_rank(comm, &rank));
    CHECK(ferrocomm_comm_size(comm, &size));
    size_t next = (rank + 1) % size, prev = (rank + size - 1) % size;

    double *sum = malloc(n * sizeof *sum), *passing = malloc(n * sizeof *passing),
           *incoming = malloc(n * sizeof *incoming);
    if (!sum || !passing || !incoming) return 1;
    for (size_t i = 0; i < n; i++) sum[i] = passing[i] = value(rank, i);

    /* Step s: send what came from s ranks back, receive what comes from s+1 ranks back. */
    for (size_t step = 0; step + 1 < size; step++) {
        ferrocomm_request_t *reqs[2];
        CHECK(ferrocomm_irecv(comm, incoming, n, FERROCOMM_F64, (int64_t)prev, (int64_t)step,
                              &reqs[0]));
        CHECK(ferrocomm_isend(comm, passing, n, FERROCOMM_F64, next, (uint32_t)step, &reqs[1]));
        if (step == 0) {
            /* Poll the receive once the hard way, then wait for the rest. */
            int done = 0;
            ferrocomm_status_t st;
            while (!done) CHECK(ferrocomm_test(reqs[0], &done, &st));
            if (st.source != prev || st.bytes != n * sizeof(double)) {
                fprintf(stderr, "ring: unexpected status\n");
                return 1;
            }
            CHECK(ferrocomm_wait(reqs[1], NULL));
        } else {
            ferrocomm_status_t st[2];
            CHECK(ferrocomm_waitall(2, reqs, st));
            if (st[0].source != prev || st[1].source != next || st[0].error != FERROCOMM_OK) {
                fprintf(stderr, "ring: unexpected statuses\n");
                return 1;
            }
        }
        for (size_t i = 0; i < n; i++) sum[i] += incoming[i];
        memcpy(passing, incoming, n * sizeof *passing);
    }

    size_t wrong = 0;
    for (size_t i = 0; i < n; i++) {
        double expected = 0;
        for (size_t r = 0; r < size; r++) expected += value(r, i);
        wrong += sum[i] != expected;
    }
    printf("rank %zu: sum of %zu ranks' %zu doubles: %s\n", rank, size, n,
           wrong ? "WRONG" : "ok");
    free(sum);
    free(passing);
    free(incoming);
    CHECK(ferrocomm_comm_free(comm));
    CHECK(ferrocomm_finalize());
    return wrong ? 1 : 0;
}
