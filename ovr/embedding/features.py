"""Embeddings: images -> backbone forward passes (decoding in DataLoader workers) -> the cache -> rows on device."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..runtime import usable_cores
from .backbones import Backbone
from .cache import EmbeddingCache, hash_files
from .data import ImageFolder, describe_error, map_decoding, read_image_file
from ..errors import OvrError
from .pixels import Pixels
from .views import augment, view_key, view_seed

Progress = Callable[[str, int, int], None]  # (stage, done, total)


class _Decode(torch.utils.data.Dataset):
    """Reading, decoding and preprocessing run in DataLoader workers, overlapped with the forward pass (JPEGs bound
    for a CUDA decoder leave the workers as bytes: ovr.pixels); without workers (a CPU whose cores the forward
    pass uses), between forward passes on `threads` threads."""

    def __init__(self, blobs: list[Path], pixels: Pixels, aug_seeds: list[int | None] | None = None,
                 threads: int = 1) -> None:
        self.paths, self.pixels, self.aug_seeds, self.threads = blobs, pixels, aug_seeds, threads

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            seed = self.aug_seeds[i] if self.aug_seeds is not None else None
            aug = (lambda im: augment(im, seed)) if seed is not None else None
            return self.pixels.item(read_image_file(self.paths[i]), aug), i, ""
        except Exception as e:
            return None, i, describe_error(e)

    def __getitems__(self, idx: list[int]) -> list:
        """A batch's items (the DataLoader asks for a batch at once). With `threads` > 1 (no worker processes: the
        forward pass has the cores, and decoding runs between its batches) on that many threads when its files
        average THREADED_DECODE_BYTES or more: one image's resize is too small for torch's own threads to share, a
        batch of them is not; small images decode in less time than threads take to hand the GIL around."""
        threads = self.threads
        if threads > 1 and sum(_file_size(self.paths[i]) for i in idx) < THREADED_DECODE_BYTES * len(idx):
            threads = 1
        return map_decoding(self.__getitem__, idx, threads)


# Mean file size of a batch from which decoding it on threads gains: below it (tiny PNGs, thumbnails) threads were
# slower than one, above it faster (`benchmarks/embed_throughput.py --only-decode-threads` measures both).
THREADED_DECODE_BYTES = 10_000


def _file_size(path: Path) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0  # reading it will say what is wrong


def _collate(batch):
    return [b[0] for b in batch if b[0] is not None], [b[1] for b in batch if b[0] is not None], \
        [(b[1], b[2]) for b in batch if b[0] is None]


@dataclass
class EmbedResult:
    paths: list[Path]  # the usable images, in input order
    keys: list[str]  # their content keys
    embeddings: torch.Tensor  # [len(paths), dim] on the compute device
    input_index: np.ndarray  # position of each usable image in the input list
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    n_cached: int = 0
    n_new: int = 0
    seconds: float = 0.0


def default_workers(workers: int, device: torch.device | str = "cpu") -> int:
    """Decode workers: `workers` if >= 0. Otherwise, on CUDA, all cores but the one feeding the GPU (up to 8):
    decoding is what limits a GPU (benchmarks/gpu_check.sh measures it). On CPU the
    forward pass needs the cores too: workers + torch's compute threads never exceed the cores (on 2 cores with
    2 compute threads, decoding runs in the main process), so the two pools do not fight over them."""
    if workers >= 0:
        return workers
    cores = usable_cores()
    if torch.device(device).type == "cuda":
        return max(0, min(8, cores - 1))
    return max(0, min(8, cores - torch.get_num_threads()))


def forward(backbone: Backbone, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch of inputs (ovr.pixels) -> embeddings on the device."""
    if backbone.engine != "torch":
        return backbone.run(x.contiguous()).to(device)
    x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
        return backbone.run(x).float()


# A shard is written every SHARD_SIZE images or FLUSH_SECONDS ($OVR_FLUSH_SECONDS), whichever comes first: with the
# default backbone on 2 CPU cores 1,024 images took 150 s, all lost to a kill -9; by time, a kill loses ~10 s.
SHARD_SIZE = 1024
FLUSH_SECONDS = 10.0


