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


def usable_cores() -> int:
    """The cores this process may run on (its affinity where the system has one)."""
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def compute_threads(requested: int = 0) -> int:
    """Threads for the compute pools (torch's, onnxruntime's): `requested` if > 0, else the cores not already busy
    (cores minus what other processes use right now, at least 1): threads beyond the free cores fight the other
    processes for them, and everything slows down several times."""
    cores = usable_cores()
    if requested > 0:
        return requested
    return max(1, min(cores, int(cores - busy_cores(cores) + 0.5)))


def busy_cores(cores: int, window: float = 0.05) -> float:
    """How many cores other processes keep busy: from /proc/stat over `window` seconds (this process is idle
    meanwhile), else the 1-minute load average. Not the load average first: in a VM it can count a busy core
    on an idle machine (this project's CI machine does), which halved every pool on two cores."""
    import os
    import time

    try:
        a = _cpu_times()
        time.sleep(window)
        b = _cpu_times()
        return busy_between(a, b, cores)
    except (OSError, ValueError, IndexError):
        try:
            return os.getloadavg()[0]
        except OSError:
            return 0.0


def cpu_model() -> str:
    """The processor's name, for benchmark records: this project's machines differ (an AMD EPYC, an Intel Xeon) and
    so do their figures. /proc/cpuinfo's "model name" where there is one; platform.processor() is only the
    architecture ("x86_64") on Linux."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_name() -> str:
    """The processor and the cores this process may use, as benchmark records name their machine."""
    return f"{cpu_model()}, {usable_cores()} cores"


def _cpu_times() -> list[int]:
    with open("/proc/stat", encoding="ascii") as f:
        return [int(v) for v in f.readline().split()[1:]]


def busy_between(a: list[int], b: list[int], cores: int) -> float:
    """Busy cores between two readings of /proc/stat's aggregate `cpu` line (user nice system idle iowait ...)."""
    d = [y - x for x, y in zip(a, b)]
    total = sum(d[:8])  # guest time is counted inside user already
    if total <= 0:
        return 0.0
    idle = d[3] + (d[4] if len(d) > 4 else 0)
    return cores * (1 - idle / total)


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
