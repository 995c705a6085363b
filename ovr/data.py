"""Images in: folder listing -> (paths, labels, splits, class names), seeded stratified splits, safe decoding."""
from __future__ import annotations

import glob
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .errors import OvrError

SPLITS = ("train", "val", "test")


@dataclass
class ImageFolder:
    root: Path
    classes: list[str]
    paths: list[Path]
    labels: np.ndarray  # int64 index into classes
    splits: np.ndarray  # str: train | val | test
    splits_given: bool  # True when the folder had train/val/test sub-folders

    def subset(self, split: str) -> tuple[list[Path], np.ndarray]:
        idx = np.flatnonzero(self.splits == split)
        return [self.paths[i] for i in idx], self.labels[idx]

    def counts(self) -> dict[str, dict[str, int]]:
        out = {c: {s: 0 for s in SPLITS} for c in self.classes}
        for lab, sp in zip(self.labels, self.splits):
            out[self.classes[lab]][sp] += 1
        return out


def _visible(p: Path) -> bool:
    return not p.name.startswith(".")


def _files_under(folder: Path) -> list[Path]:
    """Every visible file below folder (hidden files and folders skipped), sorted for reproducibility."""
    out = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).parts
        if p.is_file() and all(not part.startswith(".") for part in rel):
            out.append(p)
    return out


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and _visible(p))


def scan_folder(root: str | Path, val_fraction: float = 0.15, test_fraction: float = 0.15, seed: int = 0) -> ImageFolder:
    """Read DATA/<class>/* (split here, seeded and stratified) or DATA/train|val|test/<class>/* (split given)."""
    root = Path(root)
    if not root.exists():
        raise OvrError(f"data folder not found: {root}")
    if not root.is_dir():
        raise OvrError(f"not a folder: {root} (expected DATA/<class>/* or DATA/train|val|test/<class>/*)")
    top = _class_dirs(root)
    given = bool(top) and {p.name for p in top} <= set(SPLITS) and (root / "train").is_dir()
    per_split: dict[str, dict[str, list[Path]]] = {}
    if given:
        for split in SPLITS:
            if (root / split).is_dir():
                per_split[split] = {d.name: _files_under(d) for d in _class_dirs(root / split)}
        classes = sorted({c for table in per_split.values() for c in table})
    else:
        classes = [d.name for d in top]
    if not classes:
        raise OvrError(f"no class folders in {root} (expected DATA/<class>/* or DATA/train|val|test/<class>/*)")
    paths: list[Path] = []
    labels: list[int] = []
    splits: list[str] = []
    if given:
        train = per_split.get("train", {})
        for ci, c in enumerate(classes):
            if not train.get(c):
                raise OvrError(f"class folder is empty or missing: {root / 'train' / c}")
            for split in SPLITS:
                for p in per_split.get(split, {}).get(c, []):
                    paths.append(p), labels.append(ci), splits.append(split)
    else:
        for ci, c in enumerate(classes):
            files = _files_under(root / c)
            if not files:
                raise OvrError(f"class folder is empty: {root / c}")
            assigned = split_assignments(len(files), val_fraction, test_fraction, seed, c)
            for p, s in zip(files, assigned):
                paths.append(p), labels.append(ci), splits.append(s)
    return ImageFolder(root, classes, paths, np.asarray(labels, dtype=np.int64), np.asarray(splits), given)


def split_assignments(n: int, val_fraction: float, test_fraction: float, seed: int, class_name: str) -> list[str]:
    """Per-class seeded split (so it is stratified); at least one training image, then val, then test."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise OvrError("split fractions must be in [0, 1) and sum to less than 1")
    from .runtime import head_seed  # the same (seed, name) mixing keeps splits independent of class order

    order = np.random.default_rng(head_seed(seed, "split:" + class_name)).permutation(n)
    n_val = int(round(n * val_fraction)) if n >= 3 else 0
    n_test = int(round(n * test_fraction)) if n >= 3 else 0
    while n_val + n_test >= n and (n_val or n_test):
        if n_test >= n_val:
            n_test -= 1
        else:
            n_val -= 1
    out = ["train"] * n
    for rank, i in enumerate(order):
        if rank < n_val:
            out[i] = "val"
        elif rank < n_val + n_test:
            out[i] = "test"
    return out


def expand_inputs(items: list[str]) -> list[Path]:
    """Files, folders (walked) and glob patterns -> image paths, in a stable order; missing inputs are errors."""
    out: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            out.extend(_files_under(p))
        elif p.is_file():
            out.append(p)
        elif any(ch in item for ch in "*?["):
            matches = sorted(Path(m) for m in glob.glob(item, recursive=True) if Path(m).is_file())
            if not matches:
                raise OvrError(f"no files match {item}")
            out.extend(m for m in matches if _visible(m))
        else:
            raise OvrError(f"no such file or folder: {item}")
    if not out:
        raise OvrError("no image files given")
    return out


def decode_image(data: bytes) -> Image.Image:
    """Bytes -> RGB image: EXIF orientation applied, first frame of animations, 16-bit/palette/alpha flattened."""
    with Image.open(io.BytesIO(data)) as im:
        im.seek(0)
        im.load()  # raises on truncated data instead of failing later inside a worker
        im = ImageOps.exif_transpose(im)
        if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            arr = np.asarray(im, dtype=np.float64)
            scale = 65535.0 if arr.max(initial=0) > 255 else 255.0
            im = Image.fromarray(np.clip(arr / scale * 255.0, 0, 255).astype(np.uint8))
        if im.mode == "P":
            im = im.convert("RGBA")
        if im.mode in ("RGBA", "LA", "PA"):
            rgba = im.convert("RGBA")
            bg = Image.new("RGB", rgba.size, (255, 255, 255))
            bg.paste(rgba, mask=rgba.getchannel("A"))
            return bg
        return im.convert("RGB")


def load_image(path: str | Path) -> Image.Image:
    try:
        return decode_image(Path(path).read_bytes())
    except Exception as e:  # PIL raises many types for bad files; the caller needs one
        raise OvrError(f"cannot read image {path}: {describe_error(e)}") from None


def describe_error(e: BaseException) -> str:
    """An exception in words: first line, Python object reprs (<_io.BytesIO object at 0x...>) left out."""
    import re

    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    if msg.startswith("cannot identify image file"):
        return "not an image file (format not recognised)"
    return re.sub(r"\s*<[\w.]+ object at 0x[0-9a-f]+>", "", msg)[:200]


def write_digits_folder(out: str | Path, classes: list[int] | None = None, size: int = 32) -> Path:
    """scikit-learn's bundled 8x8 digits as DATA/<digit>/*.png (upscaled), the offline demo dataset."""
    from sklearn.datasets import load_digits

    out = Path(out)
    digits = load_digits()
    keep = set(range(10)) if classes is None else set(classes)
    for i, (img, y) in enumerate(zip(digits.images, digits.target)):
        if int(y) not in keep:
            continue
        d = out / f"digit_{int(y)}"
        d.mkdir(parents=True, exist_ok=True)
        p = d / f"{i:04d}.png"
        if not p.exists():
            arr = (255 - img / 16.0 * 255).clip(0, 255).astype(np.uint8)  # dark ink on white, like a scan
            Image.fromarray(arr).resize((size, size), Image.BICUBIC).save(p)
    return out
