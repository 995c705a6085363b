"""`ovr predict` without torch: onnxruntime + PIL + numpy, for a fresh process that has a few images to answer.

Importing torch takes longer than embedding one image with onnxruntime. So where everything is in the cache
folder already, predict runs two graphs there and nothing else:
- the backbone's graph and its preprocessing record (`engine.export_backbone`, made on the engine's first use);
- the model's answer for these options: `answer.answer` itself, traced by `export.export_answer` on the first
  predict that took the torch path, keyed by the model's manifest (content-addressed files), the options and
  ovr's version, so a model changed by add-class or a new ovr never reuses an old graph.
The resize and crop are the record's steps on PIL images (`geometry.crop_pil`): the same pixels as the torch PIL
path; on a model whose decode path is "tensor", the crops differ from transforms.v2's by one level in a few values,
and the answers agree (tests/test_engine.py). Anything else (more than QUICK_MAX files, TTA, a CUDA machine,
`--engine torch` or `--device cuda`, torchrun, an image this cannot crop) takes the torch path. Embeddings made here
are not written to the cache (that needs torch); nothing else changes.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import numpy as np

from ..config import AnswerOptions
from ..embedding.cache import default_cache_dir
from ..embedding.engine import OrtForward, available, graph_file
from ..embedding.identity import cache_key
from ..learn.manifest import MANIFEST, read_manifest
from ..version import __version__

BATCH = 32
# Up to this many files per call: a few images are what the torch import dominates; more take the torch path,
# whose embeddings go into the cache and whose progress bar shows (and there torch's import is a small part).
QUICK_MAX = 64
ANSWER_GRAPHS_KEPT = 32  # answer graphs kept in the cache folder, newest first (each is the size of the heads)


def answer_graph_path(cache_dir: str | Path, root: str | Path, options: AnswerOptions) -> Path:
    """Where the answer graph of this model (as its manifest is now) and these options lives."""
    h = hashlib.sha256((Path(root) / MANIFEST).read_bytes())
    h.update(json.dumps(dataclasses.asdict(options), sort_keys=True).encode())
    h.update(f"ovr {__version__}".encode())
    return Path(cache_dir) / "answers" / f"{h.hexdigest()}.onnx"


def _cuda_present() -> bool:
    """Whether this machine may have a CUDA device (then 'auto' is torch's to resolve): NVIDIA's device nodes."""
    return os.path.exists("/dev/nvidiactl") or os.environ.get("CUDA_VISIBLE_DEVICES", "") not in ("", "-1")


def _graphs(root: Path, options: AnswerOptions, cache_dir: Path, engine: str, device: str):
    """(backbone graph, its record, answer graph, manifest) when the torch-free path can answer; else None."""
    if options.tta or engine not in ("auto", "onnxruntime") or device not in ("auto", "cpu"):
        return None
    if os.environ.get("WORLD_SIZE", "1") != "1" or not available() or (device == "auto" and _cuda_present()):
        return None
    m = read_manifest(root)
    b = m["backbone"]
    if b.get("frame", "crop") not in ("crop", "full") or not {"fingerprint", "preprocess", "decode"} <= b.keys():
        return None
    graph = graph_file(cache_dir, cache_key(b["name"], b["fingerprint"], b["preprocess"], b["decode"]))
    answer = answer_graph_path(cache_dir, root, options)
    if not (graph.exists() and graph.with_suffix(".json").exists() and answer.exists()):
        return None
    return graph, json.loads(graph.with_suffix(".json").read_text()), answer, m


def predict(root: str | Path, files: list, options: AnswerOptions, *, cache_dir: str | Path | None = None,
            engine: str = "auto", device: str = "auto") -> list[dict] | None:
    """One dict per file, as `Predictor.predict` gives them; None where only the torch path can answer."""
    from ..embedding.data import decode_image, describe_error, read_image_file
    from ..embedding.geometry import crop_pil, normalized
    from ..runtime import compute_threads

    if not 0 < len(files) <= QUICK_MAX:
        return None
    root, cache_dir = Path(root), Path(cache_dir) if cache_dir else default_cache_dir()
    found = _graphs(root, options, cache_dir, engine, device)
    if found is None:
        return None
    graph, record, answer_graph, manifest = found
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = compute_threads(int(os.environ.get("OVR_THREADS", "0") or 0))
    opts.inter_op_num_threads, opts.log_severity_level = 1, 3
    try:
        backbone = OrtForward(graph, opts.intra_op_num_threads).open()
        heads = ort.InferenceSession(str(answer_graph), opts, providers=["CPUExecutionProvider"])
    except Exception:  # noqa: BLE001  (a graph pruned or damaged since it was found: the torch path answers)
        return None
    idx, skipped, parts = [], [], {}
    for s in range(0, len(files), BATCH):  # decoded and embedded a batch at a time
        crops = []
        for i in range(s, min(s + BATCH, len(files))):
            try:
                arr = crop_pil(record, decode_image(read_image_file(files[i])))
            except Exception as e:  # noqa: BLE001  (PIL raises many types for bad files; the row says why)
                skipped.append((files[i], describe_error(e)))
                continue
            if arr is None:
                return None
            crops.append(arr)
            idx.append(i)
        if crops:
            X = backbone.run(normalized(np.stack(crops), record))
            for name, v in zip([o.name for o in heads.get_outputs()], heads.run(None, {"embeddings": X})):
                parts.setdefault(name, []).append(v)
    if not parts:
        n = len(manifest["classes"])
        parts = {"class_index": [np.zeros(0, np.int64)], "top_index": [np.zeros((0, n), np.int64)],
                 "top_confidence": [np.zeros((0, n), np.float32)], "labels": [np.zeros((0, n), bool)]}
    out = {k: np.concatenate(v) for k, v in parts.items()}
    return answer_rows(files, idx, skipped, manifest["classes"], options, index=out["class_index"],
                       top_index=out["top_index"], top_confidence=out["top_confidence"], labels=out["labels"])


def answer_rows(inputs: list, idx: list[int], skipped: list[tuple], classes: list[str], options: AnswerOptions, *,
                index, top_index, top_confidence, labels) -> list[dict]:
    """predict's rows from the answer's arrays over the usable inputs (`idx`: their positions in `inputs`): class
    (or 'unknown'), confidence, top-k, runner-up, labels (multi-label); an error row for each skipped input."""
    rows: list[dict] = [{}] * len(inputs)
    k = options.top_k
    for r, i in enumerate(idx):
        ti, tc = top_index[r], top_confidence[r]
        p = int(index[r])
        x = inputs[i]
        row = {"input": str(x) if isinstance(x, (str, Path)) else "<image>",
               "class": classes[p] if p >= 0 else "unknown", "confidence": float(tc[0]),
               "top": [{"class": classes[int(j)], "confidence": float(c)} for j, c in zip(ti[:k], tc[:k])]}
        if len(classes) > 1:
            row["runner_up"] = {"class": classes[int(ti[1])], "confidence": float(tc[1])}
        if options.multilabel:
            row["labels"] = [c for c, f in zip(classes, labels[r]) if f]
        rows[i] = row
    bad = {str(p): why for p, why in skipped}
    for i, x in enumerate(inputs):
        if not rows[i]:
            rows[i] = {"input": str(x), "error": bad.get(str(x), "unreadable")}
    return rows


def prepare(predictor, options: AnswerOptions) -> None:
    """After a predict that took the torch path: trace the answer graph for these options into the cache, so the
    next predict of this model can take the torch-free path. Only where that path could run (onnxruntime, the
    backbone's graph made); a failure here costs nothing but the shortcut."""
    if predictor.engine != "onnxruntime" or options.tta:
        return
    path = answer_graph_path(predictor.cache_dir, predictor.root, options)
    if path.exists():
        return
    from ..apps.export import export_answer

    try:
        export_answer(predictor.model, options, path)
    except Exception:  # noqa: BLE001  (the shortcut only: the answer already printed is the torch path's)
        return
    prune_answer_graphs(path.parent)


def prune_answer_graphs(folder: Path, keep: int = ANSWER_GRAPHS_KEPT) -> None:
    """Every model change and option set makes an answer graph: keep the `keep` newest."""
    def mtime(q: Path) -> float:
        try:
            return q.stat().st_mtime
        except OSError:  # pruned by another process meanwhile
            return 0.0

    for old in sorted(folder.glob("*.onnx"), key=mtime, reverse=True)[keep:]:
        old.unlink(missing_ok=True)
