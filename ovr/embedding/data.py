"""Images in: folder listing -> (paths, labels, splits, class names), seeded stratified splits, safe decoding."""
from __future__ import annotations

import glob
import io
import os
import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ..errors import OvrError

SPLITS = ("train", "val", "test")

# What a folder walk takes as an image, by extension (case-insensitive); anything else (README.txt, labels.csv,
# .DS_Store) is skipped and counted, not decoded. A file named explicitly on the command line is always tried.
IMAGE_EXTENSIONS = frozenset(
    ".jpg .jpeg .jpe .jfif .png .apng .bmp .dib .gif .tif .tiff .webp .ppm .pgm .pbm .pnm .tga .ico .avif .qoi "
    ".jp2 .j2k .jpx .pcx .sgi .ras .dds .psd".split())

# Decoding a 169-megapixel image takes ~1 GB. JPEGs above MAX_PIXELS are decoded at a reduced scale (libjpeg's
# draft mode, 1/2..1/8: the backbones look at 224-512 px anyway); other formats above it are skipped with a message.
MAX_PIXELS = 64_000_000


def map_decoding(fn, items: list, threads: int) -> list:
    """[fn(x) for x in items] on `threads` threads (in order): for decoding, whose heavy parts (libjpeg, the
    resize) release the GIL. Warnings are ignored around them all: the decoders' own `catch_warnings` blocks swap
    process-wide state, and two threads leaving theirs out of order would leave one thread's filter behind (every
    warning ignored for the rest of the process); this block, entered first and left last, restores the filters
    as they were. Decoding reports its problems as errors, not warnings."""
    if threads <= 1 or len(items) < 2:
        return [fn(x) for x in items]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with ThreadPoolExecutor(min(threads, len(items))) as pool:
            return list(pool.map(fn, items))


@dataclass
class ImageFolder:
    root: Path
    classes: list[str]
    paths: list[Path]
    labels: np.ndarray  # int64 index into classes
    splits: np.ndarray  # str: train | val | test
    splits_given: bool  # True when the folder had train/val/test sub-folders
    ignored: dict[str, int] = field(default_factory=dict)  # extension -> files skipped as non-images
    notes: list[str] = field(default_factory=list)  # what the scan decided that a user should know, in words
    targets: np.ndarray | None = None  # multi-label data (a CSV/TSV manifest): bool [n, classes]; labels = first

    @property
    def multilabel(self) -> bool:
        """Some image has several labels (a manifest where every image has one is ordinary single-label data)."""
        return self.targets is not None and bool(self.targets.sum(1).max() > 1)

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


def is_image_name(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_EXTENSIONS


def _files_under(folder: Path, ignored: dict[str, int] | None = None) -> list[Path]:
    """Every visible image file below folder, sorted for reproducibility. Hidden files and folders are skipped;
    files without an image extension are counted in `ignored` by extension. Symlinked sub-folders are not
    followed (Python's rglob), symlinked files are."""
    try:
        os.listdir(folder)  # rglob says nothing when it cannot read a folder; a user needs to hear it
    except PermissionError:
        raise OvrError(f"cannot read folder {folder}: permission denied") from None
    out = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).parts
        if p.is_file() and all(not part.startswith(".") for part in rel):
            if is_image_name(p):
                out.append(p)
            elif ignored is not None:
                ext = p.suffix.lower() or "(no extension)"
                ignored[ext] = ignored.get(ext, 0) + 1
    return out


def _class_dirs(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if p.is_dir() and _visible(p))
    except PermissionError:
        raise OvrError(f"cannot read folder {folder}: permission denied") from None


def _holds_images(folder: Path) -> bool:
    """Image files directly inside (not below)."""
    try:
        return any(p.is_file() and _visible(p) and is_image_name(p) for p in folder.iterdir())
    except PermissionError:
        return False


def _is_loop(link: Path, root: Path) -> bool:
    """A class folder that is a symlink to the data root or a folder above it would list every image again."""
    return link.is_symlink() and root.resolve().is_relative_to(link.resolve())


def describe_ignored(ignored: dict[str, int]) -> str:
    n = sum(ignored.values())
    kinds = ", ".join(sorted(ignored))
    return f"ignored {n} non-image file{'s' if n != 1 else ''} ({kinds})"


def is_manifest(root: Path) -> bool:
    """DATA given as a CSV/TSV manifest rather than a folder."""
    return root.is_file() and root.suffix.lower() in (".csv", ".tsv")


