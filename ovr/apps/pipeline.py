"""Orchestration of the stages (images -> embeddings -> heads -> aggregate -> report). Prints nothing;
progress goes through a (stage, done, total) callback that the CLI renders."""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace as replaced
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..learn import aggregate
from ..config import Config, config_to_dict, config_to_toml, load_config
from ..embedding.data import ImageFolder, check_split, expand_inputs, scan_folder, split_assignments
from ..embedding.engine import attach, resolve_engine
from ..errors import OvrError
from ..atomic import check_writable
from ..embedding.backbones import Backbone, load_backbone, model_backbone
from ..embedding.cache import EmbeddingCache, default_cache_dir
from ..embedding.features import (EmbeddedFolder, EmbedResult, Progress, augmented_images, embed_folder, embed_images, embed_paths,
                       embed_views)
from ..learn.answer import AnswerOptions
from .quick import answer_rows
from ..learn.model import Model
from ..runtime import resolve_device
from ..learn.store import check_can_write, load_model, model_lock, save_model, update_model


def open_cache(cfg: Config, backbone: Backbone) -> EmbeddingCache:
    return EmbeddingCache(cfg.features.cache_dir or default_cache_dir(), backbone.key, cache_dtype(cfg))


def cache_dtype(cfg: Config) -> torch.dtype:
    """float16 halves the cache (and the rows held on the device); 'auto' takes it on CUDA only. The accuracy cost
    of rounding embeddings to float16 is in the README (benchmarks/fp16.py)."""
    d = cfg.features.dtype
    if d == "auto":
        return torch.float16 if resolve_device(cfg.features.device).type == "cuda" else torch.float32
    return {"float32": torch.float32, "float16": torch.float16}[d]


def scan_data(data: str | Path | ImageFolder, cfg: Config) -> ImageFolder:
    """DATA as an ImageFolder, split by cfg.data (torch-free: the CLI scans before it imports this module, so a bad
    folder is a one-line error in a fraction of a second)."""
    if isinstance(data, ImageFolder):
        return data
    return scan_folder(data, cfg.data.val_fraction, cfg.data.test_fraction, cfg.data.split_seed)


def embed_data(data: str | Path | ImageFolder, cfg: Config, progress: Progress | None = None,
               backbone: Backbone | None = None, **kw) -> EmbeddedFolder:
    """Scan DATA (or take a scanned ImageFolder), load the backbone, embed through the cache; embeddings end up on
    the compute device. kw: embed_paths' gather / rank / world."""
    f = cfg.features
    folder = scan_data(data, cfg)
    device = resolve_device(f.device)
    if backbone is None:
        backbone = load_backbone(f.backbone, f.weights, f.cache_dir or default_cache_dir(), f.decode_path,
                                 f.frame_for(folder.multilabel))
        attach(backbone, f.engine, device, f.cache_dir or default_cache_dir())
    emb = embed_folder(folder, backbone, open_cache(cfg, backbone), device, f.batch_size, f.workers, f.strict, progress,
                       **kw)
    emb.backbone = backbone
    return emb


# --- training a model ------------------------------------------------------------------------------------


def train_model(data: str | Path | ImageFolder, out: str | Path, cfg: Config, force: bool = False,
                progress: Progress | None = None) -> tuple[Model, EmbeddedFolder]:
    out = Path(out)
    check_can_write(out, force)  # before the long part
    folder = scan_data(data, cfg)
    if len(folder.classes) < 2:
        raise OvrError("one-vs-rest needs at least two classes to train (add more with `ovr add-class` later)")
    emb = embed_data(folder, cfg, progress)
    classes = emb.folder.classes
    X, y, _ = emb.split("train", targets=True)  # multi-label data: each head trains on its own label column
    Xv, yv, _ = emb.split("val", targets=True)
    empty = [c for i, c in enumerate(classes) if not (y[:, i] > 0 if y.ndim == 2 else y == i).any()]
    if empty:
        raise OvrError(f"no readable training images for class {empty[0]!r}")
    vkeys, V = views_of(emb.result, np.flatnonzero(emb.splits == "train"), cfg.train.views, cfg, emb.backbone,
                        open_cache(cfg, emb.backbone), progress)
    spec = {**emb.backbone.spec(), "engine": emb.backbone.engine}  # for the record: the engines share the cache
    model = Model(spec, cfg.train.normalize, cfg.train.head, list(classes),
                  calibration=cfg.train.calibration, config=config_to_dict(cfg), gate_method=cfg.train.gate)
    model.fit(torch.cat([X, V.flatten(0, 1)]), torch.cat([y, y.repeat_interleave(cfg.train.views, dim=0)]), Xv, yv,
              cfg.train, progress=progress)
    T = emb.folder.targets[emb.result.input_index] if emb.folder.targets is not None else None
    model.examples = [{"key": k, "label": classes[int(lab)], "split": str(sp)}
                      | ({"labels": [classes[j] for j in np.flatnonzero(T[i])]} if T is not None else {})
                      for i, (k, lab, sp) in enumerate(zip(emb.result.keys, emb.labels, emb.splits))]
    model.examples += view_examples(vkeys, [e for e in model.examples if e["split"] == "train"], cfg.train.views)
    save_model(model, out, force=force, config_toml=config_to_toml(cfg))
    return model, emb


