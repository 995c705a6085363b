"""The embedding cache: content-addressed rows in immutable safetensors shards, one folder per backbone key."""
from __future__ import annotations

import hashlib
import io
import json
import os
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
from safetensors import safe_open

from ..atomic import atomic_write_bytes, check_writable
from .data import describe_error
from ..errors import OvrError

if TYPE_CHECKING:  # torch is imported where rows are read or written: a warm `ovr embed` only looks keys up
    import torch


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


def hash_files(paths: list[Path], progress: Callable[[str, int, int], None] | None = None
                ) -> tuple[list[str | None], list[tuple[Path, str]]]:
    """Each file's content key (None and a reason for a file that cannot be read), torch-free."""
    keys: list[str | None] = []
    bad: list[tuple[Path, str]] = []
    for i, p in enumerate(paths):
        try:
            h, size = hashlib.sha256(), 0
            with open(p, "rb") as f:  # streamed: a huge file never sits in memory to be hashed
                while block := f.read(1 << 20):
                    h.update(block)
                    size += len(block)
        except OSError as e:
            keys.append(None)
            bad.append((Path(p), describe_error(e)))
        else:
            if size:
                keys.append(h.hexdigest())
            else:  # nothing to decode: said here, never handed to a decoder (whose error would not say it)
                keys.append(None)
                bad.append((Path(p), "empty file"))
        if progress and (i % 256 == 0 or i == len(paths) - 1):
            progress("hash", i + 1, len(paths))
    return keys, bad


class DamagedCache(OvrError):
    """A shard whose rows do not match what was written (checksum, shape or non-finite values), or an index that
    points past a shard: set aside, so that its images are embedded again."""


def _digest(rows) -> str:
    """sha256 of a tensor's bytes, read in place (no copy)."""
    return hashlib.sha256(rows.contiguous().numpy().data).hexdigest()


