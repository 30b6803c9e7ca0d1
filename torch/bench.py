"""dist.all_reduce of float32 tensors through torch.distributed: ferrocomm beside gloo, in
the same run, from Python. Prints time per call and busbw (nccl-tests' definition:
bytes / time * 2 (n - 1) / n) at 4 B, 1 KiB, 1 MiB and 64 MiB.

    .venv/bin/torchrun --nproc-per-node 2 torch/bench.py
    FERROCOMM_TRANSPORT=tcp .venv/bin/torchrun --nproc-per-node 2 torch/bench.py   # TCP only
    BENCH_DDP=0 ...   # without the DDP step comparison (a 25M-parameter MLP)

By hand: `python torch/bench.py RANK SIZE tcp://127.0.0.1:PORT` in each process.
"""

import datetime
import os
import sys
import time

import torch
import torch.distributed as dist

import ferrocomm_torch  # noqa: F401

SIZES = [4, 1024, 1 << 20, 64 << 20]


def iters_for(nbytes):
    if nbytes <= 1024:
        return 2000
    if nbytes <= 1 << 20:
        return 100
    return 5


def time_allreduce(group, nbytes):
    x = torch.ones(max(nbytes // 4, 1), dtype=torch.float32)
    for _ in range(3 if nbytes > 1 << 20 else 20):
        dist.all_reduce(x, group=group)
    n = iters_for(nbytes)
    dist.barrier(group=group)
    start = time.perf_counter()
    for _ in range(n):
        dist.all_reduce(x, group=group)
    elapsed = time.perf_counter() - start
    # The slowest rank's time is the collective's time.
    t = torch.tensor([elapsed / n], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t.item()


def ddp_step_time(group, steps=5):
    """Seconds per DDP training step of a ~25M-parameter MLP (batch 32)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    layers = []
    for _ in range(6):
        layers += [torch.nn.Linear(2048, 2048), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers)
    ddp = DDP(model, process_group=group)
    opt = torch.optim.SGD(ddp.parameters(), lr=1e-3)
    x = torch.randn(32, 2048)
    for i in range(steps + 1):
        if i == 1:
            dist.barrier(group=group)
            start = time.perf_counter()
        opt.zero_grad()
        ddp(x).square().mean().backward()
        opt.step()
    t = torch.tensor([(time.perf_counter() - start) / steps], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t.item()


def fmt_size(b):
    for unit, div in (("MiB", 1 << 20), ("KiB", 1024)):
        if b >= div:
            return f"{b // div} {unit}"
    return f"{b} B"


def main():
    if len(sys.argv) > 3:
        rank, size = int(sys.argv[1]), int(sys.argv[2])
        dist.init_process_group("ferrocomm", init_method=sys.argv[3], rank=rank, world_size=size,
                                timeout=datetime.timedelta(seconds=120))
    else:
        dist.init_process_group("ferrocomm", timeout=datetime.timedelta(seconds=120))
    rank, size = dist.get_rank(), dist.get_world_size()
    gloo = dist.new_group(backend="gloo")
    rows = []
    for nbytes in SIZES:
        fc = time_allreduce(None, nbytes)
        gl = time_allreduce(gloo, nbytes)
        rows.append((nbytes, fc, gl))
    if rank == 0:
        factor = 2 * (size - 1) / size if size > 1 else 1.0
        transport = os.environ.get("FERROCOMM_TRANSPORT", "auto")
        print(f"dist.all_reduce float32, {size} ranks, ferrocomm transport {transport}, "
              f"torch {torch.__version__}")
        print(f"{'size':>8} | {'ferrocomm us':>12} {'busbw GB/s':>10} | {'gloo us':>10} "
              f"{'busbw GB/s':>10} | {'time gloo/fc':>12}")
        for nbytes, fc, gl in rows:
            print(f"{fmt_size(nbytes):>8} | {fc * 1e6:12.1f} {nbytes / fc * factor / 1e9:10.3f} | "
                  f"{gl * 1e6:10.1f} {nbytes / gl * factor / 1e9:10.3f} | {gl / fc:12.2f}")
    if os.environ.get("BENCH_DDP", "1") != "0":
        fc, gl = ddp_step_time(None), ddp_step_time(gloo)
        if rank == 0:
            print(f"DDP step, 25M-parameter MLP, batch 32: ferrocomm {fc * 1e3:.1f} ms, "
                  f"gloo {gl * 1e3:.1f} ms, gloo/ferrocomm {gl / fc:.2f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
