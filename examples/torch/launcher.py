"""Walk-through steps 1-6: every process of the job finds the master, learns its rank, and
says where it is. Run with torchrun (which sets MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE,
LOCAL_RANK) or by hand with those variables set in each process:

    .venv/bin/torchrun --nproc-per-node 2 examples/torch/launcher.py
    MASTER_ADDR=127.0.0.1 MASTER_PORT=5003 WORLD_SIZE=2 RANK=0 .venv/bin/python examples/torch/launcher.py &
    MASTER_ADDR=127.0.0.1 MASTER_PORT=5003 WORLD_SIZE=2 RANK=1 .venv/bin/python examples/torch/launcher.py
"""

import os
import socket

import torch
import torch.distributed as dist

import ferrocomm_torch  # noqa: F401  (registers "ferrocomm")

dist.init_process_group(backend="ferrocomm")  # env://
rank, world = dist.get_rank(), dist.get_world_size()
local = os.environ.get("LOCAL_RANK", "?")
print(f"rank {rank} of {world} (local rank {local}) on {socket.gethostname()}, "
      f"master {os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}")
# Everyone checks in: the sum of ranks proves every process joined the same job.
t = torch.tensor([rank])
dist.all_reduce(t)
assert t.item() == world * (world - 1) // 2
dist.destroy_process_group()
