import os

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
