"""THE answer: embeddings -> per-head logits -> reported confidences -> the class (or unknown), top-k, labels.

One torch function over the model's tensors (`AnswerTensors`) and one options object (`AnswerOptions`).
`Model.answer`, the exported ONNX graph (which traces this very function), the estimators, `ovr serve`, `evaluate`
and the CLI all call it, so a rule fixed here is fixed everywhere.

The rules, for every model (grown, shrunk, calibrated, with thresholds, with TTA):
- a row's reported confidences are each head's sigmoid (calibrated if asked), times that head's gate in a grown
  model (1 - the gate's probability that the input is of a class the head never saw);
- the answer is the class with the highest reported confidence, or `unknown` (-1): below `reject_below`, or, with
  `thresholds`, when the answer's own head does not pass its own threshold (in the same space);
- `top` is sorted by reported confidence; multi-label answers are every class that passes its own threshold;
- with TTA, each head's logits and the gate's posteriors are averaged over the views.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from ..config import AnswerOptions

UNKNOWN = -1


@dataclass
class AnswerTensors:
    """Everything the answer reads, as tensors over the model's classes in order (buffers in the ONNX graph)."""
    heads: dict[str, torch.Tensor]  # stacked head parameters (heads.stack_heads)
    normalize: str  # standardize (folded into the heads) | l2 (applied to the heads' inputs)
    cal_a: torch.Tensor  # [N] calibration p = sigmoid(a * z + b)
    cal_b: torch.Tensor  # [N]
    thresholds: torch.Tensor  # [N] on the raw sigmoid confidence
    unseen: torch.Tensor  # [N, N] float: 1 where head h never saw an example of class k
    gate_weight: torch.Tensor | None = None  # [N, M] the gate's logits on phi(x); None: no gate
    gate_bias: torch.Tensor | None = None  # [N]
    gate_projection: torch.Tensor | None = None  # [D, M]: phi(x) = relu(x @ P); None: phi(x) = x
    head_projection: torch.Tensor | None = None  # [D, M]: heads read relu(x @ P) (ridge heads on random features)


@dataclass
class AnswerResult:
    index: torch.Tensor  # [n] class index, or UNKNOWN
    confidences: torch.Tensor  # [n, N] reported: raw or calibrated as asked, times the gate
    thresholds: torch.Tensor  # [N] in the same space as `confidences`
    logits: torch.Tensor  # [n, N] per head, averaged over the views
    raw: torch.Tensor  # [n, N] sigmoid(logit) x gate
    calibrated: torch.Tensor  # [n, N] sigmoid(a * logit + b) x gate
    labels: torch.Tensor  # [n, N] bool: every class whose reported confidence passes its threshold
    top_index: torch.Tensor  # [n, k] classes by reported confidence, highest first
    top_confidence: torch.Tensor  # [n, k]


def head_logits(t: AnswerTensors, X: torch.Tensor) -> torch.Tensor:
    """Per-head logits [n, N] of raw embeddings X [n, D]."""
    from .heads import stacked_logits

    if t.head_projection is not None:
        X = torch.relu(X @ t.head_projection.to(X))
    elif t.normalize == "l2":
        X = F.normalize(X, dim=1)
    p = t.heads
    return stacked_logits(p, X.to(next(iter(p.values())).dtype))


def gate_posterior(t: AnswerTensors, X: torch.Tensor) -> torch.Tensor:
    """The gate's class posterior [n, N] (float64 on the CPU, float32 in an exported graph)."""
    dtype = t.gate_weight.dtype
    X = X.to(dtype)
    if t.gate_projection is not None:
        X = torch.relu(X @ t.gate_projection.to(X))
    return torch.softmax(X @ t.gate_weight.T + t.gate_bias, dim=1)


def calibrate(z: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(z * a + b)


def answer(t: AnswerTensors, X: torch.Tensor, views: Sequence[torch.Tensor] = (),
           options: AnswerOptions = AnswerOptions()) -> AnswerResult:
    """The model's answer for embeddings X [n, D] (and augmented views of the same rows)."""
    z = head_logits(t, X)
    for V in views:
        z = z + head_logits(t, V)
    z = z / (1 + len(views))
    raw = torch.sigmoid(z)
    cal = calibrate(z, t.cal_a, t.cal_b)
    if t.gate_weight is not None:
        post = gate_posterior(t, X)
        for V in views:
            post = post + gate_posterior(t, V)
        post = post / (1 + len(views))
        g = torch.clamp(1.0 - post @ t.unseen.to(post).T, 0.0, 1.0).to(raw)
        raw, cal = raw * g, cal * g
    conf = cal if options.calibrated else raw
    thr = t.thresholds.to(conf)
    if options.calibrated:  # thresholds were chosen on raw confidences; calibration is monotonic
        p = thr.clamp(1e-12, 1 - 1e-12)
        thr = calibrate(torch.log(p / (1 - p)), t.cal_a.to(conf), t.cal_b.to(conf))
    top_conf, top_index = torch.topk(conf, min(max(options.top_k, 2), conf.shape[1]), dim=1)  # ONNX TopK
    index, best = top_index[:, 0], top_conf[:, 0]
    unknown = torch.zeros_like(best, dtype=torch.bool)
    if options.reject_below is not None:
        unknown = unknown | (best < options.reject_below)
    if options.thresholds:
        unknown = unknown | (best < thr[index])
    index = torch.where(unknown, torch.full_like(index, UNKNOWN), index)
    return AnswerResult(index, conf, thr, z, raw, cal, conf >= thr, top_index, top_conf)
