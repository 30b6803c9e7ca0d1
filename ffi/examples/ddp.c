/*
 * Data-parallel training from C: a two-layer linear model fitted by SGD on each rank's own
 * shard of a synthetic data set, with the gradients averaged by a ferrocomm reducer while
 * backward runs (the C version of examples/ddp_linear.rs).
 *
 * - ferrocomm_broadcast_parameters: rank 0's initial values everywhere (each rank starts
 *   from different random values on purpose).
 * - ferrocomm_reducer_new: the four parameters, in model order; small buckets so that
 *   several all_reduces overlap with the backward pass.
 * - Each step takes two micro-batches: the first with synchronisation off (the gradients
 *   accumulate locally, ferrocomm_reducer_set_sync(r, 0)), the second synchronised; the
 *   gradients are handed over as backward produces them, last layer first.
 * - At the end, every rank's parameters must be bit-identical: checked by all-reducing a
 *   checksum with min and max.
 *
 *   cc ddp.c -lferrocomm -o ddp
 *   ferrorun --nproc-per-node 3 -- ./ddp [STEPS]
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
            fprintf(stderr, "ddp: %s failed: %s: %s\n", #call, ferrocomm_strerror(rc_), \
                    ferrocomm_last_error());                                            \
            exit(1);                                                                    \
        }                                                                               \
    } while (0)

enum { D = 8, H = 16, BATCH = 32 };

/* The model: h = W1 x + b1, y = w2 . h + b2. */
static float W1[H * D], b1[H], w2[H], b2[1];
/* Their gradients for one micro-batch. */
static float gW1[H * D], gb1[H], gw2[H], gb2[1];

/* A small deterministic generator (xorshift), seeded per rank. */
static uint64_t state;
static float uniform(void) {
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    return (float)((state >> 40) * (1.0 / 16777216.0)) * 2.0f - 1.0f;
}

/* The function to learn: a fixed linear map of the input. */
static float target(const float *x) {
    float y = 0.5f;
    for (int j = 0; j < D; j++)
        y += (float)(j + 1) * 0.1f * x[j];
    return y;
}

/* One micro-batch of this rank's data: forward, loss, backward into the gradient buffers,
 * each handed to the reducer as soon as it is complete (last layer first). Returns the
 * mean loss. */
static float micro_batch(ferrocomm_reducer_t *r) {
    memset(gW1, 0, sizeof gW1);
    memset(gb1, 0, sizeof gb1);
    memset(gw2, 0, sizeof gw2);
    gb2[0] = 0;
    float x[BATCH][D], h[BATCH][H], d[BATCH];
    float loss = 0;
    for (int n = 0; n < BATCH; n++) {
        for (int j = 0; j < D; j++)
            x[n][j] = uniform();
        float y = b2[0];
        for (int i = 0; i < H; i++) {
            h[n][i] = b1[i];
            for (int j = 0; j < D; j++)
                h[n][i] += W1[i * D + j] * x[n][j];
            y += w2[i] * h[n][i];
        }
        d[n] = (y - target(x[n])) / BATCH; /* d(loss)/dy of the mean squared error / 2 */
        loss += (y - target(x[n])) * (y - target(x[n])) / (2 * BATCH);
    }
    /* Layer 2's gradients are complete first: hand them over while layer 1's are computed. */
    for (int n = 0; n < BATCH; n++) {
        gb2[0] += d[n];
        for (int i = 0; i < H; i++)
            gw2[i] += d[n] * h[n][i];
    }
    CHECK(ferrocomm_reducer_mark_ready(r, 3, gb2, 1));
    CHECK(ferrocomm_reducer_mark_ready(r, 2, gw2, H));
    for (int n = 0; n < BATCH; n++)
        for (int i = 0; i < H; i++) {
            gb1[i] += d[n] * w2[i];
            for (int j = 0; j < D; j++)
                gW1[i * D + j] += d[n] * w2[i] * x[n][j];
        }
    CHECK(ferrocomm_reducer_mark_ready(r, 1, gb1, H));
    CHECK(ferrocomm_reducer_mark_ready(r, 0, gW1, H * D));
    return loss;
}