def _todo(keys: list[str | None], cache: EmbeddingCache) -> dict[str, int]:
    todo: dict[str, int] = {}  # one forward per distinct content, even if a file appears twice
    known = keys_in(cache, keys)
    for i, k in enumerate(keys):
        if k is not None and not known[i] and k not in todo:
            todo[k] = i
    return todo


def keys_in(cache: EmbeddingCache, keys: list[str | None]) -> list[bool]:
    """Which keys the cache holds, in one vectorised lookup (None: no)."""
    real = [i for i, k in enumerate(keys) if k is not None]
    found = cache.contains([keys[i] for i in real])
    out = [False] * len(keys)
    for i, f in zip(real, found):
        out[i] = f
    return out


def embed_paths(paths: list[Path], backbone: Backbone, cache: EmbeddingCache, device: torch.device, **kw
                ) -> EmbedResult:
    """`_embed_paths` (below), once more if a cache shard turns out damaged when its rows are gathered: the
    shard is set aside by the cache, so the second pass embeds its images again."""
    from .cache import DamagedCache

    try:
        return _embed_paths(paths, backbone, cache, device, **kw)
    except DamagedCache:
        if kw.get("world", 1) > 1:
            raise
        return _embed_paths(paths, backbone, cache, device, **kw)


def _embed_paths(paths: list[Path], backbone: Backbone, cache: EmbeddingCache, device: torch.device,
                *, batch_size: int = 64, workers: int = -1, strict: bool = False, progress: Progress | None = None,
                shard_size: int = SHARD_SIZE, flush_seconds: float | None = None, gather: bool = True,
                rank: int = 0, world: int = 1,
                hashed: tuple[list[str | None], list[tuple[Path, str]]] | None = None) -> EmbedResult:
    """Embed what the cache lacks (a shard every shard_size images or flush_seconds), then gather all rows on
    device (gather=False: only count them; `ovr embed` reports a summary and needs no rows). Another process
    embedding into the same cache is waited for; then only what it left is embedded. Under torchrun (world > 1)
    this rank embeds every world-th missing content (by key order), and all ranks meet before the gather.
    hashed: hash_files(paths) when the caller has it already (`ovr embed` hashes once for its warm check)."""
    t0 = time.perf_counter()
    if flush_seconds is None:
        flush_seconds = float(os.environ.get("OVR_FLUSH_SECONDS", FLUSH_SECONDS))
    paths = [Path(p) for p in paths]
    if world > 1 and os.environ.get("OVR_TEST_RANK_DELAY", "").startswith(f"{rank}:"):  # test hook: a late rank
        time.sleep(float(os.environ["OVR_TEST_RANK_DELAY"].split(":")[1]))
    keys, skipped = (list(hashed[0]), list(hashed[1])) if hashed is not None else hash_files(paths, progress)
    failed: dict[int, str] = {}
    refused = cache.refused()
    for i, k in enumerate(keys):  # refused by an earlier run: the same bytes, the same answer, no decode
        if k is not None and k in refused:
            failed[i] = refused[k]
            keys[i] = None
    todo = _todo(keys, cache)
    n_todo = len(todo)
    if world > 1:
        from . import distributed

        # Every rank has read the cache before any rank writes to it: they agree on what is missing, so the
        # round-robin split covers each content exactly once (found by a test where one rank started late).
        distributed.barrier()
        mine = dict(sorted(todo.items())[rank::world])
        if mine:
            _embed_missing(paths, keys, mine, backbone, cache, failed, device=device, batch_size=batch_size,
                           workers=workers, progress=progress, shard_size=shard_size, flush_seconds=flush_seconds)
        distributed.barrier()
        cache.refresh()
        known = keys_in(cache, keys)
        for i, k in enumerate(keys):  # contents another rank could not decode
            if k is not None and not known[i] and i not in failed and k in todo:
                failed[i] = "could not be embedded (by another rank; see its output)"
    elif todo:
        n_todo = _embed_locked(paths, keys, backbone, cache, failed, device=device, batch_size=batch_size,
                               workers=workers, progress=progress, shard_size=shard_size, flush_seconds=flush_seconds)
    for i, why in sorted(failed.items()):
        skipped.append((paths[i], why))
    if strict and skipped:
        p, why = skipped[0]
        raise OvrError(f"cannot read image {p}: {why} (and {len(skipped) - 1} more)" if len(skipped) > 1
                       else f"cannot read image {p}: {why}")
    bad_idx = {i for i, k in enumerate(keys) if k is None} | set(failed)
    # a duplicate of a file that failed to decode fails too
    bad_keys = {keys[i] for i in failed}
    good = [i for i, k in enumerate(keys) if i not in bad_idx and k not in bad_keys]
    good_keys = [keys[i] for i in good]
    if gather and good_keys:
        emb = cache.get(good_keys).to(device)
    else:
        emb = torch.empty(0, backbone.dim)
        if good_keys and not all(cache.contains(good_keys)):
            raise OvrError(f"embeddings missing from the cache {cache.dir} after embedding; run again")
    n_new = n_todo - len({keys[i] for i in failed if keys[i] is not None})
    return EmbedResult([paths[i] for i in good], good_keys, emb, np.asarray(good, dtype=np.int64), skipped,
                       n_cached=len(good) - min(n_new, len(good)), n_new=n_new, seconds=time.perf_counter() - t0)