def check_data_path(root: str | Path) -> Path:
    """DATA must be a folder or a manifest; a one-line error otherwise (cheap: the CLI calls it before torch)."""
    root = Path(root)
    if not root.exists():
        raise OvrError(f"data folder not found: {root}")
    if not root.is_dir() and not is_manifest(root):
        raise OvrError(f"not a folder: {root} (expected DATA/<class>/* or DATA/train|val|test/<class>/*)")
    return root


EVAL_SPLITS = (*SPLITS, "all")


def check_split(split: str) -> None:
    if split not in EVAL_SPLITS:
        raise OvrError(f"unknown split {split!r}: use {', '.join(EVAL_SPLITS[:-1])} or {EVAL_SPLITS[-1]}")


def scan_folder(root: str | Path, val_fraction: float = 0.15, test_fraction: float = 0.15, seed: int = 0) -> ImageFolder:
    """Read DATA/<class>/* (split here, seeded and stratified) or DATA/train|val|test/<class>/* (split given), or
    a CSV/TSV manifest (scan_manifest)."""
    root = check_data_path(root)
    if is_manifest(root):
        return scan_manifest(root, val_fraction, test_fraction, seed)
    notes: list[str] = []
    ignored: dict[str, int] = {}
    top = _class_dirs(root)
    loops = [d for d in top if _is_loop(d, root)]
    if loops:
        notes.append(f"skipped class folder{'s' if len(loops) > 1 else ''} {', '.join(d.name for d in loops)}: a "
                     f"symlink to the data folder or above it (its images would count twice)")
        top = [d for d in top if d not in loops]
    # A split folder holds class folders; a folder named train/val/test that holds images is a class of that name.
    split_dirs = [d for d in top if d.name in SPLITS and not _holds_images(d) and _class_dirs(d)]
    others = [d for d in top if d not in split_dirs]
    if split_dirs and others:
        raise OvrError(f"{root} mixes split folders ({', '.join(d.name for d in split_dirs)}, holding class folders) "
                       f"with class folders ({', '.join(d.name for d in others[:3])}{', ...' if len(others) > 3 else ''}): "
                       f"use DATA/<class>/* or DATA/train|val|test/<class>/*, not both")
    given = bool(split_dirs) and (root / "train") in split_dirs
    if split_dirs and not given:
        raise OvrError(f"{root} has split folders ({', '.join(d.name for d in split_dirs)}) but no train/ folder")
    per_split: dict[str, dict[str, list[Path]]] = {}
    if given:
        for split in SPLITS:
            if (root / split).is_dir():
                per_split[split] = {d.name: _files_under(d, ignored) for d in _class_dirs(root / split)}
        classes = sorted({c for table in per_split.values() for c in table})
    else:
        classes = [d.name for d in top]
        nested = [d for d in top if not _holds_images(d) and len([s for s in _class_dirs(d)]) >= 2]
        if nested and len(nested) == len(top):
            sub = _class_dirs(nested[0])
            raise OvrError(f"{root} looks one level too high: its folders ({', '.join(d.name for d in nested[:4])}) "
                           f"hold folders ({', '.join(s.name for s in sub[:3])}, ...), not images; pass one of them, "
                           f"e.g. {nested[0]}")
        if nested:
            notes.append(f"class folder{'s' if len(nested) > 1 else ''} {', '.join(d.name for d in nested)} "
                         f"hold{'s' if len(nested) == 1 else ''} only sub-folders; their images all count as that class")
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
            n_ign = sum(ignored.values())
            files = _files_under(root / c, ignored)
            if not files:
                extra = f" of images ({sum(ignored.values()) - n_ign} other files)" if sum(ignored.values()) > n_ign else ""
                raise OvrError(f"class folder is empty{extra}: {root / c}")
            assigned = split_assignments(len(files), val_fraction, test_fraction, seed, c)
            for p, s in zip(files, assigned):
                paths.append(p), labels.append(ci), splits.append(s)
    if ignored:
        notes.append(describe_ignored(ignored))
    return ImageFolder(root, classes, paths, np.asarray(labels, dtype=np.int64), np.asarray(splits), given,
                       ignored, notes)


LABEL_SEPARATORS = ";|"


