"""Engines for the backbone's forward pass: torch, or onnxruntime (the backbone's ONNX graph, exported once per
backbone identity into the cache folder and reused by every command that embeds).

`auto` picks onnxruntime on the CPU when it is installed (on a CPU it runs the same convnet several times faster
than torch eager; `benchmarks/embed_throughput.py`), and torch on CUDA. The two engines share cache rows: their
embeddings agree to float32 rounding (tested), far below what moves an answer, so the engine is not part of the
cache key (it is recorded with a model, for the record only).
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import ENGINES
from ..errors import OvrError

if TYPE_CHECKING:
    import torch

    from .backbones import Backbone

OPSET = 17
BATCH_DIM = "batch"  # the graph's one free dimension, fixed in the sessions of frequent sizes (OrtForward)
INSTALL_HINT = "the onnxruntime engine needs onnxruntime and onnx (default dependencies): pip install onnxruntime onnx"
# How far the engines' embeddings may be apart (max |difference| / max |embedding|, float32; the measured figures
# are in the README): the cache is shared only because the difference is far below this.
TOLERANCE = 1e-4


def available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("onnxruntime", "onnx"))


def resolve_engine(engine: str, device: "torch.device") -> str:
    """The engine to use: `auto` is onnxruntime on the CPU where it is installed, else torch."""
    if engine not in ENGINES:
        raise OvrError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if engine == "torch" or (engine == "auto" and (device.type != "cpu" or not available())):
        return "torch"
    if device.type != "cpu":
        raise OvrError(f"the onnxruntime engine runs on the CPU here; use --device cpu or --engine torch "
                       f"(device is {device})")
    if not available():
        raise OvrError(INSTALL_HINT)
    return "onnxruntime"


def graph_file(cache_dir: str | Path, key: str) -> Path:
    """Where a backbone's graph lives: one file per backbone identity (name, weights fingerprint, preprocessing,
    decode path: the cache key `key`) and opset; its preprocessing record beside it (.json)."""
    return Path(cache_dir) / "engines" / f"{key}-opset{OPSET}.onnx"


def graph_path(cache_dir: str | Path, backbone: "Backbone") -> Path:
    return graph_file(cache_dir, backbone.key)


def export_backbone(backbone: "Backbone", path: Path) -> None:
    """The backbone alone as ONNX, float [B, 3, S, S] normalised pixels -> embeddings [B, D], written atomically.
    The TorchScript-based exporter: a convnet in a fraction of a second (the dynamo exporter takes far longer),
    with the dynamo exporter as the fallback where it is gone or refuses the model."""
    import io
    import warnings

    import torch

    from ..atomic import atomic_write_bytes

    model = backbone.model.float().eval()
    S = _input_size(backbone)
    x = torch.zeros(2, 3, S, S)
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(model, (x,), buf, input_names=["pixels"], output_names=["embeddings"],
                              dynamic_axes={"pixels": {0: BATCH_DIM}, "embeddings": {0: BATCH_DIM}},
                              opset_version=OPSET, dynamo=False)
            data = buf.getvalue()
        except Exception:  # noqa: BLE001  (any exporter failure: try the other exporter, which says why)
            prog = torch.onnx.export(model, (x,), input_names=["pixels"], output_names=["embeddings"],
                                     dynamic_shapes=({0: torch.export.Dim(BATCH_DIM, min=1)},),
                                     opset_version=max(OPSET, 18), dynamo=True, external_data=False, verbose=False)
            data = prog.model_proto.SerializeToString()
    path.parent.mkdir(parents=True, exist_ok=True)
    from .pixels import split_transform

    try:  # the preprocessing as data, so that a later process embeds without building the network
        record = split_transform(backbone.transform, backbone.decode).record()
    except OvrError:
        record = None  # a transform ovr cannot describe: the onnxruntime engine builds the network for it
    if record is not None:
        atomic_write_bytes(path.with_suffix(".json"), json.dumps(record).encode())
    atomic_write_bytes(path, data)


def saved_transform(backbone: "Backbone"):
    """The preprocessing saved beside the backbone's graph, or None (not exported yet)."""
    from .pixels import compose

    path = graph_path(backbone.engine_dir, backbone).with_suffix(".json")
    try:
        return compose(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _input_size(backbone: "Backbone") -> int:
    from .pixels import split_transform

    try:
        return split_transform(backbone.transform, backbone.decode).size
    except OvrError:
        return 224


class OrtForward:
    """An onnxruntime session with the call of a torch module: normalised pixels [B, 3, S, S] -> embeddings.

    A batch size met a second time gets a session of its own with the batch dimension fixed: the graph's other
    dimensions are static, so with the batch fixed too onnxruntime folds the shape arithmetic that convnets with
    computed ("same") padding carry and fuses those pads into the convolutions (same graph, same embeddings;
    `benchmarks/embed_throughput.py` measures the difference). At most FIXED such sessions, never replaced (each
    holds its own copy of the weights, and a server's varying batch sizes must not make one per call); every
    other size runs on one session with the batch left free: a run's last, smaller batch, one-image predicts."""

    FIXED = 2

    def __init__(self, path: Path, threads: int) -> None:
        self.path, self.threads = path, threads
        self.fixed: dict[int, object] = {}
        self.free = None
        self.seen: dict[int, int] = {}

    def _session(self, batch: int | None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        if batch is not None:
            opts.add_free_dimension_override_by_name(BATCH_DIM, batch)
        return ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])

    def open(self) -> "OrtForward":
        """Load the graph now (the free-batch session): a damaged file fails here, not at the first batch."""
        if self.free is None:
            self.free = self._session(None)
        return self

    def session_for(self, batch: int):
        if batch in self.fixed:
            return self.fixed[batch]
        self.seen[batch] = self.seen.get(batch, 0) + 1
        if self.seen[batch] >= 2 and len(self.fixed) < self.FIXED:
            self.fixed[batch] = self._session(batch)
            return self.fixed[batch]
        return self.open().free

    def run(self, x):
        """float32 numpy [B, 3, S, S] -> numpy embeddings [B, D] (no torch: the quick predict path uses it)."""
        import numpy as np

        x = np.ascontiguousarray(x, dtype=np.float32)
        return self.session_for(len(x)).run(None, {"pixels": x})[0]

    def __call__(self, x: "torch.Tensor") -> "torch.Tensor":
        import torch

        return torch.from_numpy(self.run(x.float().numpy()))


def attach(backbone: "Backbone", engine: str, device: "torch.device", cache_dir: str | Path) -> str:
    """Give the backbone the engine that `engine` resolves to on `device`; returns the engine's name. Nothing is
    built here: the graph is exported (into the cache folder, under its lock) and loaded on the first forward
    pass, so a run whose images are all cached never pays for it."""
    backbone.engine = resolve_engine(engine, device)
    backbone.engine_dir = Path(cache_dir)
    return backbone.engine


def session(backbone: "Backbone") -> OrtForward:
    """The backbone's onnxruntime forward, its graph exported on first use; as many threads as torch's pool (the
    free cores, or --threads / $OVR_THREADS, worked out once per process)."""
    from filelock import FileLock

    from ..runtime import configure_threads

    path = graph_path(backbone.engine_dir, backbone)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path.parent / ".export.lock")):
            if not path.exists():
                export_backbone(backbone, path)
    return OrtForward(path, configure_threads())