def views_of(res: EmbedResult, rows, views: int, cfg: Config, backbone: Backbone, cache: EmbeddingCache,
             progress: Progress | None = None) -> tuple[list[str], torch.Tensor]:
    """Views 1..`views` of these embedded images (cached; seeded by cfg.train.seed): -> (view keys, image-major,
    and embeddings [len(rows), views, D] on the rows' device). Training (--views), TTA and `bench --views` alike."""
    f = cfg.features
    keys, V = embed_views([res.paths[i] for i in rows], [res.keys[i] for i in rows], views, cfg.train.seed, backbone,
                          cache, res.embeddings.device, batch_size=f.batch_size, workers=f.workers, progress=progress)
    return keys, V.view(len(rows), max(views, 0), backbone.dim)


def view_examples(vkeys: list[str], sources: list[dict], views: int) -> list[dict]:
    """Remembered like the plain training examples they were made from (their label, and labels for multi-label
    data; add-class and refresh train on them too), marked as views."""
    return [{**{k: sources[i // views][k] for k in ("label", "labels") if k in sources[i // views]},
             "key": vk, "split": "train", "view": i % views + 1} for i, vk in enumerate(vkeys)]


# --- using a model ---------------------------------------------------------------------------------------

class Predictor:
    """A loaded model plus its backbone: `ovr.load(MODEL).predict([...paths or PIL images...])`."""

    def __init__(self, root: str | Path, device: str = "auto", cache_dir: str | Path | None = None,
                 engine: str = "auto") -> None:
        if not isinstance(root, (str, Path)) or not str(root).strip():
            raise OvrError(f"load() takes the path of a model folder, got {root!r:.60}")
        self.root = Path(root)
        self.model = load_model(root)
        self.device = resolve_device(device)
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.engine = resolve_engine(engine, self.device)
        self._backbone: Backbone | None = None

    @property
    def classes(self) -> list[str]:
        return self.model.classes

    @property
    def backbone(self) -> Backbone:
        if self._backbone is None:
            self._backbone = model_backbone(self.model.backbone, self.cache_dir)
            attach(self._backbone, self.engine, self.device, self.cache_dir)
        return self._backbone

    @property
    def crop(self):
        """The backbone's preprocessing split at the crop (ovr.pixels.Preprocess: size, mean, std)."""
        from ..embedding.pixels import split_transform

        return split_transform(self.backbone.transform, self.backbone.decode)

    @staticmethod
    def inputs(items) -> list:
        """What predict accepts, as a flat list of images and paths: a path, a folder, a glob, a PIL image, an
        HxWx3 (or HxW, HxWx1, HxWx4) uint8 array, or a list of any of those (folders and globs expanded, in
        order). Anything else is an OvrError naming what was given."""
        what = "give paths, folders, globs, PIL images or uint8 arrays, or a list of them"
        if isinstance(items, (str, Path, Image.Image, np.ndarray)):
            items = [items]
        elif not isinstance(items, (list, tuple)):
            raise OvrError(f"cannot predict on {type(items).__name__}: {what}")
        out: list = []
        for x in items:
            if isinstance(x, Image.Image):
                if 0 in x.size:
                    raise OvrError(f"an image of {x.size[0]} x {x.size[1]} pixels has nothing to classify")
                out.append(x)
            elif isinstance(x, np.ndarray):
                if x.dtype != np.uint8 or x.ndim not in (2, 3) or (x.ndim == 3 and x.shape[2] not in (1, 3, 4)):
                    raise OvrError(f"an image array must be HxW, HxWx1, HxWx3 or HxWx4 uint8, got shape "
                                   f"{list(x.shape)} {x.dtype}")
                if 0 in x.shape[:2]:
                    raise OvrError(f"an image array of shape {list(x.shape)} has nothing to classify")
                out.append(Image.fromarray(x[..., 0] if x.ndim == 3 and x.shape[2] == 1 else x).convert("RGB"))
            elif isinstance(x, (str, Path)):
                if not str(x).strip():
                    raise OvrError(f"an empty path was given: {what}")
                out.extend(expand_inputs([str(x)]))
            else:
                raise OvrError(f"cannot predict on {type(x).__name__} {x!r:.40}: {what}")
        return out

    def embed(self, inputs: list, progress: Progress | None = None, tta: int = 0
              ) -> tuple[torch.Tensor, list[int], list[tuple]] | tuple[torch.Tensor, list[int], list[tuple], list]:
        """-> embeddings of the usable inputs, their positions, and (input, reason) for the unusable ones.
        Images (PIL) and paths may be mixed. With tta = K > 0 a fourth item: K tensors like X, the embeddings of
        augmented views 1..K of the same rows (cached for files, as training views are)."""
        pil = [i for i, x in enumerate(inputs) if isinstance(x, Image.Image)]
        paths = [i for i, x in enumerate(inputs) if not isinstance(x, Image.Image)]
        parts, vparts, index, skipped = [], [], [], []
        D = self.model.backbone["dim"]
        seed = int(self.model.config.get("train", {}).get("seed", 0))
        if pil:
            ims = [inputs[i] for i in pil]
            parts.append(embed_images(ims, self.backbone, self.device))
            if tta:
                vparts.append(embed_images(augmented_images(ims, tta, seed), self.backbone, self.device))
            index += pil
        if paths:
            cache = EmbeddingCache(self.cache_dir, self.backbone.key)
            small = len(paths) * (1 + tta) < 64
            r = embed_paths([Path(inputs[i]) for i in paths], self.backbone, cache, self.device,
                            workers=0 if small else -1, progress=progress)
            parts.append(r.embeddings.to(self.device))
            if tta:
                _, V = embed_views(r.paths, r.keys, tta, seed, self.backbone, cache, self.device,
                                   workers=0 if small else -1, progress=progress)
                vparts.append(V)
            index += [paths[j] for j in r.input_index.tolist()]
            skipped = r.skipped
        X = torch.cat(parts) if parts else torch.empty(0, D)
        if not tta:
            return X, index, skipped
        V = torch.cat(vparts).view(len(X), tta, -1) if vparts else torch.empty(0, tta, D)
        return X, index, skipped, [V[:, k] for k in range(tta)]


    def embed_crops(self, crops: np.ndarray) -> torch.Tensor:
        """Embeddings of the backbone's crops, uint8 [B, S, S, 3] (RGB, resized and cropped already: the exported
        graph's input), in batches of 64."""
        from ..embedding.features import forward

        prep = self.crop
        S = prep.size
        if crops.dtype != np.uint8 or crops.ndim != 4 or crops.shape[1:] != (S, S, 3):
            raise OvrError(f"crops must be uint8 [B, {S}, {S}, 3] for this backbone, got {crops.dtype} "
                           f"{list(crops.shape)}")
        out = [forward(self.backbone, prep.normalized(torch.from_numpy(crops[i:i + 64]).permute(0, 3, 1, 2)),
                       self.device) for i in range(0, len(crops), 64)]
        return torch.cat(out) if out else torch.empty(0, self.backbone.dim, device=self.device)

    def predict(self, inputs: list, options: AnswerOptions | None = None, progress: Progress | None = None,
                **fields) -> list[dict]:
        """One dict per input, in order: class (or 'unknown'), confidence, top-k, runner-up, labels (multi-label),
        or an error. `options` (or its fields as keywords: top_k, reject_below, thresholds, multilabel, calibrated,
        tta) says how to answer."""
        options = options or AnswerOptions(**fields)
        inputs = self.inputs(inputs)
        X, idx, skipped, *views = self.embed(inputs, progress, tta=options.tta)
        return self.rows(inputs, X, idx, skipped, options, views=views[0] if views else [])

    def rows(self, inputs: list, X: torch.Tensor, idx: list[int], skipped: list[tuple],
             options: AnswerOptions = AnswerOptions(), views: list[torch.Tensor] = ()) -> list[dict]:
        """predict's answers from embeddings already made (`embed`'s output): `ovr serve` embeds the images of
        concurrent requests in one batch, then answers each request with its own options here."""
        if not len(idx):
            X, views = torch.empty(0, self.model.backbone["dim"]), []
        ans = self.model.answer(X, options, views=views)
        return answer_rows(inputs, idx, skipped, self.classes, options, index=ans.index, top_index=ans.top_index,
                           top_confidence=ans.top_confidence, labels=ans.labels)


def load(root: str | Path, device: str = "auto", cache_dir: str | Path | None = None, engine: str = "auto"
         ) -> Predictor:
    """A trained model folder and its backbone, ready to answer: `ovr.load("MODEL").predict(["a.jpg", pil_image])`
    gives one dict per input (class or "unknown", confidence, top, runner_up, labels). device: auto | cpu | cuda;
    engine: auto | torch | onnxruntime (ovr.engine); cache_dir: where embeddings are cached."""
    return Predictor(root, device, cache_dir, engine)


def embed(data: str | Path, backbone: str = "efficientnet_lite0", *, weights: str = "default", device: str = "auto",
          engine: str = "auto", cache_dir: str | Path | None = None,
          progress: Progress | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """An image folder (one subfolder per class) or a CSV manifest -> (embeddings [n, D] float32, labels [n] as
    class indices, class names), every readable image, through the embedding cache: the inputs of
    `ovr.OvRClassifier`. Unreadable files are left out (`ovr embed DATA` lists them)."""
    cfg = load_config(None, {"backbone": backbone, "weights": weights, "device": device, "engine": engine,
                             "cache_dir": str(cache_dir) if cache_dir else None})
    emb = embed_data(data, cfg, progress)
    return emb.result.embeddings.float().cpu().numpy(), np.asarray(emb.labels), list(emb.folder.classes)


def model_config(root: str | Path, config: str | Path | None = None, **overrides) -> Config:
    """The config a model was trained with (so evaluate splits DATA the same way and add-class trains like the
    others): defaults < stored model config < --config file < flags."""
    from ..learn.manifest import read_manifest

    stored = {k: dict(v) for k, v in read_manifest(root).get("config", {}).items() if isinstance(v, dict)}
    for machine in ("cache_dir", "engine"):  # where to write and what runs here: from the user, never a model file
        stored.get("features", {}).pop(machine, None)
    return load_config(config, overrides, stored=stored)


def evaluate_model(root: str | Path, data: str | Path, split: str = "test", options: AnswerOptions = AnswerOptions(),
                   *, device: str | None = None, cache_dir: str | None = None, engine: str | None = None,
                   progress: Progress | None = None) -> dict:
    from ..learn.metrics import classification_metrics, expected_calibration_error, worst_errors

    check_split(split)
    tta = options.tta
    cfg = model_config(root, device=device, cache_dir=cache_dir, engine=engine)
    pred = Predictor(root, cfg.features.device, cfg.features.cache_dir or None, cfg.features.engine)
    emb = embed_data(data, cfg, progress, backbone=pred.backbone)
    X, y, _ = emb.split(split) if split != "all" else (emb.result.embeddings, torch.from_numpy(emb.labels), None)
    if len(X) == 0:
        raise OvrError(f"no images in the {split} split of {data}")
    rows = np.flatnonzero(emb.splits == split) if split != "all" else np.arange(len(X))
    views: list[torch.Tensor] = []
    if tta:
        _, V = views_of(emb.result, rows, tta, cfg, pred.backbone, open_cache(cfg, pred.backbone), progress)
        views = [V[:, k] for k in range(tta)]
    if emb.folder.multilabel:
        return _evaluate_multilabel(pred, emb, rows, X, views, options, root=root, data=data, split=split)
    # Classes the model does not know count as "should be unknown": their rejection rate is reported.
    remap = np.array([pred.classes.index(c) if c in pred.classes else -1 for c in emb.folder.classes])
    y = remap[y.numpy()]
    foreign = y < 0
    if foreign.all():
        raise OvrError(f"none of the classes of {data} is a class of the model")
    ans = pred.model.answer(X, options, views=views)
    known = torch.from_numpy(~foreign).to(X.device)
    present = sorted(set(y[~foreign].tolist()))  # metrics over the classes DATA has, not the model's others
    out = classification_metrics(y[~foreign], ans.index[~foreign], aggregate.normalise_rows(ans.confidences[~foreign]),
                                 pred.classes, labels=present)
    cal = pred.model.answer(X[known], calibrated=True, views=[V[known] for V in views]).confidences
    out["ece_calibrated"] = expected_calibration_error(aggregate.normalise_rows(cal), y[~foreign])
    out["foreign"] = {"n": int(foreign.sum()), "classes": [c for c, r in zip(emb.folder.classes, remap) if r < 0],
                      "rejected": float((ans.index[foreign] < 0).mean()) if foreign.any() else None}
    out["errors"] = worst_errors([emb.result.paths[i] for i in rows], y, ans.index, ans.confidences, pred.classes)
    out.update({"split": split, "model": str(root), "data": str(data), "tta": tta, **_skips(emb)})
    return out


def _skips(emb: EmbeddedFolder) -> dict:
    """What DATA held that was not scored: unreadable files (with why) and the scan's notes."""
    return {"skipped": len(emb.result.skipped), "notes": list(emb.folder.notes),
            "skipped_files": [[str(p), str(why)] for p, why in emb.result.skipped]}


def _evaluate_multilabel(pred: "Predictor", emb: EmbeddedFolder, rows: np.ndarray, X: torch.Tensor, views: list,
                         options: AnswerOptions, *, root, data, split: str) -> dict:
    """Per-class AP, mAP, micro/macro F1 at the stored thresholds, subset accuracy, Hamming loss."""
    from ..learn.metrics import multilabel_metrics

    folder = emb.folder
    unknown = [c for c in folder.classes if c not in pred.classes]
    Tf = folder.targets[emb.result.input_index][rows]
    T = np.zeros((len(rows), len(pred.classes)), dtype=bool)
    for j, c in enumerate(folder.classes):
        if c in pred.classes:
            T[:, pred.classes.index(c)] |= Tf[:, j]
    ans = pred.model.answer(X, options, views=views)
    out = multilabel_metrics(T, ans.confidences, ans.labels, pred.classes)
    out.update({"split": split, "model": str(root), "data": str(data), "tta": options.tta,
                "labels_not_in_model": unknown, **_skips(emb)})
    return out


def bench_views(emb: EmbeddedFolder, cfg: Config, views: int, progress: Progress | None = None) -> dict | None:
    """K augmented views of the train and test rows, for `ovr bench --views K` ([n, K, D] each; cached)."""
    if views <= 0:
        return None
    cache = open_cache(cfg, emb.backbone)
    out = {}
    for split in ("train", "test"):
        _, out[split] = views_of(emb.result, np.flatnonzero(emb.splits == split), views, cfg, emb.backbone, cache,
                                 progress)
    return out


# --- growing a model one class at a time -----------------------------------------------------------------


@dataclass
class GrowResult:
    changed: list[str]
    images: int = 0
    skipped: list = field(default_factory=list)
    confused: dict[str, float] = field(default_factory=dict)  # old head -> share of the new images it fires on
    seconds: float = 0.0
    train_seconds: float = 0.0
    remembered_as: dict[str, int] = field(default_factory=dict)  # these images were already examples of ...


def _open_for_update(root: Path, cfg: Config) -> tuple[Model, Backbone, EmbeddingCache, torch.device]:
    model = load_model(root)
    for folder in (root, root / "heads"):  # before any embedding: a read-only model would fail at the very end
        check_writable(folder, "cannot update the model: folder")
    f = cfg.features
    spec = model.backbone
    if f.backbone != spec["name"]:
        raise OvrError(f"model was made with backbone {spec['name']}, not {f.backbone}")
    root_dir = f.cache_dir or default_cache_dir()
    bb = model_backbone(spec, root_dir)
    device = resolve_device(f.device)
    attach(bb, f.engine, device, root_dir)
    model.gate_method = cfg.train.gate
    return model, bb, EmbeddingCache(root_dir, bb.key, cache_dtype(cfg)), device


def remembered(model: Model, cache: EmbeddingCache, device: torch.device
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(X, y, Xv, yv): the model's remembered train and validation examples, from the cache; labels of classes no
    longer in it are -1 (a multi-label model: target matrices over its classes). X and Xv are read as one block, the
    validation rows after the training rows, so a solve over both (the refit) reads them without a copy."""
    index = {c: i for i, c in enumerate(model.classes)}
    ex = [e for split in ("train", "val") for e in model.examples if e["split"] == split]
    n = sum(e["split"] == "train" for e in ex)
    try:
        X = cache.get([e["key"] for e in ex]).to(device) if ex else torch.empty(0, model.backbone["dim"], device=device)
    except OvrError as e:
        raise OvrError(f"{e} (the model's training images must be embedded on this machine first)") from None
    if any("labels" in e for e in model.examples):  # a multi-label model: a target matrix over its classes
        y = torch.zeros(len(ex), len(model.classes))
        for i, e in enumerate(ex):
            for c in e.get("labels", [e["label"]] if e["label"] is not None else []):
                if c in index:
                    y[i, index[c]] = 1.0
    else:
        y = torch.tensor([index.get(e["label"], -1) if e["label"] is not None else -1 for e in ex], dtype=torch.long)
    return X[:n], y[:n], X[n:], y[n:]


def add_class(root: str | Path, name: str, inputs: list[str], cfg: Config, replace: bool = False,
              negatives: str | Path | None = None, progress: Progress | None = None) -> GrowResult:
    """Embed only the new images, add the class to the model (`Model.add_class`) and save under a lock."""
    t0 = time.perf_counter()
    root = Path(root)
    if not name.strip() or "\x00" in name:  # what a class folder can be named (even "cat "), add-class takes
        raise OvrError(f"invalid class name {name!r}")
    files = expand_inputs(inputs)
    with model_lock(root):
        model, bb, cache, device = _open_for_update(root, cfg)
        if name in model.classes and not replace:
            raise OvrError(f"class {name!r} already exists in {root}; pass --replace to retrain it")
        r = embed_paths(files, bb, cache, device, batch_size=cfg.features.batch_size, workers=cfg.features.workers,
                        strict=cfg.features.strict, progress=progress)
        if not r.keys:
            raise OvrError(f"none of the {len(files)} images for {name!r} could be read")
        # All its images train the new head: a validation part picks the strength, then the head is refit on all.
        splits = split_assignments(len(r.keys), cfg.data.val_fraction, 0.0, cfg.data.split_seed, name)
        dupes = remembered_under_other_labels(model, r.keys, name)
        new_ex = [{"key": k, "label": name, "split": s} for k, s in zip(r.keys, splits)]
        vkeys, V = views_of(r, [i for i, s in enumerate(splits) if s == "train"], cfg.train.views, cfg, bb, cache,
                            progress)
        new_ex += view_examples(vkeys, [e for e in new_ex if e["split"] == "train"], cfg.train.views)
        if name in model.classes and model.stats is not None:  # --replace: its old rows leave the statistics
            model.forget(name, rows_of(model, cache, device, name))
        if negatives is not None:
            d, f = cfg.data, cfg.features
            folder = scan_folder(negatives, d.val_fraction, 0.0, d.split_seed)
            neg = embed_folder(folder, bb, cache, device, f.batch_size, f.workers, f.strict, progress)
            new_ex += [{"key": k, "label": None, "split": str(s)} for k, s in zip(neg.result.keys, neg.splits)]
            if model.stats is not None:
                model.stats.update(neg.result.embeddings, torch.full((len(neg.result.keys),), -1), [])
        model.examples = [e for e in model.examples if e["label"] != name] + new_ex
        is_train = torch.from_numpy(np.asarray(splits) == "train")
        Xn = torch.cat([r.embeddings[is_train.to(r.embeddings.device)].to(device), V.flatten(0, 1)])
        Xnv = r.embeddings[(~is_train).to(r.embeddings.device)].to(device)
        t1 = time.perf_counter()
        model.add_class(name, Xn, Xnv, cfg.train, remembered=lambda: remembered(model, cache, device),
                        progress=progress)
        train_s = time.perf_counter() - t1
        new = torch.tensor([model.classes.index(name)] * len(r.keys))
        confused = {c: v for c, v in model.confused_heads(r.embeddings, new).items() if c != name}
        update_model(model, root, model.rewritten({name}))
    return GrowResult([name], len(r.keys), r.skipped, confused, time.perf_counter() - t0, train_s, dupes)


def rows_of(model: Model, cache: EmbeddingCache, device: torch.device, name: str) -> torch.Tensor:
    """The remembered embeddings of the examples of class `name` that are of no other class (from the cache)."""
    keys = [e["key"] for e in model.examples
            if e.get("split") in ("train", "val") and (e.get("labels") or [e["label"]]) == [name]]
    try:
        return cache.get(keys).to(device) if keys else torch.empty(0, model.backbone["dim"], device=device)
    except OvrError as e:
        raise OvrError(f"{e} (the class's images must be embedded on this machine first)") from None


def remembered_under_other_labels(model: Model, keys: list[str], name: str) -> dict[str, int]:
    """How many of these images the model already remembers under another class (a typo'd class re-added)."""
    keys = set(keys)
    out: dict[str, int] = {}
    for e in model.examples:
        if e["key"] in keys and e["label"] not in (None, name):
            out[e["label"]] = out.get(e["label"], 0) + 1
    return out


def refresh(root: str | Path, classes: list[str], cfg: Config, progress: Progress | None = None) -> GrowResult:
    """Retrain the named heads (or the confused ones) on all current data; every other head stays byte-identical."""
    t0 = time.perf_counter()
    root = Path(root)
    with model_lock(root):
        model, bb, cache, device = _open_for_update(root, cfg)
        unknown = [c for c in classes if c not in model.classes]
        if unknown:
            raise OvrError(f"no class {unknown[0]!r} in {root}")
        X, y, Xv, yv = remembered(model, cache, device)
        confused = model.confused_heads(torch.cat([X, Xv]), torch.cat([y, yv])) if not classes else {}
        chosen = classes or sorted(confused)
        if chosen:
            model.refresh(chosen, X, y, Xv, yv, cfg.train, progress=progress)
            update_model(model, root, model.rewritten(set(chosen)))
    return GrowResult(chosen, confused=confused, seconds=time.perf_counter() - t0)


def remove_class(root: str | Path, name: str, cfg: Config | None = None) -> GrowResult:
    """Drop one head, its class's remembered examples and their statistics; the other BCE heads stay
    byte-identical. Reads the embeddings of that class only (from the cache)."""
    root = Path(root)
    with model_lock(root):
        cfg = cfg or model_config(root)
        model, _, cache, device = _open_for_update(root, cfg)
        if name not in model.classes:
            raise OvrError(f"no class {name!r} in {root}")
        if len(model.classes) == 1:
            raise OvrError(f"{name!r} is the model's only class; delete the folder instead")
        if model.stats is None:  # a model saved before statistics: they are built once from every remembered row
            model.remember(*remembered(model, cache, device), cfg.train)
        model.remove_class(name, rows_of(model, cache, device, name), lambda: remembered(model, cache, device))
        update_model(model, root, model.rewritten(set()))
    return GrowResult([name])


def embed_ranked(folder, cfg, hashed, progress=None):
    """This process's share of embedding DATA (all of it outside torchrun): the process group set up, each rank on
    its own device, no rows gathered (`ovr embed` only counts), the group torn down. -> (rank, EmbeddedFolder);
    only rank 0 reports progress."""
    from ..embedding import distributed

    rank, world, dev = distributed.setup(cfg.features.device)
    if world > 1:
        cfg = replaced(cfg, features=replaced(cfg.features, device=dev))
    try:
        emb = embed_data(folder, cfg, progress if rank == 0 else None, gather=False, rank=rank, world=world,
                         hashed=hashed)
    finally:
        distributed.teardown()
    return rank, emb
