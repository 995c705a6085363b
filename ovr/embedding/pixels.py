"""Pixels for the backbone: image bytes (or a PIL image) -> the backbone's input tensor, by one of two paths. The
path is part of the backbone's identity (cache key, model manifest), so embeddings made by the two never mix.

- "pil": PIL decodes, the backbone's own transform resizes and normalises: every format; the reference.
- "tensor": JPEGs are decoded by torchvision.io (libjpeg-turbo on CPU, bit-identical to PIL's decode on RGB,
  grayscale, CMYK, progressive and EXIF-rotated files; nvJPEG in batches on CUDA), then resized, cropped and
  normalised by transforms.v2 on uint8 tensors (several times faster than PIL's resize; the figures are in the
  README, from benchmarks/embed_throughput.py). Other formats, JPEGs over MAX_PIXELS (PIL's draft mode), augmented views and files the JPEG
  decoder refuses are decoded by PIL and take the same tensor steps, so all of a run's images see one resize
  kernel. Inputs differ from the PIL path's by at most a gray level or two (the two bicubic kernels round
  differently); the embeddings' difference is in the README (benchmarks/embed_throughput.py).

Why torchvision.io and not TorchCodec (which torchvision 0.29 points to): on this project's pinned torch both
decode bit-identically at the same speed (README, "Decoding"), and torchvision.io ships with the
torchvision already required; TorchCodec would be a new dependency. `_decode_jpegs` is the one place to change.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from PIL import Image

from .data import MAX_PIXELS, decode_image, describe_error
from .geometry import cut_box
from ..errors import OvrError



@dataclass
class Preprocess:
    """The backbone's transform split at the tensor boundary: geometry (resize, crop), then mean/std. `decode`
    says which resize reproduces the embeddings: PIL's (the "pil" path) or transforms.v2's on tensors."""
    geometry: list  # PIL -> PIL callables (torchvision transforms; _tensor_steps: their twins on tensors)
    size: int
    mean: list[float]
    std: list[float]
    decode: str = "pil"

    def cut_box(self, w: int, h: int) -> tuple[int, int, int, int] | None:
        """The cut of a very elongated image before the resize (geometry.cut_box), or None."""
        t = self.geometry[0] if self.geometry else None
        return cut_box(t.size if type(t).__name__ == "Resize" else None, w, h)

    def cut_pil(self, im: Image.Image) -> Image.Image:
        box = self.cut_box(*im.size)
        return im.crop(box) if box else im

    def crop_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 [C, H, W] (any device) -> the cut, resize and crop on tensors: the tensor path's geometry."""
        box = self.cut_box(x.shape[-1], x.shape[-2])
        if box:
            x = x[..., box[1]:box[3], box[0]:box[2]]
        for t in self._tensor_steps:
            x = t(x)
        return x

    def __call__(self, image: Image.Image) -> np.ndarray:
        """PIL image -> uint8 [S, S, 3]: exactly the pixels the path's own steps turn into the input tensor."""
        im = self.cut_pil(image.convert("RGB"))
        if self.decode == "tensor":
            from torchvision.transforms.v2.functional import pil_to_tensor

            arr = self.crop_tensor(pil_to_tensor(im)).permute(1, 2, 0).numpy()
        else:
            for t in self.geometry:
                im = t(im)
            arr = np.asarray(im, dtype=np.uint8)
        if arr.shape != (self.size, self.size, 3):
            raise OvrError(f"preprocessing gave {arr.shape}, expected ({self.size}, {self.size}, 3)")
        return arr

    def metadata(self) -> dict:
        """Plain keys another runtime can apply without ovr: resize the shorter side to `resize_shorter` (or the
        whole image to `resize` [h, w]) with `interpolation` (antialiased), centre-crop to `crop` x `crop`, and
        (inside the exported graph) scale to [0, 1] and normalise with `mean` / `std`."""
        out: dict = {"resize_shorter": None, "resize": None, "interpolation": None, "crop": self.size,
                     "mean": self.mean, "std": self.std, "decode": self.decode}
        for t in self.geometry:
            if type(t).__name__ == "Resize":
                size = t.size if isinstance(t.size, int) else list(t.size)
                if isinstance(size, int) or len(size) == 1:
                    out["resize_shorter"] = size if isinstance(size, int) else size[0]
                else:
                    out["resize"] = size
                out["interpolation"] = t.interpolation.value
        return out

    def normalized(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, S, S] crops -> the backbone's float input: scaled to [0, 1], then mean/std (the step the
        exported graph holds too)."""
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return x.float().div_(255).sub_(mean).div_(std)

    def record(self) -> dict:
        """The preprocessing as data (resize, crop, mean, std): `compose` rebuilds it without the network."""
        steps = []
        for t in self.geometry:
            if type(t).__name__ == "Resize":
                size = t.size if isinstance(t.size, int) else list(t.size)
                steps.append({"op": "resize", "size": size, "interpolation": t.interpolation.value,
                              "max_size": t.max_size, "antialias": t.antialias})
            else:
                steps.append({"op": "center_crop", "size": list(t.size)})
        return {"geometry": steps, "mean": self.mean, "std": self.std}

    @cached_property
    def _tensor_steps(self) -> list:
        """The same resize and crop as transforms.v2 steps on uint8 [C, H, W] tensors (any device)."""
        from torchvision.transforms import v2

        out = []
        for t in self.geometry:
            if type(t).__name__ == "Resize":
                out.append(v2.Resize(t.size, interpolation=t.interpolation, max_size=t.max_size, antialias=True))
            else:
                out.append(v2.CenterCrop(t.size))
        return out


def compose(record: dict):
    """`Preprocess.record`'s inverse: a torchvision Compose (PIL image -> normalised tensor) with the same pixels."""
    import torchvision.transforms as T

    steps = []
    for g in record["geometry"]:
        if g["op"] == "resize":
            steps.append(T.Resize(g["size"], interpolation=T.InterpolationMode(g["interpolation"]),
                                  max_size=g.get("max_size"), antialias=g.get("antialias", True)))
        else:
            steps.append(T.CenterCrop(g["size"]))
    return T.Compose([*steps, T.ToTensor(), T.Normalize(record["mean"], record["std"])])


