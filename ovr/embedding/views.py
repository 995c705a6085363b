"""Augmented views of an image: random resized crop, horizontal flip, colour jitter, seeded by (seed, image
content, view index). A view is then a deterministic function of those three, so its embedding is cached under a
key made of them (`view_key`) like any other embedding, and a second run embeds nothing.

Done with PIL and numpy's seeded generator (not torchvision's global RNG), so a view is the same in every process,
DataLoader worker and torch version. Views train heads (`--views K`) and average predictions (`--tta K`); the plain
view is always there besides them, and validation and test rows are plain views only.
"""
from __future__ import annotations

import hashlib

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

# Part of every view key: a change of the augmentation below must change this, so old views are not reused.
AUGMENT = "rrc(0.35-1,3/4-4/3)+hflip(0.5)+jitter(b0.3,c0.3,s0.3)/v1"


def view_seed(seed: int, content_key: str, view: int) -> int:
    digest = hashlib.sha256(f"{seed}\x00{content_key}\x00{view}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def view_key(content_key: str, seed: int, view: int) -> str:
    """The cache key of view `view` (1, 2, ...) of the image with this content key."""
    return hashlib.sha256(f"view\x00{AUGMENT}\x00{content_key}\x00{seed}\x00{view}".encode()).hexdigest()


def augment(image: Image.Image, vseed: int) -> Image.Image:
    """One augmented view: crop 35-100% of the area at aspect 3/4..4/3 (resized back to the image's size, so the
    backbone's own resize/crop then applies as for the plain view), flip half the time, jitter brightness,
    contrast and saturation by up to 30%."""
    rng = np.random.default_rng(vseed)
    W, H = image.size
    for _ in range(10):  # torchvision's RandomResizedCrop rule: try 10 times, else the centre crop
        area = W * H * rng.uniform(0.35, 1.0)
        ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        w, h = int(round((area * ratio) ** 0.5)), int(round((area / ratio) ** 0.5))
        if 0 < w <= W and 0 < h <= H:
            x, y = int(rng.integers(0, W - w + 1)), int(rng.integers(0, H - h + 1))
            break
    else:
        w, h = min(W, H), min(W, H)
        x, y = (W - w) // 2, (H - h) // 2
    out = image.crop((x, y, x + w, y + h)).resize((W, H), Image.BILINEAR)
    if rng.random() < 0.5:
        out = ImageOps.mirror(out)
    for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        out = enhancer(out).enhance(float(rng.uniform(0.7, 1.3)))
    return out