def _embed_locked(paths, keys, backbone, cache, failed: dict[int, str], **kw) -> int:
    """Under the cache's embed lock, embed what is still missing (another process may have embedded some of it
    while this one waited); -> how many contents were missing."""
    progress = kw.get("progress")
    with cache.embedding(waiting=lambda: progress and progress("wait for another ovr embed", 0, 1)):
        todo = _todo(keys, cache)
        if todo:
            before = set(failed)
            try:
                _embed_missing(paths, keys, todo, backbone, cache, failed, **kw)
            finally:
                cache.refuse({keys[i]: why for i, why in failed.items() if i not in before and keys[i] is not None})
    return len(todo)


def _test_die_after_shard() -> None:
    """A test hook: $OVR_TEST_DIE_AFTER_SHARDS=N kills this process (as kill -9 would) after its N-th shard, on
    the rank named by $OVR_TEST_DIE_RANK (default every rank)."""
    n = os.environ.get("OVR_TEST_DIE_AFTER_SHARDS")
    if not n or os.environ.get("OVR_TEST_DIE_RANK", os.environ.get("RANK", "0")) != os.environ.get("RANK", "0"):
        return
    global _SHARDS_WRITTEN
    _SHARDS_WRITTEN += 1
    if _SHARDS_WRITTEN >= int(n):
        os._exit(137)


_SHARDS_WRITTEN = 0


def _embed_missing(paths, keys, todo, backbone, cache, failed: dict[int, str], *, device, batch_size, workers,
                   progress, shard_size, flush_seconds, aug_seeds: list[int | None] | None = None,
                   stage: str = "embed") -> None:
    if backbone.engine == "torch":
        backbone.model.to(device).to(memory_format=torch.channels_last)
    order = list(todo.values())
    n_workers = default_workers(workers, device)
    seeds = [aug_seeds[i] for i in order] if aug_seeds is not None else None
    pixels = backbone.pixels(device)
    loader = torch.utils.data.DataLoader(
        _Decode([paths[i] for i in order], pixels, seeds, 1 if n_workers else torch.get_num_threads()),
        batch_size=batch_size, num_workers=n_workers,
        collate_fn=_collate, pin_memory=device.type == "cuda", persistent_workers=False,
        prefetch_factor=4 if n_workers else None)
    pend_keys: list[str] = []
    pend: list[torch.Tensor] = []
    done = 0
    last_flush = time.monotonic()
    if progress:
        progress(stage, 0, len(order))
    try:
        for items, idx, bad in loader:
            if items:
                xs, refused = pixels.batch(items)  # JPEGs a device decoder refused and PIL could not read
                gone = {p for p, _ in refused}
                bad = bad + [(idx[p], why) for p, why in refused]
                idx = [j for p, j in enumerate(idx) if p not in gone]
                if idx:
                    pend.append(forward(backbone, xs, device).cpu())
                    pend_keys.extend(keys[order[j]] for j in idx)
            for j, why in bad:
                failed[order[j]] = why
            done += len(idx) + len(bad)
            if len(pend_keys) >= shard_size or (pend_keys and time.monotonic() - last_flush >= flush_seconds):
                cache.put(pend_keys, torch.cat(pend))
                pend_keys, pend = [], []
                last_flush = time.monotonic()
                _test_die_after_shard()
            if progress:
                progress(stage, done, len(order))
    finally:
        # Ctrl-C keeps every finished batch: the next run resumes from here.
        if pend_keys:
            cache.put(pend_keys, torch.cat(pend))