def scan_manifest(path: str | Path, val_fraction: float = 0.15, test_fraction: float = 0.15, seed: int = 0
                  ) -> ImageFolder:
    """A CSV (or TSV) manifest: a header with `path` and `labels` columns (labels separated by ; or |, any number
    per image) and optionally `split` (train/val/test; else a seeded split). Paths are relative to the manifest's
    folder. Bad rows (missing file, no label, unknown split, a path given twice) are skipped, named and counted."""
    import csv

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise OvrError(f"cannot read manifest {path}: {describe_error(e)}") from None
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 24))  # long label lists; a runaway field is still caught
    try:
        rows = list(csv.reader(io.StringIO(text), delimiter="\t" if path.suffix.lower() == ".tsv" else ","))
    except csv.Error as e:
        raise OvrError(f"manifest {path} is not valid CSV: {e}") from None
    rows = [r for r in rows if any(c.strip() for c in r)]
    if not rows:
        raise OvrError(f"manifest {path} is empty")
    head = [c.strip().lower() for c in rows[0]]
    if "path" not in head or "labels" not in head:
        raise OvrError(f"manifest {path}: the first row must name the columns, with `path` and `labels` "
                       f"(and optionally `split`); got {rows[0][:4]}")
    if len(rows) == 1:
        raise OvrError(f"manifest {path} has a header and no rows")
    ip, il, isp = head.index("path"), head.index("labels"), head.index("split") if "split" in head else None
    bad: list[str] = []
    items: list[tuple[Path, list[str], str | None]] = []
    seen: dict[Path, tuple[int, list[str], str | None]] = {}  # resolved path -> (row, labels, split)
    conflicts: list[str] = []
    for n, r in enumerate(rows[1:], start=2):
        cell = lambda i: r[i].strip() if i is not None and i < len(r) else ""  # noqa: E731
        p = Path(cell(ip))
        p = p if p.is_absolute() else path.parent / p
        labels = sorted({x.strip() for x in re.split(f"[{re.escape(LABEL_SEPARATORS)}]", cell(il)) if x.strip()})
        split = cell(isp) or None
        real = p.resolve() if p.is_file() else None  # a/../a/x.png and a/x.png are one image
        why = ("no path" if not cell(ip) else "file not found" if real is None else "no label" if not labels
               else f"unknown split {split!r}" if split is not None and split not in SPLITS
               else "listed twice" if real in seen else None)
        if why == "listed twice":
            first, flabels, fsplit = seen[real]
            if fsplit != split:  # the same image in two splits: a test score that has seen its answer
                conflicts.append(f"rows {first} and {n} put {cell(ip)} in splits {fsplit or 'auto'} and {split or 'auto'}")
            elif flabels != labels:
                conflicts.append(f"rows {first} and {n} give {cell(ip)} the labels {';'.join(flabels)} and "
                                 f"{';'.join(labels)} (one row per image; several labels go in one cell)")
        if why:
            bad.append(f"row {n} ({cell(ip) or '-'}): {why}")
            continue
        seen[real] = (n, labels, split)
        items.append((p, labels, split))
    if conflicts:
        raise OvrError(f"manifest {path}: {conflicts[0]}" + (f" (and {len(conflicts) - 1} more)" if len(conflicts) > 1
                                                              else ""))
    if not items:
        raise OvrError(f"manifest {path} has no usable row: {'; '.join(bad[:3])}"
                       f"{' ...' if len(bad) > 3 else ''}")
    classes = sorted({c for _, labels, _ in items for c in labels})
    index = {c: i for i, c in enumerate(classes)}
    targets = np.zeros((len(items), len(classes)), dtype=bool)
    for i, (_, labels, _) in enumerate(items):
        targets[i, [index[c] for c in labels]] = True
    given = [s for _, _, s in items]
    splits = np.asarray(given if all(given) else
                        [s or a for s, a in zip(given, split_assignments(len(items), val_fraction, test_fraction,
                                                                         seed, "manifest:" + path.name))])
    notes = [f"skipped {len(bad)} manifest row{'s' if len(bad) != 1 else ''}: {'; '.join(bad[:5])}"
             f"{' ...' if len(bad) > 5 else ''}"] if bad else []
    if targets.sum(1).max() > 1:
        notes.append(f"multi-label data: {int((targets.sum(1) > 1).sum())} of {len(items)} images have several labels")
    return ImageFolder(path, classes, [p for p, _, _ in items], targets.argmax(1).astype(np.int64), splits,
                       all(given), {}, notes, targets)