def split_transform(transform, decode: str = "pil") -> Preprocess:
    """Read resize/crop and mean/std from a torchvision Compose (timm, tiny_cnn) or a torchvision weights preset."""
    import torchvision.transforms as T

    if hasattr(transform, "crop_size") and hasattr(transform, "resize_size"):  # torchvision ImageClassification
        geometry = [T.Resize(transform.resize_size, interpolation=transform.interpolation,
                             antialias=transform.antialias), T.CenterCrop(transform.crop_size)]
        size = transform.crop_size[0]
        return Preprocess(geometry, size, list(transform.mean), list(transform.std), decode)
    steps = list(getattr(transform, "transforms", []))
    geometry, mean, std, size = [], None, None, None
    for t in steps:
        name = type(t).__name__
        if name in ("Resize", "CenterCrop"):
            geometry.append(t)
            s = t.size
            square = isinstance(s, (tuple, list)) and len(s) == 2 and s[0] == s[1]
            if name == "CenterCrop" or (square and size is None):  # a crop, or the whole image resized to S x S
                size = s[0] if isinstance(s, (tuple, list)) else int(s)
        elif name == "Normalize":
            mean, std = [float(v) for v in t.mean], [float(v) for v in t.std]
        elif name not in ("ToTensor", "MaybeToTensor", "PILToTensor", "ConvertImageDtype"):
            raise OvrError(f"cannot split this backbone's preprocessing step {name} into tensor steps")
    if mean is None or size is None:
        raise OvrError("cannot split this backbone's preprocessing: no centre crop or no normalisation found")
    return Preprocess(geometry, size, mean, std, decode)


