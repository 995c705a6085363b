"""The benchmarks' data, all offline: synthetic features, and two real image sets embedded by the default backbone
(EfficientNet-Lite0) through ovr's cache: scikit-learn's digits, and "photos": 16 classes of crops of the real
photographs that ship with scikit-image and scikit-learn (each class is one photograph; small grey 64x64 crops of
random size and place, flipped, with brightness/contrast jitter and noise, so the classes must be told apart by
texture and content; joint OvR accuracy is about 0.8, not 1.0).
Each loader returns (X, y, Xv, yv, Xt, yt) as float32 numpy arrays and int labels."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

PHOTOS = ("astronaut", "brick", "camera", "chelsea", "coffee", "coins", "grass", "gravel", "hubble_deep_field",
          "immunohistochemistry", "moon", "retina", "rocket", "cell", "china.jpg", "flower.jpg")


def cache_dir() -> str:
    return os.environ.get("OVR_CACHE_DIR") or str(Path(tempfile.gettempdir()) / "ovr-bench-cache")


def synthetic(seed: int = 0):
    from sklearn.datasets import make_classification

    X, y = make_classification(n_samples=24000, n_features=512, n_informative=128, n_redundant=0, n_classes=100,
                               n_clusters_per_class=1, class_sep=2.5, random_state=seed)
    X = X.astype(np.float32)
    return X[:20000], y[:20000], X[20000:22000], y[20000:22000], X[22000:], y[22000:]


def classification64(n: int, class_sep: float, seed: int = 0, held_out: int = 20000):
    """make_classification with 64 classes and 384 features (96 informative), standardised by the first n rows:
    85% of them to train, 15% to validate, `held_out` more rows to test. -> (Xtr, T, Xv, Tv, Xt, yt, names),
    X as tensors and T, Tv one-hot targets."""
    import torch
    from sklearn.datasets import make_classification

    X, y = make_classification(n_samples=n + held_out, n_features=384, n_informative=96, n_redundant=0, n_classes=64,
                               n_clusters_per_class=1, class_sep=class_sep, random_state=seed)
    X = X.astype(np.float32)
    X = (X - X[:n].mean(0)) / X[:n].std(0)
    cut = int(n * 0.85)
    Xtr, Xv, Xt = (torch.from_numpy(a) for a in (X[:cut], X[cut:n], X[n:]))
    T, Tv = (torch.nn.functional.one_hot(torch.from_numpy(a), 64).float() for a in (y[:cut], y[cut:n]))
    return Xtr, T, Xv, Tv, Xt, y[n:], [f"c{k}" for k in range(64)]


def write_photos_folder(root: Path, per_class: int = 60, size: int = 64) -> Path:
    from PIL import Image, ImageEnhance, ImageOps
    from skimage import data as skd
    from sklearn.datasets import load_sample_images

    if (root / ".complete").exists():
        return root
    sample = dict(zip(("china.jpg", "flower.jpg"), load_sample_images().images))
    for ci, name in enumerate(PHOTOS):
        arr = sample[name] if name in sample else getattr(skd, name)()
        img = Image.fromarray(np.asarray(arr)[..., :3] if np.asarray(arr).ndim == 3 else np.asarray(arr)).convert("L")
        rng = np.random.default_rng(ci)
        W, H = img.size
        out = root / name.split(".")[0]
        out.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            s = int(min(W, H) * rng.uniform(0.1, 0.3))
            x, y = rng.integers(0, W - s + 1), rng.integers(0, H - s + 1)
            crop = img.crop((x, y, x + s, y + s)).resize((size, size), Image.BILINEAR)
            if rng.random() < 0.5:
                crop = ImageOps.mirror(crop)
            crop = ImageEnhance.Brightness(crop).enhance(rng.uniform(0.6, 1.4))
            crop = ImageEnhance.Contrast(crop).enhance(rng.uniform(0.5, 1.5))
            noisy = np.asarray(crop, dtype=np.float64) + rng.normal(0, 12, (size, size))
            Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).convert("RGB").save(out / f"{i:03d}.png")
    (root / ".complete").touch()
    return root


def _embedded(root: Path, device: str):
    from ovr.config import load_config
    from ovr.apps.pipeline import embed_data

    cfg = load_config(None, {"cache_dir": cache_dir(), "device": device})
    emb = embed_data(root, cfg)
    return tuple(v for s in ("train", "val", "test") for v in
                 (lambda X, y, _: (X.cpu().numpy().astype(np.float32), y.numpy()))(*emb.split(s))), emb.folder.classes


def digits(device: str = "cpu"):
    from ovr.embedding.data import write_digits_folder

    root = Path(cache_dir()) / "digits-images"
    write_digits_folder(root)
    return _embedded(root, device)


def photos(device: str = "cpu"):
    return _embedded(write_photos_folder(Path(cache_dir()) / "photos3-images"), device)


def photos_large(device: str = "cpu"):
    """The same 16 classes with 180 crops each instead of 60: three times the test images per class, for measures
    that the photos' small test sets leave to noise (one image is 0.7 points of the photos' 144)."""
    return _embedded(write_photos_folder(Path(cache_dir()) / "photos180-images", per_class=180), device)
