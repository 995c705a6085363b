"""Seeds and devices. No global RNG is seeded: every random draw takes an explicit generator from a seed."""
from __future__ import annotations

import hashlib

import torch

from .errors import OvrError


def head_seed(seed: int, class_name: str) -> int:
    """Seed of one head, from (global seed, class name) only, so class order and neighbours never matter."""
    digest = hashlib.sha256(f"{seed}\x00{class_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise OvrError(f"--device {device}: CUDA is not available on this machine (use --device cpu or auto)")
    if device != "cpu" and not device.startswith("cuda"):
        raise OvrError(f"--device {device}: expected auto, cpu or cuda")
    return torch.device(device)
