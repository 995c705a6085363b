"""`torchrun ... -m ovr embed DATA`: embedding across processes and machines with torch.distributed.

Each rank hashes the same file list, takes every WORLD_SIZE-th of the not-yet-cached contents (sorted by content
key, so the split is deterministic and a rerun after a crash splits only what is left), embeds them into its own
cache shards (the cache's index merge is locked, so ranks on one filesystem never drop each other's shards), then
all ranks meet at a barrier and rank 0 reports. A killed rank leaves only whole shards (written by rename); the rerun
embeds the rest. Ranks on several machines need a shared cache folder (--cache-dir on a network filesystem).
"""
from __future__ import annotations

import os


def launched() -> bool:
    """Started by torchrun (or another launcher that sets WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: str = "auto") -> tuple[int, int, str]:
    """-> (rank, world size, device for this rank). Initialises the process group when launched by torchrun:
    NCCL for CUDA ranks (one GPU each, by LOCAL_RANK), gloo on CPU."""
    if not launched():
        return 0, 1, device
    import torch
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def teardown() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
