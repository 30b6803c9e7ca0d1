"""Collectives from Python (ffi/python/ferrocomm.py) with numpy arrays: all_reduce in place
and out of place, a non-blocking all_reduce, the bucketed all_reduce of several
"gradients", all_gather and reduce_scatter; every result is checked.

    PYTHONPATH=ffi/python ferrorun --nproc-per-node 3 -- python3 ffi/examples/allreduce.py
"""

import sys

import numpy as np

import ferrocomm


def main():
    comm = ferrocomm.Communicator.init()
    rank, size = comm.rank, comm.size
    ranks_sum = size * (size + 1) // 2
    i = np.arange(10_000)

    x = ((rank + 1) * (i % 7)).astype(np.float32)
    y = comm.all_reduce(x, "sum", out=np.empty_like(x))
    ok = np.array_equal(y, ranks_sum * (i % 7))

    comm.all_reduce(x, "max")  # in place
    ok &= np.array_equal(x, size * (i % 7))

    g = np.full(1000, float(rank))
    req = comm.iall_reduce(g, "avg")
    comm.barrier()  # other work meanwhile
    req.wait()
    ok &= np.all(g == (size - 1) / 2)

    grads = [np.full(n, float(rank)) for n in (300, 7, 2000)]
    comm.all_reduce_many(grads, "avg", bucket_bytes=4096)
    ok &= all(np.all(a == (size - 1) / 2) for a in grads)

    everyone = comm.all_gather(np.array([rank], dtype=np.int64))
    ok &= everyone.tolist() == list(range(size))

    block = comm.reduce_scatter(np.arange(2 * size, dtype=np.int32), "sum")
    ok &= block.tolist() == [size * (2 * rank), size * (2 * rank + 1)]

    print(f"rank {rank} of {size}: Python collectives: {'ok' if ok else 'WRONG'}")
    comm.close()
    ferrocomm.finalize()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