def _decode_jpegs(blobs: list[torch.Tensor], device: torch.device | str = "cpu", exif: bool = False) -> list[torch.Tensor]:
    """JPEG bytes (1-D uint8 CPU tensors) -> uint8 RGB [3, H, W] on `device` (nvJPEG, batched, on CUDA)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*decoding and encoding capabilities of TorchVision are deprecated")
        if torch.device(device).type == "cpu":  # EXIF orientation is only implemented on CPU
            return [decode_jpeg(b, mode=ImageReadMode.RGB, apply_exif_orientation=exif) for b in blobs]
        return decode_jpeg(blobs, mode=ImageReadMode.RGB, device=device)


def _jpeg_route(data: bytes) -> str:
    """Which decoder takes these bytes: 'device' (a plain JPEG a batched device decoder can take: RGB or gray, no
    EXIF rotation, complete, within MAX_PIXELS), 'cpu' (another JPEG within MAX_PIXELS), or 'pil'. Reads the header
    only."""
    if data[:2] != b"\xff\xd8":
        return "pil"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im = Image.open(io.BytesIO(data))
            w, h = im.size
            plain = im.mode in ("RGB", "L") and im.getexif().get(0x0112, 1) == 1
    except Exception:
        return "pil"  # PIL says what is wrong with it
    if w * h > MAX_PIXELS:
        return "pil"
    # a truncated file has no end marker: the CPU decoder refuses it (then PIL says why); nvJPEG may not
    return "device" if plain and data.rstrip(b"\0")[-2:] == b"\xff\xd9" else "cpu"


class Pixels:
    """One decode path of one backbone. `item` runs where the data is loaded (DataLoader workers): it returns the
    float input (PIL path), a uint8 crop (tensor path), or the raw JPEG bytes for `batch` to decode together on
    the device. `batch` turns a list of items into the normalised batch on the device."""

    def __init__(self, transform, decode: str, device: torch.device | str = "cpu",
                 batch_decode: bool | None = None) -> None:
        if decode not in ("pil", "tensor"):
            raise OvrError(f"decode must be pil or tensor here, got {decode!r}")
        self.transform, self.decode, self.device = transform, decode, torch.device(device)
        self.batch_decode = (self.device.type == "cuda") if batch_decode is None else batch_decode
        try:
            self.prep = split_transform(transform, decode)  # the PIL path uses it for cut_box only
        except OvrError:
            if decode == "tensor":
                raise
            self.prep = None  # a transform ovr cannot read: used as it is

    def _geometry(self, x: torch.Tensor) -> torch.Tensor:
        return self.prep.crop_tensor(x)

    def _from_pil(self, im: Image.Image) -> torch.Tensor:
        from torchvision.transforms.v2.functional import pil_to_tensor

        return self._geometry(pil_to_tensor(im.convert("RGB")))

    def image(self, im: Image.Image) -> torch.Tensor:
        """An in-memory image -> an item."""
        if self.decode == "tensor":
            return self._from_pil(im)
        return self.transform((self.prep.cut_pil(im) if self.prep else im).convert("RGB"))

    def item(self, data: bytes, augment=None) -> torch.Tensor:
        """File bytes -> an item; augment: PIL image -> PIL image (augmented views always decode with PIL)."""
        if self.decode == "pil" or augment is not None:
            im = decode_image(data)
            return self.image(augment(im) if augment is not None else im)
        route = _jpeg_route(data)
        blob = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        if route == "device" and self.batch_decode:
            return blob  # 1-D: decoded in `batch`
        if route != "pil":
            try:
                return self._geometry(_decode_jpegs([blob], exif=True)[0])
            except RuntimeError:
                pass  # a JPEG libjpeg-turbo refuses: PIL decodes it or says why
        return self._from_pil(decode_image(data))

    def batch(self, items: list[torch.Tensor]) -> tuple[torch.Tensor, list[tuple[int, str]]]:
        """Items -> (the normalised float batch [B, 3, S, S] on the device, in the items' order, and (position,
        reason) for items that could not be decoded, left out of the batch)."""
        if self.decode == "pil":
            return torch.stack(items).to(self.device, non_blocking=True), []
        out: list = [x.to(self.device, non_blocking=True) if x.ndim == 3 else None for x in items]
        raw = [i for i, x in enumerate(out) if x is None]
        if raw:
            try:
                decoded = _decode_jpegs([items[i] for i in raw], self.device)
            except RuntimeError:  # the batch decoder returns nothing when one file fails: decode them one by one
                decoded = [self._one(items[i]) for i in raw]
            for i, x in zip(raw, decoded):
                out[i] = x if isinstance(x, str) else self._geometry(x.to(self.device))
        bad = [(i, x) for i, x in enumerate(out) if isinstance(x, str)]
        good = [x for x in out if not isinstance(x, str)]
        if not good:
            return torch.empty(0, 3, self.prep.size, self.prep.size, device=self.device), bad
        return self.prep.normalized(torch.stack(good)), bad

    def _one(self, blob: torch.Tensor) -> torch.Tensor | str:
        """One JPEG the batch decoder refused, whole (uncropped): on the device alone, else PIL, else why not."""
        from torchvision.transforms.v2.functional import pil_to_tensor

        try:
            return _decode_jpegs([blob], self.device)[0]
        except RuntimeError:
            pass
        try:
            return pil_to_tensor(decode_image(blob.numpy().tobytes()).convert("RGB"))
        except Exception as e:
            return describe_error(e)
