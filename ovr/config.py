"""Run configuration: frozen dataclasses, filled from a TOML file and then from CLI flags (flags win)."""
from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import OvrError, read_parsed

HEADS = ("linear", "mlp", "ridge")
ENGINES = ("auto", "torch", "onnxruntime")  # what runs the backbone (ovr/embedding/engine.py)
GATES = ("lda", "ridge", "softmax")
L2_SEARCH = ("path", "sweep")
NORMALIZE = ("standardize", "l2")
CALIBRATION = ("platt", "temperature", "none")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise OvrError(f"config: {message}")


@dataclass(frozen=True)
class FeatureConfig:
    backbone: str = "efficientnet_lite0"
    weights: str = "default"  # "default" (the backbone's pretrained weights), "none" (random init) or a file
    device: str = "auto"
    batch_size: int = 64
    workers: int = -1  # -1: on CUDA all cores but one; on CPU the cores left by the compute threads (at most 8)
    cache_dir: str = ""  # "": $OVR_CACHE_DIR or the user's cache dir
    dtype: str = "auto"  # how new embeddings are stored: float32 | float16 | auto (float16 on CUDA, float32 on CPU)
    decode: str = "auto"  # pil | tensor (torchvision.io + tensor resize; nvJPEG on CUDA) | auto (= tensor)
    strict: bool = False  # a bad image file is an error instead of a skipped file
    engine: str = "auto"  # the backbone's forward pass: torch | onnxruntime | auto (onnxruntime on CPU if installed)
    # What the backbone sees of each image: crop (its own resize + centre crop) | full (the whole image resized to
    # the input size) | auto (crop for single-label data, full for multi-label: objects sit at the borders there)
    frame: str = "auto"

    def __post_init__(self) -> None:
        _check(self.engine in ENGINES, f"engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        _check(self.frame in ("auto", "crop", "full"), f"frame must be auto, crop or full, got {self.frame!r}")
        _check(self.batch_size >= 1, f"batch_size must be at least 1, got {self.batch_size}")
        _check(self.workers >= -1, f"workers must be -1 (one per core) or more, got {self.workers}")
        _check(self.dtype in ("auto", "float32", "float16"), f"dtype must be auto, float32 or float16, got {self.dtype!r}")
        _check(self.decode in ("auto", "pil", "tensor"), f"decode must be auto, pil or tensor, got {self.decode!r}")

    def frame_for(self, multilabel: bool) -> str:
        """'auto' resolved for the data: the whole image for multi-label data, the centre crop otherwise
        (benchmarks/multilabel_frame.py measured both on both kinds of data)."""
        return ("full" if multilabel else "crop") if self.frame == "auto" else self.frame

    @property
    def decode_path(self) -> str:
        """'auto' is the tensor path on every device (ovr.pixels): on CUDA, CPU decoding is what limits the GPU,
        and on a CPU the tensor path's resize is the cheaper one (benchmarks/embed_throughput.py). Not tied to the
        device, so a cache's namespace is not either."""
        return "tensor" if self.decode == "auto" else self.decode


@dataclass(frozen=True)
class DataConfig:
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    split_seed: int = 0

    def __post_init__(self) -> None:
        for name in ("val_fraction", "test_fraction"):
            _check(0 <= getattr(self, name) < 1, f"{name} must be in [0, 1), got {getattr(self, name)}")
        _check(self.val_fraction + self.test_fraction < 1,
               f"val_fraction + test_fraction must leave images to train on, got {self.val_fraction + self.test_fraction}")


@dataclass(frozen=True)
class TrainConfig:
    head: str = "linear"  # linear (BCE, exact L-BFGS) | mlp (BCE, Adam) | ridge (closed form from the statistics)
    hidden: int = 256
    epochs: int = 100  # mlp heads (Adam) and the softmax baseline; linear heads are solved exactly
    lr: float = 3e-3
    head_batch_size: int = 128
    patience: int = 10
    # L2 strengths in the per-sample-mean scale (scikit-learn's C = 1 / (l2 * n)): half-decades from 1e-4 to 10.
    # Each head keeps the one with its best validation loss, then is refit on train + val.
    l2_grid: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0, 10.0)
    # How linear heads search l2_grid: path (strong to weak, warm-started; a head stops after two strengths without
    # a better validation loss) | sweep (every strength solved for every head)
    l2_search: str = "path"
    # The path runs on at most this many training rows (a seeded random subset; 0: all), and each head is then solved
    # on all rows at the strength it chose, moved to the row count (heads.search_path)
    search_rows: int = 20000
    tol: float = 1e-4  # linear heads: stop when max |gradient| of a head's objective is below this (scikit-learn's default tol, same scale)
    max_iter: int = 500  # linear heads: L-BFGS iterations at most
    pos_weight: bool = True
    normalize: str = "standardize"  # standardize | l2
    calibration: str = "platt"  # platt | temperature | none
    seed: int = 0
    views: int = 0  # augmented views per training image, besides the plain one (validation and test stay plain)
    # The model's statistics (and so ridge heads and the gate) use relu(x @ R) for a seeded Gaussian R [D, M], with
    # M = min(stats_features, 4 D); 0: the embeddings themselves. The Gram matrix is M^2 float64 numbers.
    stats_features: int = 2048
    # The gate of a grown model: lda | ridge (both exact, from the statistics) | softmax (refit on every remembered
    # row at each add-class; kept to be measured against)
    gate: str = "lda"
    chunk_heads: int = 0  # heads (linear: columns) per solve; 0: automatic (model.solve_columns, heads_per_chunk); results do not depend on it

    def __post_init__(self) -> None:
        _check(self.views >= 0, f"views must be 0 or more, got {self.views}")
        _check(self.stats_features >= 0, f"stats_features must be 0 (the embeddings) or more, got {self.stats_features}")
        _check(self.l2_search in L2_SEARCH, f"l2_search must be one of {', '.join(L2_SEARCH)}, got {self.l2_search!r}")
        _check(self.gate in GATES, f"gate must be one of {', '.join(GATES)}, got {self.gate!r}")
        _check(self.chunk_heads >= 0, f"chunk_heads must be 0 (automatic) or more, got {self.chunk_heads}")
        _check(self.search_rows >= 0, f"search_rows must be 0 (all rows) or more, got {self.search_rows}")
        for name, allowed in (("head", HEADS), ("normalize", NORMALIZE), ("calibration", CALIBRATION)):
            _check(getattr(self, name) in allowed, f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        for name in ("hidden", "epochs", "head_batch_size", "patience"):
            _check(getattr(self, name) >= 1, f"{name} must be at least 1, got {getattr(self, name)}")
        _check(self.lr > 0, f"lr must be positive, got {self.lr}")
        _check(self.tol > 0, f"tol must be positive, got {self.tol}")
        _check(self.max_iter >= 1, f"max_iter must be at least 1, got {self.max_iter}")
        _check(len(self.l2_grid) > 0 and all(v >= 0 for v in self.l2_grid),
               f"l2_grid must hold one or more values >= 0, got {list(self.l2_grid)}")

    def fit_kwargs(self) -> dict:
        """The keyword arguments of heads.fit_ovr_heads."""
        return dict(head=self.head, hidden=self.hidden, epochs=self.epochs, lr=self.lr, batch_size=self.head_batch_size,
                    patience=self.patience, l2_grid=self.l2_grid, pos_weight=self.pos_weight, seed=self.seed,
                    tol=self.tol, max_iter=self.max_iter, l2_search=self.l2_search, search_rows=self.search_rows)


@dataclass(frozen=True)
class BenchConfig:
    seeds: int = 3
    sklearn: bool = True
    sklearn_max_samples: int = 20000
    few_shot_k: int = 5
    imbalance_ratio: float = 0.1  # the subsampled classes keep this fraction of their training images

    def __post_init__(self) -> None:
        _check(self.seeds >= 1, f"seeds must be at least 1, got {self.seeds}")
        _check(self.few_shot_k >= 1, f"few_shot_k must be at least 1, got {self.few_shot_k}")
        _check(0 < self.imbalance_ratio <= 1, f"imbalance_ratio must be in (0, 1], got {self.imbalance_ratio}")


@dataclass(frozen=True)
class AnswerOptions:
    """How to answer. `calibrated`: report the per-head calibrated confidences. `reject_below`: unknown below this
    confidence. `thresholds`: unknown when the answer's head does not pass its stored threshold. `multilabel`: also
    every class that passes its threshold. `top_k`: classes listed per row. `tta`: augmented views averaged in."""
    calibrated: bool = False
    reject_below: float | None = None
    thresholds: bool = False
    multilabel: bool = False
    top_k: int = 1
    tta: int = 0

    def __post_init__(self) -> None:
        rb = self.reject_below
        if rb is not None and (isinstance(rb, bool) or not isinstance(rb, (int, float)) or not math.isfinite(rb)
                               or not 0 <= rb <= 1):
            raise OvrError(f"reject_below must be a number in [0, 1], got {rb!r}")
        for name in ("top_k", "tta"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise OvrError(f"{name} must be a whole number, got {v!r}")
        if self.top_k < 1:
            raise OvrError(f"top_k must be at least 1, got {self.top_k}")
        if self.tta < 0:
            raise OvrError(f"tta must be 0 (off) or more views, got {self.tta}")


@dataclass(frozen=True)
class Config:
    features: FeatureConfig = field(default_factory=FeatureConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)


SECTIONS = {f.name: f.type for f in fields(Config)}
_CLASSES = {"features": FeatureConfig, "data": DataConfig, "train": TrainConfig, "bench": BenchConfig}


def _coerce(cls: type, name: str, value: Any) -> Any:
    default = getattr(cls(), name)
    if isinstance(default, tuple):
        return tuple(float(v) for v in value)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise OvrError(f"config: {name} must be true or false, got {value!r}")
        return value
    if isinstance(default, (int, float)) and not isinstance(value, (int, float)):
        raise OvrError(f"config: {name} must be a number, got {value!r}")
    return type(default)(value)


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None,
                stored: dict[str, dict[str, Any]] | None = None) -> Config:
    """Defaults < `stored` (a model's saved config, by section) < the TOML file's [features]/[data]/[train]/[bench]
    tables < non-None overrides (flags) by field name."""
    values: dict[str, dict[str, Any]] = {s: {} for s in _CLASSES}
    for section, table in (stored or {}).items():
        if section in _CLASSES and isinstance(table, dict):
            known = {f.name for f in fields(_CLASSES[section])}
            values[section].update({k: _coerce(_CLASSES[section], k, v) for k, v in table.items() if k in known})
    if path is not None:
        p = Path(path)
        raw = read_parsed(p, tomllib.loads, (tomllib.TOMLDecodeError,), missing=f"config file not found: {p}",
                          invalid=f"config file {p} is not valid TOML")
        for section, table in raw.items():
            if section not in _CLASSES or not isinstance(table, dict):
                raise OvrError(f"config file {p}: unknown section [{section}] (expected {', '.join(_CLASSES)})")
            known = {f.name for f in fields(_CLASSES[section])}
            for k, v in table.items():
                if k not in known:
                    raise OvrError(f"config file {p}: unknown key {k!r} in [{section}]")
                values[section][k] = _coerce(_CLASSES[section], k, v)
    for k, v in (overrides or {}).items():
        if v is None:
            continue
        owners = [s for s, c in _CLASSES.items() if k in {f.name for f in fields(c)}]
        if not owners:
            raise ValueError(f"unknown config field {k!r}")
        for s in owners:
            values[s][k] = _coerce(_CLASSES[s], k, v)
    return Config(**{s: _CLASSES[s](**values[s]) for s in _CLASSES})


def config_to_dict(cfg: Config) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def config_to_toml(cfg: Config) -> str:
    """The resolved config as TOML that `--config` reads back (values are flat scalars or lists of numbers)."""
    lines = []
    for section, table in config_to_dict(cfg).items():
        lines.append(f"[{section}]")
        for k, v in table.items():
            lines.append(f"{k} = {json.dumps(v)}")
        lines.append("")
    return "\n".join(lines)
