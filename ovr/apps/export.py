"""`ovr export`: a model folder -> one ONNX graph (pixels -> backbone -> every head -> the answer), or the heads alone.

The graph is `answer.answer` traced (with calibrated=False, as `ovr predict` by default): per-head logits, the
confidences and calibrated confidences (times the gate of a grown model), and the answer's class index. Its input is the backbone's crop, uint8 [B, S, S, 3] (NHWC, RGB, as image libraries hold pixels): the
resize + centre crop stay outside the graph, because the antialiased resize (PIL's, or transforms.v2's on tensors:
the model's decode path) has no exact ONNX twin and a slightly different resize would move the logits by ~1e-2;
`split_transform(transform, decode)` (and the `ovr.*` metadata) give that step.
Scaling to [0, 1] and the mean/std normalisation are inside.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..errors import OvrError
from dataclasses import fields

from ..learn.answer import AnswerTensors, answer
from ..config import AnswerOptions
from ..learn.model import Model
from ..embedding.pixels import Preprocess, split_transform  # noqa: F401 (Preprocess: the public type)

OUTPUTS = ("logits", "confidences", "calibrated", "class_index")  # what `ovr export` writes
ROW_OUTPUTS = ("class_index", "top_index", "top_confidence", "labels")  # what a predict row reads
INSTALL_HINT = 'ONNX export needs the export extra: pip install "ovr[export]" (onnx, onnxscript, onnxruntime)'


class OvrGraph(nn.Module):
    """images uint8 [B, S, S, 3] (or embeddings [B, D] with heads_only) -> logits, confidences, calibrated,
    class_index: `answer.answer` itself, traced, on the model's tensors held as buffers."""

    def __init__(self, model: Model, backbone: nn.Module | None, prep: Preprocess | None,
                 options: AnswerOptions = AnswerOptions(), outputs: tuple[str, ...] = OUTPUTS) -> None:
        super().__init__()
        self.backbone = backbone
        self.options, self.outputs = options, outputs
        t = model.tensors()
        self.normalize = t.normalize
        self.head_keys = sorted(t.heads)
        for k in self.head_keys:
            self.register_buffer(f"h_{k}", t.heads[k].float())
        self.tensor_names = [f.name for f in fields(AnswerTensors)
                             if isinstance(getattr(t, f.name), torch.Tensor)]
        for name in self.tensor_names:
            self.register_buffer(name, getattr(t, name).float())
        self.grown = t.gate_weight is not None
        if prep is not None:
            self.register_buffer("mean", torch.tensor(prep.mean).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(prep.std).view(1, 3, 1, 1))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).float() / 255.0
        return self.backbone((x - self.mean) / self.std)

    def forward(self, x: torch.Tensor):
        X = self.features(x) if self.backbone is not None else x
        t = AnswerTensors(heads={k: getattr(self, f"h_{k}") for k in self.head_keys}, normalize=self.normalize,
                          **{name: getattr(self, name) for name in self.tensor_names})
        r = answer(t, X, (), self.options)
        named = {"logits": r.logits, "confidences": r.raw, "calibrated": r.calibrated, "class_index": r.index,
                 "top_index": r.top_index, "top_confidence": r.top_confidence, "labels": r.labels}
        return tuple(named[k] for k in self.outputs)


def export_answer(model: Model, options: AnswerOptions, path: Path) -> None:
    """The answer alone (embeddings [B, D] -> ROW_OUTPUTS) with these options, for the torch-free predict
    (ovr/apps/quick.py), written atomically. The TorchScript-based exporter: a fraction of a second, and it needs
    neither onnxscript nor the export extra."""
    import io
    import warnings

    from ..atomic import atomic_write_bytes
    from ..embedding.engine import OPSET  # the opset the backbone's graph uses, so one onnxruntime reads both

    graph = OvrGraph(model, None, None, options, ROW_OUTPUTS).eval()
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(graph, (torch.zeros(2, model.backbone["dim"]),), buf, input_names=["embeddings"],
                          output_names=list(ROW_OUTPUTS), opset_version=OPSET, dynamo=False,
                          dynamic_axes={k: {0: "batch"} for k in ("embeddings", *ROW_OUTPUTS)})
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())


def export_model(root: str | Path, out: str | Path, *, heads_only: bool = False, opset: int = 18,
                 cache_dir: str | Path | None = None) -> dict:
    """Write OUT.onnx atomically; return what it holds (classes, input, outputs, metadata)."""
    try:
        import onnx
        import onnxscript  # noqa: F401  (torch.onnx's dynamo exporter needs it)
    except ImportError:
        raise OvrError(INSTALL_HINT) from None
    from ..atomic import atomic_write_bytes, check_output_file
    from ..embedding.backbones import model_backbone
    from ..embedding.cache import default_cache_dir
    from ..learn.manifest import model_lock
    from ..learn.store import load_model

    out = check_output_file(out, "cannot write the ONNX file")  # before the export's work
    with model_lock(root):  # a consistent model: no add-class half-way through while it is read
        model = load_model(root)
    spec = model.backbone
    backbone = prep = None
    if not heads_only:
        bb = model_backbone(spec, cache_dir or default_cache_dir())
        prep = split_transform(bb.transform, bb.decode)
        backbone = bb.model.float().eval()
    graph = OvrGraph(model, backbone, prep).eval()
    if heads_only:
        example = torch.zeros(2, spec["dim"])
        input_name, shape = "embeddings", ["batch", spec["dim"]]
    else:
        example = torch.zeros(2, prep.size, prep.size, 3, dtype=torch.uint8)
        input_name, shape = "images", ["batch", prep.size, prep.size, 3]
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad():
        prog = torch.onnx.export(graph, (example,), input_names=[input_name],
                                 output_names=list(OUTPUTS),
                                 dynamic_shapes=({0: batch},), opset_version=opset, dynamo=True,
                                 external_data=False, verbose=False)
    meta = {
        "ovr.classes": json.dumps(model.classes, ensure_ascii=False),
        "ovr.thresholds": json.dumps([model.records[c].threshold for c in model.classes]),
        "ovr.calibration": json.dumps([[model.records[c].calibration.a, model.records[c].calibration.b]
                                       for c in model.classes]),
        "ovr.input": json.dumps({"name": input_name, "shape": shape,
                                 "dtype": "float32" if heads_only else "uint8"}),
        "ovr.outputs": "logits [B, N] per head; confidences [B, N] sigmoid(logit), times the gate of a grown "
                       "model; calibrated [B, N] sigmoid(a * logit + b) per head (ovr.calibration), times the gate; "
                       "class_index [B] the answer: the class with the highest confidence (ovr.answer.answer)",
        "ovr.backbone": json.dumps(spec),
        "ovr.grown": json.dumps(graph.grown),
    }
    if prep is not None:
        meta["ovr.preprocess"] = json.dumps(prep.metadata())
    proto = prog.model_proto
    for k, v in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    data = proto.SerializeToString()
    atomic_write_bytes(out, data)
    return {"path": str(out), "bytes": len(data), "classes": model.classes, "input": json.loads(meta["ovr.input"]),
            "grown": graph.grown, "opset": opset, "onnx_version": onnx.__version__}


def onnx_session(path: str | Path):
    """An onnxruntime session plus the class names and preprocessing from the file's metadata."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise OvrError(INSTALL_HINT) from None
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    meta = sess.get_modelmeta().custom_metadata_map
    return sess, meta
