import os
import socket
import threading
import time

os.environ["HF_HUB_OFFLINE"] = "1"  # any accidental hub access fails at once
os.environ.setdefault("OMP_NUM_THREADS", "2")

from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def make_image(path: Path, cls: int, i: int, size: int = 24) -> None:
    """A class-specific pattern (colour + stripe orientation) with per-image noise, so tiny_cnn can separate them."""
    rng = np.random.default_rng(cls * 1000 + i)
    arr = np.zeros((size, size, 3), np.float64)
    hue = np.array([(cls * 67) % 256, (cls * 131 + 40) % 256, (cls * 197 + 90) % 256], np.float64)
    yy, xx = np.mgrid[:size, :size]
    stripes = ((xx * np.cos(cls) + yy * np.sin(cls)) // 3 % 2)[..., None]
    arr = hue * (0.5 + 0.5 * stripes) + rng.normal(0, 12, (size, size, 3))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(path)


def make_folder(root: Path, n_classes: int = 3, per_class: int = 8, prefix: str = "c") -> Path:
    for c in range(n_classes):
        for i in range(per_class):
            make_image(root / f"{prefix}{c}" / f"img{i:03d}.png", c, i)
    return root


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("OVR_CACHE_DIR", str(d))
    return d


@pytest.fixture
def folder(tmp_path):
    return make_folder(tmp_path / "data")


@pytest.fixture
def tiny_cfg(cache_dir):
    from ovr.config import load_config

    return load_config(None, {"backbone": "tiny_cnn", "device": "cpu", "workers": 0, "cache_dir": str(cache_dir)})


RING_WIDTH = 0.45
SHAPES = ("circle", "square", "triangle", "cross", "ring")


def make_shape(path: Path, shape: str, i: int, size: int = 32) -> None:
    """A filled shape (circle, square, triangle, cross) or a ring, at a random place, size and colour on a random
    background: the synthetic set of the grown-model issue, where a circle head fires on rings."""
    from PIL import ImageDraw

    rng = np.random.default_rng(SHAPES.index(shape) * 10000 + i)
    bg = tuple(int(v) for v in rng.integers(0, 90, 3))
    fg = tuple(int(v) for v in rng.integers(150, 256, 3))
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    r = rng.uniform(0.22, 0.34) * size
    cx, cy = rng.uniform(r + 2, size - r - 2, 2)
    box = [cx - r, cy - r, cx + r, cy + r]
    if shape == "circle":
        d.ellipse(box, fill=fg)
    elif shape == "ring":
        d.ellipse(box, outline=fg, width=max(2, int(r * RING_WIDTH)))
    elif shape == "square":
        d.rectangle(box, fill=fg)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fg)
    elif shape == "cross":
        w = r * 0.35
        d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fg)
        d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fg)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


TINY = ["--backbone", "tiny_cnn", "--device", "cpu", "--workers", "0"]


def cli(*args):
    """Run the `ovr` CLI in-process (arguments may be paths)."""
    from typer.testing import CliRunner

    from ovr.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def served_model(base: Path, out: str = "m") -> tuple[Path, Path]:
    """A tiny model of 3 classes at BASE/OUT (its cache in BASE/cache) and a folder of 5 more classes to grow it
    with: the model the export and serve tests start from. -> (data, extra)."""
    os.environ["OVR_CACHE_DIR"] = str(base / "cache")
    data = make_folder(base / "data", n_classes=3, per_class=10)
    extra = make_folder(base / "extra", n_classes=5, per_class=10)
    assert cli("train", data, "--out", base / out, *TINY).exit_code == 0
    return data, extra


def cache_rows(cache_dir: Path) -> int:
    """Embeddings stored under a cache folder (rows over all its shards)."""
    from safetensors import safe_open

    n = 0
    for s in cache_dir.rglob("shard-*.safetensors"):
        with safe_open(str(s), "pt") as f:
            n += f.get_slice("embeddings").get_shape()[0]
    return n


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """`create_app` under uvicorn on 127.0.0.1 in a thread."""

    def __init__(self, model, **kw):  # kw: create_app's (token, model_name, max_upload_mb, ...)
        import uvicorn

        from ovr.apps.serve import create_app

        self.port = free_port()
        self.url = f"127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(create_app(model, device="cpu", **kw), host="127.0.0.1",
                                                    port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        for _ in range(300):
            if self.server.started:
                return self
            time.sleep(0.05)
        raise RuntimeError("server did not start")

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)
