/*
 * Collective argument agreement through the C ABI: every rank makes one collective call in
 * which the ranks disagree (argv[1] says which), and prints how it ended:
 *
 *   CMM rank=R code=C message      (or CMM rank=R ok)
 *
 * then exits 0 whatever happened (ferrorun stops every rank when one exits non-zero). Run
 * by ffi/tests/mismatch.rs under ferrorun, which checks that every rank reports
 * FERROCOMM_ERR_COLLECTIVE_MISMATCH naming two ranks whose calls differ.
 *
 *   broadcast_root  root 0 on rank 0, root 1 on the others
 *   reduce_root     root 1 on the last rank, root 0 on the others
 *   count           rank 1 passes one element more to all_reduce
 *   kind            rank 0 calls barrier, the others all_gather
 */
#include <ferrocomm.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

int main(int argc, char **argv) {
    const char *what = argc > 1 ? argv[1] : "broadcast_root";
    ferrocomm_comm_t *comm = NULL;
    if (ferrocomm_init(&comm) != FERROCOMM_OK) {
        fprintf(stderr, "init failed: %s\n", ferrocomm_last_error());
        return 1;
    }
    size_t rank = 0, size = 0;
    ferrocomm_comm_rank(comm, &rank);
    ferrocomm_comm_size(comm, &size);
    float buf[16] = {0};
    float out[64] = {0};
    ferrocomm_result rc;
    if (strcmp(what, "broadcast_root") == 0) {
        rc = ferrocomm_broadcast(comm, buf, 4, FERROCOMM_F32, rank == 0 ? 0 : 1);
    } else if (strcmp(what, "reduce_root") == 0) {
        rc = ferrocomm_reduce(comm, buf, out, 4, FERROCOMM_F32, FERROCOMM_SUM,
                              rank == size - 1 ? 1 : 0);
    } else if (strcmp(what, "count") == 0) {
        rc = ferrocomm_allreduce(comm, FERROCOMM_IN_PLACE, buf, rank == 1 ? 9 : 8, FERROCOMM_F32,
                                  FERROCOMM_SUM);
    } else if (strcmp(what, "kind") == 0) {
        rc = rank == 0 ? ferrocomm_barrier(comm)
                       : ferrocomm_allgather(comm, buf, out, 2, FERROCOMM_F32);
    } else {
        fprintf(stderr, "unknown case %s\n", what);
        return 1;
    }
    if (rc == FERROCOMM_OK) {
        printf("CMM rank=%zu ok\n", rank);
    } else {
        printf("CMM rank=%zu code=%u %s\n", rank, (unsigned)rc, ferrocomm_last_error());
    }
    fflush(stdout);
    return 0;
}
