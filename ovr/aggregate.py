"""Head confidences -> answers. Pure functions on [n, N] arrays: calibration, thresholds, argmax, unknown, multilabel."""
from __future__ import annotations

import numpy as np
import torch

from .config import CALIBRATION

UNKNOWN = -1


def fit_calibration(logits: np.ndarray, targets: np.ndarray, kind: str = "platt", iters: int = 50
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Per-head (a, b) with p = sigmoid(a*z + b), fitted by Newton's method on that head's validation BCE.

    'temperature' fits a only (b = 0); 'none' returns the identity. Each head's 2x2 Newton step uses its
    own column only, so calibration keeps heads independent.
    """
    if kind not in CALIBRATION:
        raise ValueError(f"calibration must be platt, temperature or none, not {kind!r}")
    N = logits.shape[1]
    if kind == "none" or len(logits) == 0:
        return np.ones(N), np.zeros(N)
    z = torch.as_tensor(logits, dtype=torch.float64)
    t = torch.as_tensor(targets, dtype=torch.float64)
    # Platt's smoothed targets: without them separable validation data drives a to infinity.
    npos, nneg = t.sum(0), (1 - t).sum(0)
    t = torch.where(t > 0.5, (npos + 1) / (npos + 2), 1 / (nneg + 2))
    a, b = torch.ones(N, dtype=torch.float64), torch.zeros(N, dtype=torch.float64)
    ridge = 1e-6

    def loss(a, b):
        return torch.nn.functional.binary_cross_entropy_with_logits(a * z + b, t, reduction="none").mean(0)

    cur = loss(a, b)
    for _ in range(iters):
        p = torch.sigmoid(a * z + b)
        w = p * (1 - p) + 1e-12
        r = p - t
        ga, gb = (r * z).mean(0), r.mean(0)
        haa, hab, hbb = (w * z * z).mean(0) + ridge, (w * z).mean(0), w.mean(0) + ridge
        if kind == "temperature":
            da, db = ga / haa, torch.zeros_like(gb)
        else:
            det = haa * hbb - hab * hab
            da, db = (hbb * ga - hab * gb) / det, (haa * gb - hab * ga) / det
        # Damped Newton: halve each head's step until its own loss does not rise.
        step = torch.ones(N, dtype=torch.float64)
        for _ in range(30):
            na, nb = (a - step * da).clamp(1e-4, 1e4), b - step * db
            new = loss(na, nb)
            ok = new <= cur + 1e-12
            if ok.all():
                break
            step = torch.where(ok, step, step / 2)
        ok = new <= cur + 1e-12
        a, b, cur = torch.where(ok, na, a), torch.where(ok, nb, b), torch.where(ok, new, cur)
        if float((step * (da.abs() + db.abs())).max()) < 1e-9:
            break
    return a.numpy(), b.numpy()


def confidences(logits: np.ndarray, a: np.ndarray | None = None, b: np.ndarray | None = None) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    if a is not None:
        z = z * a + b
    return 1.0 / (1.0 + np.exp(-np.clip(z, -500, 500)))


def fit_thresholds(conf: np.ndarray, targets: np.ndarray, default: float = 0.5) -> np.ndarray:
    """Per head, the confidence threshold with the best F1 on validation (default where a head has no positives)."""
    n, N = conf.shape
    out = np.full(N, default)
    for j in range(N):
        pos = targets[:, j].astype(bool)
        if not pos.any() or n == 0:
            continue
        order = np.argsort(-conf[:, j], kind="stable")
        s, y = conf[order, j], pos[order]
        tp = np.cumsum(y)
        fp = np.cumsum(~y)
        f1 = 2 * tp / (tp + fp + pos.sum())
        last = np.r_[s[1:] != s[:-1], True]  # only cut between distinct scores
        f1 = np.where(last, f1, -1)
        k = int(np.argmax(f1))
        nxt = s[k + 1] if k + 1 < n else 0.0
        out[j] = float((s[k] + nxt) / 2)  # midway to the next score: robust to tiny shifts
    return out


def predict(conf: np.ndarray, reject_below: float | None = None, thresholds: np.ndarray | None = None) -> np.ndarray:
    """Argmax of confidence; UNKNOWN where the best is below reject_below, or where no head passes its threshold."""
    idx = conf.argmax(1)
    if reject_below is not None:
        idx = np.where(conf.max(1) < reject_below, UNKNOWN, idx)
    if thresholds is not None:
        idx = np.where((conf >= thresholds).any(1), idx, UNKNOWN)
    return idx


def multilabel(conf: np.ndarray, thresholds: np.ndarray | float = 0.5) -> np.ndarray:
    """Every class whose head fires: a boolean [n, N] matrix."""
    return conf >= thresholds


def top_k(conf: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    k = min(k, conf.shape[1])
    idx = np.argsort(-conf, axis=1, kind="stable")[:, :k]
    return idx, np.take_along_axis(conf, idx, 1)


def normalise_rows(conf: np.ndarray) -> np.ndarray:
    """OvR confidences as a distribution (as scikit-learn's OneVsRestClassifier.predict_proba), for NLL and ECE."""
    return conf / np.clip(conf.sum(1, keepdims=True), 1e-12, None)