def split_assignments(n: int, val_fraction: float, test_fraction: float, seed: int, class_name: str) -> list[str]:
    """Per-class seeded split (so it is stratified); at least one training image, then val, then test."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise OvrError("split fractions must be in [0, 1) and sum to less than 1")
    from ..runtime import head_seed  # the same (seed, name) mixing keeps splits independent of class order

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


def expand_inputs(items: list[str], ignored: dict[str, int] | None = None) -> list[Path]:
    """Files, folders (walked, image extensions only; the rest counted in `ignored`) and glob patterns -> image
    paths, in a stable order; missing inputs are errors. A file named explicitly is taken whatever its name."""
    out: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            out.extend(_files_under(p, ignored))
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


def image_header(data: bytes) -> tuple[int, int, str | None]:
    """(width, height, format) from the file's header alone, nothing decoded (raises on bytes that are not an
    image)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(data)) as im:
            return (*im.size, im.format)


def check_pixels(w: int, h: int, fmt: str | None, max_pixels: int) -> None:
    """The one size rule: over `max_pixels`, a JPEG is still decoded (at a reduced scale, libjpeg's draft mode);
    anything else is refused in words, before it is decoded."""
    if w * h > max_pixels and fmt != "JPEG":
        raise ValueError(f"image too large to decode safely ({w} x {h} = {w * h / 1e6:.0f} megapixels; "
                         f"limit {max_pixels / 1e6:.0f})")


def decode_image(data: bytes, max_pixels: int | None = None) -> Image.Image:
    """Bytes -> RGB image: EXIF orientation applied, first frame of animations, 16-bit/palette/alpha flattened.
    Over `max_pixels` (from the header, before decoding): a JPEG is decoded at a reduced scale, anything else
    refused in words."""
    if not data:
        raise ValueError("empty file")
    max_pixels = MAX_PIXELS if max_pixels is None else max_pixels
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size is checked below, in words
        im = Image.open(io.BytesIO(data))
    with im:
        im.seek(0)
        w, h = im.size
        check_pixels(w, h, im.format, max_pixels)
        if w * h > max_pixels:
            scale = (w * h / max_pixels) ** 0.5
            im.draft("RGB", (int(w / scale), int(h / scale)))  # libjpeg decodes at 1/2..1/8 scale
        im.load()  # raises on truncated data instead of failing later inside a worker
        im = ImageOps.exif_transpose(im)
        if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            arr = np.nan_to_num(np.asarray(im, dtype=np.float64))
            top = arr.max(initial=0)
            # 16-bit data -> 65535, 8-bit-range data -> 255, float data in 0..1 (float TIFFs) -> 1
            scale = 65535.0 if top > 255 else 1.0 if (im.mode == "F" and top <= 1.0) else 255.0
            im = Image.fromarray(np.clip(arr / scale * 255.0, 0, 255).astype(np.uint8))
        if im.mode == "P":
            im = im.convert("RGBA")
        if im.mode in ("RGBA", "LA", "PA"):
            rgba = im.convert("RGBA")
            bg = Image.new("RGB", rgba.size, (255, 255, 255))
            bg.paste(rgba, mask=rgba.getchannel("A"))
            return bg
        return im.convert("RGB")


HEADER_BYTES = 1 << 16  # enough for any format's size fields


def read_image_file(path: str | Path) -> bytes:
    """A file's bytes for decoding, its size checked from the header first (`check_pixels`): an image refused for
    its size is never read whole (a small sparse file can be huge), and an empty file is said."""
    with open(path, "rb") as f:
        head = f.read(HEADER_BYTES)
        if not head:
            raise ValueError("empty file")
        try:
            w, h, fmt = image_header(head)
        except Exception:  # noqa: BLE001  (a header PIL cannot read from the first bytes: the full decode says why)
            w, h, fmt = 0, 0, None
        check_pixels(w, h, fmt, MAX_PIXELS)
        return head + f.read()


def load_image(path: str | Path) -> Image.Image:
    try:
        return decode_image(read_image_file(path))
    except Exception as e:  # PIL raises many types for bad files; the caller needs one
        raise OvrError(f"cannot read image {path}: {describe_error(e)}") from None


def describe_error(e: BaseException) -> str:
    """An exception in words: first line, Python object reprs (<_io.BytesIO object at 0x...>) left out."""
    import re

    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    if msg.startswith("cannot identify image file"):
        return "not an image file (format not recognised)"
    if isinstance(e, Image.DecompressionBombError):
        size = msg.split("(", 1)[-1].split(")", 1)[0]  # PIL's "(N pixels)"
        return f"image too large to decode safely ({size if 'pixel' in size else size + ' pixels'})"
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
