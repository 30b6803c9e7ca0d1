"""ferrocomm as a torch.distributed backend.

    import torch.distributed as dist
    import ferrocomm_torch  # registers the backend "ferrocomm" (CPU tensors)
    dist.init_process_group("ferrocomm")  # env://, tcp://, file://, store=, torchrun

Importing this package registers the backend with
`torch.distributed.Backend.register_backend("ferrocomm", ..., devices=["cpu"])`. Each
process group rendezvouses through the c10d store torch hands it, so every init method and
launcher torch supports works. See backend.py for what is supported.
"""

import torch.distributed as dist

from .backend import FerrocommBackend, create

__all__ = ["FerrocommBackend", "create", "BACKEND"]

#: The backend's name for `init_process_group` and `new_group`.
BACKEND = "ferrocomm"

if not hasattr(dist.Backend, "FERROCOMM"):
    dist.Backend.register_backend(BACKEND, create, devices=["cpu"])
