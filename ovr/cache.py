"""The embedding cache: content-addressed rows in immutable safetensors shards, one folder per backbone key."""
from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from itertools import repeat
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open

from .atomic import atomic_write_bytes, check_writable
from .errors import OvrError


def default_cache_dir() -> Path:
    env = os.environ.get("OVR_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ovr"



def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save

    atomic_write_bytes(path, save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata))


def content_key(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class EmbeddingCache:
    """Embeddings of one backbone key: immutable safetensors shards, plus index.json mapping shard -> keys.

    The index is only a shortcut: a shard that a crash left out of it is found by listing the folder, so
    a shard, once renamed into place, is never lost. Writers coordinate through two lock files in the folder:
    `.index.lock` around each index update (which re-reads the index first, so no writer drops another's shard)
    and `.embed.lock`, held by `embedding()` while a process embeds, so a second `ovr embed` of the same data
    waits and then embeds only what the first did not.
    """

    def __init__(self, root: str | Path, backbone_key: str, dtype: torch.dtype = torch.float32) -> None:
        self.dir = Path(root) / backbone_key[:24]
        self.dtype = dtype  # of new shards; reads always return float32
        self._where: dict[str, tuple[str, int]] = {}
        self._index: dict[str, list[str]] = {}
        self._load_index()

    def _read_index(self) -> dict[str, list[str]]:
        """index.json merged with the shards on disk (a shard missing from it is read from its own metadata).
        Sets self._stale when the two differed (then the index is rewritten)."""
        index: dict[str, list[str]] = {}
        self._stale = False
        ipath = self.dir / "index.json"
        if ipath.is_file():
            try:
                index = json.loads(ipath.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                index = {}
            if not isinstance(index, dict):
                index = {}
        on_disk = sorted(p.name for p in self.dir.glob("shard-*.safetensors")) if self.dir.is_dir() else []
        on = set(on_disk)
        self._stale = any(s not in on for s in index)
        for s in on_disk:
            if s in index:
                continue
            self._stale = True
            keys = self._index.get(s)
            if keys is None:
                try:
                    with safe_open(str(self.dir / s), "pt") as f:
                        keys = json.loads(f.metadata()["keys"])
                except Exception:
                    continue  # an unreadable shard is treated as absent; its images get embedded again
            index[s] = keys
        return {s: keys for s, keys in index.items() if s in on}

    def _load_index(self) -> None:
        # 1,000,000 keys in 1,000 shards: 0.94 s with a per-key loop and a second parse of index.json to test
        # staleness; 0.5 s with dict.update and the staleness noted while merging (benchmarks/scale.py)
        index = self._read_index()
        stale = self._stale
        where: dict[str, tuple[str, int]] = {}
        for s, keys in reversed(index.items()):  # reversed: where a content is in two shards, the older wins
            where.update(zip(keys, zip(repeat(s), range(len(keys)))))
        self._where = where
        self._index = index
        if stale and self.dir.is_dir():
            self._write_index()

    def _write_index(self) -> None:
        try:
            with self._lock(".index.lock"):
                merged = self._read_index()
                merged.update(self._index)
                atomic_write_bytes(self.dir / "index.json", json.dumps(merged).encode())
        except PermissionError:
            pass  # a read-only cache still serves reads; the index is only a shortcut

    def _lock(self, name: str):
        from filelock import FileLock

        self.dir.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.dir / name))

    def refresh(self) -> None:
        """See the shards other processes wrote since this cache was opened."""
        self._load_index()

    @contextmanager
    def embedding(self, waiting: Callable[[], None] | None = None):
        """Hold the cache's embed lock (one embedding process per cache at a time; a killed holder releases it),
        then refresh: what another process embedded meanwhile is then in the cache."""
        from filelock import Timeout

        hint = "pass --cache-dir (or set $OVR_CACHE_DIR) to a folder you can write"
        try:
            lock = self._lock(".embed.lock")
            lock.acquire(timeout=0)
        except PermissionError:
            raise OvrError(f"the embedding cache {self.dir} is not writable; {hint}") from None
        except Timeout:
            if waiting:
                waiting()
            lock.acquire()
        try:
            try:  # before any forward pass: the lock file may exist in a folder that no longer takes new files
                check_writable(self.dir, "the embedding cache")
            except OvrError as e:
                raise OvrError(f"{e}; {hint}") from None
            self.refresh()
            yield
        finally:
            lock.release()

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def __len__(self) -> int:
        return len(self._where)

    def put(self, keys: list[str], emb: torch.Tensor) -> None:
        if not keys:
            return
        name = f"shard-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.safetensors"
        atomic_save_safetensors({"embeddings": emb.to(self.dtype)}, self.dir / name, {"keys": json.dumps(keys)})
        self._index[name] = list(keys)
        for row, k in enumerate(keys):
            self._where.setdefault(k, (name, row))
        self._write_index()

    def get(self, keys: list[str]) -> torch.Tensor:
        """Rows for keys, in order; a key not in the cache is an OvrError naming how many are missing."""
        absent = [k for k in keys if k not in self._where]
        if absent:
            raise OvrError(f"{len(absent)} embeddings are not in the cache {self.dir}; run `ovr embed` on the data again")
        by_shard: dict[str, list[tuple[int, int]]] = {}
        for i, k in enumerate(keys):
            s, row = self._where[k]
            by_shard.setdefault(s, []).append((i, row))
        out: torch.Tensor | None = None
        for s, pairs in by_shard.items():
            with safe_open(str(self.dir / s), "pt") as f:
                shard = f.get_tensor("embeddings").float()  # float16 shards are widened on read
            if out is None:
                out = torch.empty(len(keys), shard.shape[1])
            dst = torch.tensor([p[0] for p in pairs])
            src = torch.tensor([p[1] for p in pairs])
            out[dst] = shard[src]
        return out if out is not None else torch.empty(0, 0)