class EmbeddingCache:
    """Embeddings of one backbone key: immutable safetensors shards (each holds its keys in its metadata), and a
    compact binary index of the shards it covers (`index.npz`: sorted hex keys, shard number and row per key).

    Shards are found by listing the folder: one that no index covers yet (a writer's newest, or one a crash left
    behind) is read from its own metadata, so a shard, once renamed into place, is never lost, and writers never
    rewrite the index on the hot path. When more than COMPACT shards are uncovered, the opener rebuilds the index
    under `.index.lock` (atomically replaced: readers see the old or the new). Loading 1,000,000 keys takes a
    memory-mapped read instead of parsing JSON into a million-entry dict (benchmarks/scale.py). `.embed.lock` is
    held by `embedding()` while a process embeds, so a second `ovr embed` of the same data waits and then embeds
    only what the first did not.
    """

    COMPACT = 64

    def __init__(self, root: str | Path, backbone_key: str, dtype: torch.dtype | None = None) -> None:
        self.dir = Path(root) / backbone_key[:24]
        self.dtype = dtype  # of new shards (None: float32); reads always return float32
        self._load_index()

    # --- the index ---------------------------------------------------------------------------------------------

    def _read_npz(self, present: set[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """The index, without the rows of shards no longer in `present` (deleted by hand)."""
        empty = (np.empty(0, dtype="S64"), np.empty((0, 2), dtype=np.uint32), [])
        p = self.dir / "index.npz"
        if not p.is_file():
            return empty
        try:
            with np.load(p, allow_pickle=False) as z:
                keys, loc, shards = z["keys"], z["loc"], [str(s) for s in z["shards"]]
        except Exception:  # a damaged index is only a lost shortcut: the shards are listed and read again
            return empty
        if keys.dtype != np.dtype("S64") or loc.shape != (len(keys), 2):
            return empty
        if len(loc) and int(loc[:, 0].max()) >= len(shards):
            return empty  # an index pointing at shards it does not name: only a lost shortcut
        if any(s not in present for s in shards):
            alive = np.array([s in present for s in shards] or [False])
            keep = alive[loc[:, 0]] if len(loc) else np.zeros(0, dtype=bool)
            keys, loc = keys[keep], loc[keep]
        return keys, loc, shards

    def _on_disk(self) -> list[str]:
        return sorted(p.name for p in self.dir.glob("shard-*.safetensors")) if self.dir.is_dir() else []

    @staticmethod
    def _shard_keys(path: Path) -> list[str] | None:
        try:
            with safe_open(str(path), "np") as f:
                keys = json.loads(f.metadata()["keys"])
            return keys if isinstance(keys, list) else None
        except Exception:
            return None  # an unreadable shard is treated as absent; its images get embedded again

    def _load_index(self, compact: bool = True) -> None:
        on_disk = self._on_disk()
        keys, loc, shards = self._read_npz(set(on_disk))
        covered = set(shards)
        self._keys, self._loc, self._shards = keys, loc, shards
        self._extra: dict[str, tuple[str, int]] = {}  # keys of shards the index does not cover yet
        uncovered = [s for s in on_disk if s not in covered]
        for s in uncovered:
            for row, k in enumerate(self._shard_keys(self.dir / s) or []):
                self._extra.setdefault(k, (s, row))
        if compact and (len(uncovered) > self.COMPACT or (self._legacy() and uncovered)):
            self._compact()

    def _legacy(self) -> bool:
        return (self.dir / "index.json").is_file()

    def _compact(self) -> None:
        """Rebuild index.npz to cover every shard on disk (under the index lock; atomic replace)."""
        try:
            with self._lock(".index.lock"):
                on_disk = self._on_disk()
                keys, loc, shards = self._read_npz(set(on_disk))
                names = list(shards)
                cols_k, cols_l = [keys], [loc]
                for s in on_disk:
                    if s in shards:
                        continue
                    ks = self._shard_keys(self.dir / s)
                    if ks is None:
                        continue
                    names.append(s)
                    cols_k.append(np.array(ks, dtype="S64"))
                    cols_l.append(np.stack([np.full(len(ks), len(names) - 1), np.arange(len(ks))], 1).astype(np.uint32))
                K, L = np.concatenate(cols_k), np.concatenate(cols_l)
                order = np.argsort(K, kind="stable")  # stable: where a content is in two shards, the older wins
                K, L = K[order], L[order]
                first = np.ones(len(K), dtype=bool)
                first[1:] = K[1:] != K[:-1]
                buf = io.BytesIO()
                np.savez(buf, keys=K[first], loc=L[first], shards=np.array(names, dtype=str))
                atomic_write_bytes(self.dir / "index.npz", buf.getvalue())
                if self._legacy():
                    (self.dir / "index.json").unlink()
        except PermissionError:
            return  # a read-only cache still serves reads; the index is only a shortcut
        self._load_index(compact=False)

    def _search(self, keys: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Binary search of the index: (position, found) per key."""
        if not keys or not len(self._keys):
            return np.zeros(len(keys), dtype=np.int64), np.zeros(len(keys), dtype=bool)
        q = np.array(keys, dtype="S64")
        pos = np.searchsorted(self._keys, q).clip(0, len(self._keys) - 1)
        return pos, self._keys[pos] == q

    def _find(self, keys: list[str]) -> list[tuple[str, int] | None]:
        """(shard, row) of each key, or None."""
        out: list[tuple[str, int] | None] = [self._extra.get(k) for k in keys]
        ask = [i for i, o in enumerate(out) if o is None]
        if ask:
            pos, hit = self._search([keys[i] for i in ask])
            for i, p, h in zip(ask, pos.tolist(), hit.tolist()):
                if h:
                    s, row = self._loc[p]
                    out[i] = (self._shards[int(s)], int(row))
        return out

    def contains(self, keys: list[str]) -> list[bool]:
        """Membership of many keys at once (vectorised; `key in cache` asks for one)."""
        return [f is not None for f in self._find(keys)]

    def _lock(self, name: str):
        from filelock import FileLock

        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise OvrError(f"the embedding cache {self.dir} cannot be a folder: something in its path is a file; "
                           f"pass --cache-dir (or set $OVR_CACHE_DIR) to a folder") from None
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

    # --- contents that could not be decoded ------------------------------------------------------------------

    REFUSED = "refused.json"

    def refused(self) -> dict[str, str]:
        """Content key -> why it could not be embedded, for contents a run refused: a warm run skips them with the
        same reason instead of decoding them again (they are the same bytes, so the same answer)."""
        try:
            data = json.loads((self.dir / self.REFUSED).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, str)} if isinstance(data, dict) else {}

    def refuse(self, reasons: dict[str, str]) -> None:
        """Remember refused contents (call under the embed lock; the file is replaced atomically)."""
        if not reasons:
            return
        from ..atomic import atomic_write_bytes

        merged = {**self.refused(), **reasons}
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.dir / self.REFUSED, json.dumps(merged, sort_keys=True).encode())

    def __contains__(self, key: str) -> bool:
        return self._find([key])[0] is not None

    def __len__(self) -> int:
        return len(self._keys) + int((~self._search(list(self._extra))[1]).sum())

    def put(self, keys: list[str], emb: torch.Tensor) -> None:
        """A new immutable shard (its keys in its metadata); no index rewrite: the next opener finds it by listing."""
        if not keys:
            return
        import torch

        name = f"shard-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.safetensors"
        rows = (emb.to(self.dtype) if self.dtype is not None else emb.float()).cpu()
        bad = ~torch.isfinite(rows).all(1)
        if bad.any():  # never stored: a NaN row would be answered as "confidence: NaN" for good
            raise OvrError(f"the backbone gave non-finite embeddings for {int(bad.sum())} of {len(keys)} images "
                           f"(not cached); check the backbone's weights")
        atomic_save_safetensors({"embeddings": rows}, self.dir / name, {"keys": json.dumps(keys),
                                                                        "sha256": _digest(rows)})
        for row, k in enumerate(keys):
            self._extra.setdefault(k, (name, row))

    def get(self, keys: list[str]) -> torch.Tensor:
        """Rows for keys, in order; a key not in the cache is an OvrError naming how many are missing."""
        import torch

        found = self._find(keys)
        absent = sum(f is None for f in found)
        if absent:
            raise OvrError(f"{absent} embeddings are not in the cache {self.dir}; run `ovr embed` on the data again")
        by_shard: dict[str, list[tuple[int, int]]] = {}
        for i, (s, row) in enumerate(found):
            by_shard.setdefault(s, []).append((i, row))
        out: torch.Tensor | None = None
        for s, pairs in by_shard.items():
            shard = self._verified(s)
            dst = torch.tensor([p[0] for p in pairs])
            src = torch.tensor([p[1] for p in pairs])
            if int(src.max()) >= len(shard):  # the index points past the shard: rebuild it from the shards
                (self.dir / "index.npz").unlink(missing_ok=True)
                self._load_index(compact=False)
                raise DamagedCache(f"the embedding cache index in {self.dir} pointed past shard {s}; it was "
                                   f"rebuilt from the shards: run the command again")
            if out is None:
                out = torch.empty(len(keys), shard.shape[1])
            out[dst] = shard[src].float()  # float16 shards are widened on read
        return out if out is not None else torch.empty(0, 0)

    def _verified(self, name: str) -> "torch.Tensor":
        """A shard's rows, checked against the checksum written with them (shards from before checksums: their
        values are checked to be finite); a damaged shard is set aside (renamed damaged-*) and DamagedCache
        raised, so that the next embedding run embeds its images again."""
        import torch

        path = self.dir / name
        why = None
        try:
            with safe_open(str(path), "pt") as f:
                rows = f.get_tensor("embeddings")
                meta = f.metadata() or {}
            keys = json.loads(meta.get("keys", "[]"))
            if rows.ndim != 2 or len(rows) != len(keys):
                why = f"{len(keys)} keys for rows of shape {list(rows.shape)}"
            elif "sha256" in meta:  # rows are checked finite before they are written: the checksum is enough
                why = None if _digest(rows) == meta["sha256"] else "its rows do not match their checksum"
            elif not bool(torch.isfinite(rows).all()):
                why = "it holds non-finite values"
        except Exception as e:  # noqa: BLE001  (truncated or garbled file: the reason in words)
            why = f"it cannot be read ({describe_error(e)})"
        if why is None:
            return rows
        try:
            os.replace(path, self.dir / f"damaged-{name}")
        except OSError:
            pass
        self._load_index(compact=False)
        raise DamagedCache(f"embedding cache shard {path} is damaged ({why}); it was set aside: run the command "
                           f"again to embed its images anew")