def embed_views(paths: list[Path], keys: list[str], views: int, seed: int, backbone: Backbone,
                cache: EmbeddingCache, device: torch.device, *, batch_size: int = 64, workers: int = -1,
                progress: Progress | None = None) -> tuple[list[str], torch.Tensor]:
    """Augmented views 1..`views` of each (readable) image, through the cache: -> (view keys, embeddings
    [len(paths) * views, D] on device), image-major (the views of image 0, then of image 1, ...)."""
    if views <= 0 or not paths:
        return [], torch.empty(0, backbone.dim, device=device)
    v_paths = [Path(p) for p in paths for _ in range(views)]
    v_keys = [view_key(k, seed, v) for k in keys for v in range(1, views + 1)]
    v_seeds = [view_seed(seed, k, v) for k in keys for v in range(1, views + 1)]
    failed: dict[int, str] = {}
    if _todo(v_keys, cache):
        _embed_locked(v_paths, v_keys, backbone, cache, failed, device=device, batch_size=batch_size,
                      workers=workers, progress=progress, shard_size=SHARD_SIZE, flush_seconds=FLUSH_SECONDS,
                      aug_seeds=v_seeds, stage="views")
    if failed:  # the plain view decoded, so this is rare (a file changed underneath); say which
        i = min(failed)
        raise OvrError(f"cannot make augmented views of {v_paths[i]}: {failed[i]}")
    return v_keys, cache.get(v_keys).to(device)


def augmented_images(images: list, views: int, seed: int) -> list:
    """In-memory images (no file, no cache): views 1..`views` of each, image-major, seeded by pixel content."""
    from .cache import content_key

    out = []
    for im in images:
        k = content_key(im.convert("RGB").tobytes())
        out += [augment(im.convert("RGB"), view_seed(seed, k, v)) for v in range(1, views + 1)]
    return out


def embed_images(images: list, backbone: Backbone, device: torch.device, batch_size: int = 64) -> torch.Tensor:
    """PIL images -> embeddings, no cache (for the Python API on in-memory images)."""
    if backbone.engine == "torch":
        backbone.model.to(device).to(memory_format=torch.channels_last)
    pixels = backbone.pixels(device)
    out = [forward(backbone, pixels.batch([pixels.image(im) for im in images[i:i + batch_size]])[0], device)
           for i in range(0, len(images), batch_size)]
    return torch.cat(out) if out else torch.empty(0, backbone.dim, device=device)


@dataclass
class EmbeddedFolder:
    folder: ImageFolder
    result: EmbedResult
    labels: np.ndarray  # per usable image
    splits: np.ndarray
    backbone: Backbone | None = None

    def split(self, name: str, targets: bool = False) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """(X, y, keys) of one split; X stays on the compute device. targets=True: y is the multi-label target
        matrix [n, classes] (float 0/1) when the data has one."""
        m = self.splits == name
        idx = torch.from_numpy(np.flatnonzero(m)).to(self.result.embeddings.device)
        keys = [k for k, keep in zip(self.result.keys, m) if keep]
        if targets and self.folder.targets is not None:
            y = torch.from_numpy(self.folder.targets[self.result.input_index][m].astype(np.float32))
        else:
            y = torch.from_numpy(self.labels[m])
        return self.result.embeddings[idx], y, keys


def embed_folder(folder: ImageFolder, backbone: Backbone, cache: EmbeddingCache, device: torch.device,
                 batch_size: int = 64, workers: int = -1, strict: bool = False,
                 progress: Progress | None = None, **kw) -> EmbeddedFolder:
    res = embed_paths(folder.paths, backbone, cache, device, batch_size=batch_size, workers=workers, strict=strict,
                      progress=progress, **kw)
    return EmbeddedFolder(folder, res, folder.labels[res.input_index], folder.splits[res.input_index])
