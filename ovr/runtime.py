"""Seeds, threads and devices (torch imported only where a device or thread pool is set up). No global RNG is seeded: every random draw takes an explicit generator from a seed."""
from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

from .errors import OvrError

if TYPE_CHECKING:
    import torch


def head_seed(seed: int, class_name: str) -> int:
    """Seed of one head, from (global seed, class name) only, so class order and neighbours never matter."""
    digest = hashlib.sha256(f"{seed}\x00{class_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


_THREADS_SET = False


def compute_threads(requested: int = 0) -> int:
    """Threads for torch's intra-op pool: `requested` if > 0, else the cores not already busy (cores minus the
    1-minute load average, at least 1). Measured on this project's 2-core machine with two busy-loop processes
    beside it: a warm `ovr demo` took 436 s with torch's default (2 threads fighting 2 busy processes) and 114 s with
    1 thread (57 s on an idle machine, where 2 threads are 1.5x faster than 1 for the head solve)."""
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if requested > 0:
        return requested
    try:
        busy = os.getloadavg()[0]
    except OSError:
        busy = 0.0
    return max(1, min(cores, int(cores - busy + 0.5)))


def configure_threads(requested: int | None = None) -> int:
    """Size torch's pool once per process ($OVR_THREADS or `--threads`; 0 = from the free cores)."""
    import os

    import torch

    global _THREADS_SET
    if requested is None and _THREADS_SET:
        return torch.get_num_threads()
    n = compute_threads(int(os.environ.get("OVR_THREADS", "0")) if requested is None else requested)
    torch.set_num_threads(n)
    _THREADS_SET = True
    return n


def resolve_device(device: str = "auto") -> "torch.device":
    import torch

    configure_threads()
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise OvrError(f"--device {device}: CUDA is not available on this machine (use --device cpu or auto)")
    if device != "cpu" and not device.startswith("cuda"):
        raise OvrError(f"--device {device}: expected auto, cpu or cuda")
    return torch.device(device)
