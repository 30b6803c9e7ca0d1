"""The Python module (ffi/python/ferrocomm.py) over libferrocomm.so, with numpy arrays.

Every rank sends a vector to its right neighbour with isend/irecv, checks what came from
its left, and takes its shard of a data set from the distributed sampler.

    PYTHONPATH=ffi/python ferrorun --nproc-per-node 3 -- python3 ffi/examples/ring.py
"""

import sys

import numpy as np

import ferrocomm


def main():
    comm = ferrocomm.Communicator.init()
    rank, size = comm.rank, comm.size
    right, left = (rank + 1) % size, (rank + size - 1) % size

    out = np.full(1000, rank, dtype=np.float32)
    inp = np.empty(1000, dtype=np.float32)
    recv = comm.irecv(inp, src=left, tag=1)
    send = comm.isend(out, right, tag=1)
    st, _ = ferrocomm.waitall([recv, send])
    if st.source != left or not np.all(inp == left):
        print(f"rank {rank}: wrong data from rank {st.source}", file=sys.stderr)
        return 1

    shard = ferrocomm.sampler_indices(100 * size, size, rank, seed=1, epoch=0)
    comm.barrier()
    print(f"rank {rank} of {size}: got rank {left}'s vector; shard of {len(shard)} examples starts {shard[:3].tolist()}: ok")
    comm.close()
    ferrocomm.finalize()
    return 0


if __name__ == "__main__":
    sys.exit(main())