/* p -= lr * (averaged gradient) / micro-batches. */
static void sgd(ferrocomm_reducer_t *r, size_t index, float *p, size_t n, float lr) {
    float g[H * D];
    CHECK(ferrocomm_reducer_grad(r, index, g, n));
    for (size_t i = 0; i < n; i++)
        p[i] -= lr * g[i] / 2;
}

int main(int argc, char **argv) {
    int steps = argc > 1 ? atoi(argv[1]) : 200;
    ferrocomm_comm_t *comm = NULL;
    CHECK(ferrocomm_init(&comm));
    size_t rank, size;
    CHECK(ferrocomm_comm_rank(comm, &rank));
    CHECK(ferrocomm_comm_size(comm, &size));

    /* Different initial values on every rank; rank 0's win. */
    state = 0x9E3779B97F4A7C15ull * (rank + 1);
    for (int i = 0; i < H * D; i++)
        W1[i] = uniform() * 0.3f;
    for (int i = 0; i < H; i++) {
        b1[i] = 0;
        w2[i] = uniform() * 0.3f;
    }
    b2[0] = 0;
    void *bufs[] = {W1, b1, w2, b2};
    size_t counts[] = {H * D, H, H, 1};
    uint32_t dtypes[] = {FERROCOMM_F32, FERROCOMM_F32, FERROCOMM_F32, FERROCOMM_F32};
    CHECK(ferrocomm_broadcast_parameters(comm, bufs, counts, dtypes, 4));

    const char *names[] = {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"};
    size_t s0[] = {H, D}, s1[] = {H}, s2[] = {1, H}, s3[] = {1};
    const size_t *shapes[] = {s0, s1, s2, s3};
    size_t ndims[] = {2, 1, 2, 1};
    ferrocomm_reducer_t *r = NULL;
    /* 256-byte buckets (a few parameters each), 64-byte first bucket, every parameter used. */
    CHECK(ferrocomm_reducer_new(comm, 4, names, dtypes, counts, shapes, ndims, 256.0 / (1 << 20),
                                64.0 / (1 << 20), 0, &r));

    state = 0xD1B54A32D192ED03ull * (rank + 7); /* this rank's own data */
    float first = 0, loss = 0;
    for (int step = 0; step < steps; step++) {
        CHECK(ferrocomm_reducer_set_sync(r, 0)); /* micro-batch 1: accumulate locally */
        loss = micro_batch(r);
        CHECK(ferrocomm_reducer_finish(r));
        CHECK(ferrocomm_reducer_set_sync(r, 1)); /* micro-batch 2: reduce the sum */
        loss = (loss + micro_batch(r)) / 2;
        CHECK(ferrocomm_reducer_finish(r));
        if (step == 0)
            first = loss;
        float lr = 0.05f;
        sgd(r, 0, W1, H * D, lr);
        sgd(r, 1, b1, H, lr);
        sgd(r, 2, w2, H, lr);
        sgd(r, 3, b2, 1, lr);
    }
    CHECK(ferrocomm_reducer_free(r));

    /* Replicas must be identical: the same checksum as min and max over the ranks. */
    double sum = 0;
    for (int i = 0; i < H * D; i++)
        sum += W1[i] * (double)(i + 1);
    for (int i = 0; i < H; i++)
        sum += b1[i] * 3.0 + w2[i] * 7.0;
    sum += b2[0];
    double lo, hi;
    CHECK(ferrocomm_allreduce(comm, &sum, &lo, 1, FERROCOMM_F64, FERROCOMM_MIN));
    CHECK(ferrocomm_allreduce(comm, &sum, &hi, 1, FERROCOMM_F64, FERROCOMM_MAX));
    int equal = lo == hi;
    int learned = loss < first / 10;
    printf("rank %zu of %zu: loss %.3g -> %.3g after %d steps, b2 = %.4f, w2[0] = %.4f, "
           "checksum %.9g: %s\n",
           rank, size, first, loss, steps, b2[0], w2[0], sum,
           equal && learned ? "ok" : (equal ? "did not learn" : "REPLICAS DIFFER"));
    CHECK(ferrocomm_comm_free(comm));
    CHECK(ferrocomm_finalize());
    return equal && learned ? 0 : 1;
}
