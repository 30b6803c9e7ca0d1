"""Walk-through step 9: a DistributedSampler gives each rank a disjoint shard of the same
permutation (seed + epoch); set_epoch changes the order every epoch. The ranks check over
ferrocomm that together they cover the data set exactly once per epoch.

    .venv/bin/torchrun --nproc-per-node 3 examples/torch/sampler.py
"""

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import ferrocomm_torch  # noqa: F401

dist.init_process_group(backend="ferrocomm")
rank, world = dist.get_rank(), dist.get_world_size()
data = TensorDataset(torch.arange(20))
sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=7)
loader = DataLoader(data, batch_size=4, sampler=sampler)
for epoch in range(2):
    sampler.set_epoch(epoch)
    seen = torch.cat([b[0] for b in loader])
    print(f"rank {rank} epoch {epoch}: {seen.tolist()}")
    shards = [torch.empty_like(seen) for _ in range(world)]
    dist.all_gather(shards, seen)
    covered = set(torch.cat(shards).tolist())
    assert covered == set(range(20)), f"epoch {epoch}: the shards miss {set(range(20)) - covered}"
dist.destroy_process_group()
