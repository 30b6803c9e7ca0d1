/*
 * Hello from every rank, then a token passed once around the ring of all ranks: the C
 * version of examples/hello.rs.
 *
 *   cc hello.c -lferrocomm -o hello            (after scripts/install)
 *   ferrorun --nproc-per-node 3 -- ./hello
 *
 * Also runs under srun, mpirun, or by hand with MASTER_ADDR, MASTER_PORT, RANK and
 * WORLD_SIZE set for each process.
 */
#include <ferrocomm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

/* Every ferrocomm call returns FERROCOMM_OK or an error code; the message says more. */
#define CHECK(call)                                                                      \
    do {                                                                                 \
        ferrocomm_result rc_ = (call);                                                   \
        if (rc_ != FERROCOMM_OK) {                                                       \
            fprintf(stderr, "hello: %s failed: %s: %s\n", #call, ferrocomm_strerror(rc_), \
                    ferrocomm_last_error());                                             \
            exit(1);                                                                     \
        }                                                                                \
    } while (0)

int main(void) {
    ferrocomm_comm_t *comm = NULL;
    CHECK(ferrocomm_init(&comm)); /* reads the launcher's environment */

    size_t rank, size, local_rank, local_size;
    CHECK(ferrocomm_comm_rank(comm, &rank));
    CHECK(ferrocomm_comm_size(comm, &size));
    CHECK(ferrocomm_comm_local_rank(comm, &local_rank));
    CHECK(ferrocomm_comm_local_size(comm, &local_size));
    printf("hello from rank %zu of %zu (local rank %zu of %zu), ferrocomm %s\n", rank, size,
           local_rank, local_size, ferrocomm_version());
    fflush(stdout);

    /* Rank 0 starts a token; every other rank adds its own rank and passes it on. */
    uint64_t token = 0;
    if (size > 1) {
        size_t next = (rank + 1) % size, prev = (rank + size - 1) % size;
        if (rank == 0) {
            CHECK(ferrocomm_send(comm, &token, 1, FERROCOMM_U64, next, 0));
            CHECK(ferrocomm_recv(comm, &token, 1, FERROCOMM_U64, (int64_t)prev, 0, NULL));
        } else {
            ferrocomm_status_t st;
            CHECK(ferrocomm_recv(comm, &token, 1, FERROCOMM_U64, (int64_t)prev, 0, &st));
            if (st.source != prev || st.bytes != sizeof token) {
                fprintf(stderr, "hello: unexpected status: source %zu, %zu bytes\n",
                        st.source, st.bytes);
                return 1;
            }
            token += rank;
            CHECK(ferrocomm_send(comm, &token, 1, FERROCOMM_U64, next, 0));
        }
    }
    CHECK(ferrocomm_barrier(comm));

    /* Mistakes are error codes with a message, never crashes. */
    if (ferrocomm_send(comm, &token, 1, 1234 /* not a dtype */, 0, 0) !=
        FERROCOMM_ERR_INVALID_ARGUMENT) {
        fprintf(stderr, "hello: an unknown data type was accepted\n");
        return 1;
    }

    int ok = 1;
    if (rank == 0) {
        uint64_t expected = (uint64_t)size * (size - 1) / 2;
        ok = token == expected;
        printf("token went around %zu ranks and came back as %llu (expected %llu): %s\n", size,
               (unsigned long long)token, (unsigned long long)expected, ok ? "ok" : "WRONG");
    }

    CHECK(ferrocomm_comm_free(comm));
    /* The handle is gone: a second free is recognised, not a double free. */
    if (ferrocomm_comm_free(comm) != FERROCOMM_ERR_INVALID_HANDLE) {
        fprintf(stderr, "hello: a double free went unnoticed\n");
        return 1;
    }
    CHECK(ferrocomm_finalize());
    return ok ? 0 : 1;
}
