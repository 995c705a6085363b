"""A backbone's resize and centre crop on PIL images, from its preprocessing record, without torch or torchvision.

The same pixels as torchvision's `Resize` + `CenterCrop` on PIL images (they call PIL's resize with the same output
size and PIL's crop with the same box; `tests/test_pixels.py` checks it image by image), so the torch-free
predict (`ovr/apps/quick.py`) feeds the backbone's graph what the torch path feeds it. Also the cut of very
elongated images that both paths make before the resize.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

MAX_ASPECT = 4  # see cut_box
PIL_FILTERS = {"nearest": 0, "nearest-exact": 0, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5, "lanczos": 1}


def shorter_side(size) -> int | None:
    """The target of a resize of the shorter side (an int or a 1-list), or None for a fixed (h, w) resize."""
    if isinstance(size, int):
        return size
    return size[0] if isinstance(size, (list, tuple)) and len(size) == 1 else None


def cut_box(first_resize_size, w: int, h: int) -> tuple[int, int, int, int] | None:
    """(left, top, right, bottom) to cut a very elongated image to before the resize, or None. A 2 x 20,000 strip
    resized to a short side of 256 would become 256 x 2,560,000 pixels, seconds and gigabytes in PIL. The centre crop
    only ever sees the middle S/resize of the short side's length, so a long side over MAX_ASPECT x the short one is
    cut to that first: the crop sees the same content (the resize grid shifts by under an output pixel), and
    ordinary images are untouched. first_resize_size: the size of the first geometry step if it is a resize."""
    if shorter_side(first_resize_size) is None:
        return None  # a fixed (h, w) resize squashes to a fixed size: nothing blows up
    if max(w, h) <= MAX_ASPECT * min(w, h):
        return None
    keep = MAX_ASPECT * min(w, h)
    if w > h:
        return ((w - keep) // 2, 0, (w - keep) // 2 + keep, h)
    return (0, (h - keep) // 2, w, (h - keep) // 2 + keep)


def resized_size(w: int, h: int, size, max_size: int | None = None) -> tuple[int, int]:
    """(new_w, new_h) of torchvision's Resize(size, max_size) of a w x h image."""
    s = shorter_side(size)
    if s is None:
        return int(size[1]), int(size[0])
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = s, int(s * long / short)
    if max_size is not None and new_long > max_size:
        new_short, new_long = int(max_size * new_short / new_long), max_size
    return (new_short, new_long) if w <= h else (new_long, new_short)


def crop_pil(record: dict, image: Image.Image) -> np.ndarray | None:
    """An RGB PIL image -> uint8 [S, S, 3], the crop the record's steps make; None where a step needs what this does
    not do (padding an image smaller than the crop, an unknown step)."""
    steps = record["geometry"]
    first = steps[0]["size"] if steps and steps[0]["op"] == "resize" else None
    box = cut_box(first, *image.size)
    im = image.crop(box) if box else image
    for st in steps:
        w, h = im.size
        if st["op"] == "resize":
            if st.get("interpolation") not in PIL_FILTERS:
                return None
            nw, nh = resized_size(w, h, st["size"], st.get("max_size"))
            if (nw, nh) != (w, h):
                im = im.resize((nw, nh), PIL_FILTERS[st["interpolation"]])
        elif st["op"] == "center_crop":
            ch, cw = st["size"] if len(st["size"]) == 2 else (st["size"][0],) * 2
            if cw > w or ch > h:
                return None
            top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
            im = im.crop((left, top, left + cw, top + ch))
        else:
            return None
    return np.asarray(im, dtype=np.uint8)


def normalized(crops: np.ndarray, record: dict) -> np.ndarray:
    """uint8 [B, S, S, 3] -> float32 [B, 3, S, S]: scaled to [0, 1], then the record's mean/std, in float32 as
    torchvision's ToTensor + Normalize compute them."""
    x = crops.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255)
    mean = np.asarray(record["mean"], dtype=np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(record["std"], dtype=np.float32).reshape(1, 3, 1, 1)
    return (x - mean) / std
