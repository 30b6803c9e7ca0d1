"""Walk-through step 8: DDP over ferrocomm. A Linear(5, 1) trained with Adam on random
batches of 32; each rank prints its parameters before DDP's broadcast (all different),
after it (all equal to rank 0's), and after training (still all equal).

    .venv/bin/torchrun --nproc-per-node 2 examples/torch/ddp_linear.py
"""

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import ferrocomm_torch  # noqa: F401

dist.init_process_group(backend="ferrocomm")
rank = dist.get_rank()
torch.manual_seed(rank)  # a different initialisation on every rank
model = torch.nn.Linear(5, 1)


def params(m):
    return [round(v, 4) for v in torch.cat([p.detach().reshape(-1) for p in m.parameters()]).tolist()]


print(f"rank {rank} before broadcast: {params(model)}")
ddp = DDP(model)  # on CPU: no device arguments; copies rank 0's parameters to every rank
print(f"rank {rank} after broadcast:  {params(model)}")
opt = torch.optim.Adam(ddp.parameters(), lr=0.01)
g = torch.Generator().manual_seed(100 + rank)
for step in range(20):
    x = torch.randn(32, 5, generator=g)
    y = x.sum(dim=1, keepdim=True)
    opt.zero_grad()
    torch.nn.functional.mse_loss(ddp(x), y).backward()  # gradients averaged by all_reduce
    opt.step()
print(f"rank {rank} after training:  {params(model)}")
mine = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
others = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
dist.all_gather(others, mine)
assert all(torch.equal(o, mine) for o in others), "replicas differ"
dist.destroy_process_group()
