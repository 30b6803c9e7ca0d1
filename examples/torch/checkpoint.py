"""Walk-through step 10: rank 0 saves the checkpoint (replicas are equal), everyone waits at
a barrier, then every rank loads it with map_location="cpu" and the names of the bare model
(the DDP wrapper's "module." prefix stripped).

    .venv/bin/torchrun --nproc-per-node 2 examples/torch/checkpoint.py /tmp/ckpt.pt
"""

import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import ferrocomm_torch  # noqa: F401

path = sys.argv[1] if len(sys.argv) > 1 else "/tmp/ferrocomm_torch_ckpt.pt"
dist.init_process_group(backend="ferrocomm")
rank = dist.get_rank()
torch.manual_seed(0)
ddp = DDP(torch.nn.Linear(5, 1))
opt = torch.optim.Adam(ddp.parameters(), lr=0.01)
ddp(torch.randn(32, 5)).sum().backward()
opt.step()
if rank == 0:
    state = {k.removeprefix("module."): v for k, v in ddp.state_dict().items()}
    torch.save({"model": state, "optimizer": opt.state_dict(), "step": 1}, path)
dist.barrier()  # the file is complete before anyone reads it
ckpt = torch.load(path, map_location="cpu")
fresh = torch.nn.Linear(5, 1)
fresh.load_state_dict(ckpt["model"])
assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), ddp.module.parameters()))
print(f"rank {rank}: loaded step {ckpt['step']} from {path}, parameters equal to the live model")
dist.destroy_process_group()
