"""Metrics as plain dicts, from scikit-learn where it has them (ECE is computed here: scikit-learn has none).
scikit-learn is imported by the functions that use it: its import is slow (a large share of a small fit in a fresh
process), and training, which scores its heads with `binary_head_metrics` (plain numpy), never needs it."""
from __future__ import annotations

import numpy as np


def expected_calibration_error(proba: np.ndarray, y: np.ndarray, bins: int = 15) -> float:
    conf = proba.max(1)
    correct = proba.argmax(1) == y
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        m = which == b
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(ece)


def reliability(proba: np.ndarray, y: np.ndarray, bins: int = 10) -> dict[str, list[float]]:
    conf = proba.max(1)
    correct = proba.argmax(1) == y
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    out = {"bin_confidence": [], "bin_accuracy": [], "bin_count": []}
    for b in range(bins):
        m = which == b
        out["bin_confidence"].append(float(conf[m].mean()) if m.any() else float("nan"))
        out["bin_accuracy"].append(float(correct[m].mean()) if m.any() else float("nan"))
        out["bin_count"].append(int(m.sum()))
    return out


def classification_metrics(y: np.ndarray, pred: np.ndarray, proba: np.ndarray | None, classes: list[str],
                           top: int = 3, labels: list[int] | None = None) -> dict:
    """y, pred: label indices (pred may hold -1 for 'unknown'); proba: [n, K] rows summing to 1, or None.
    `labels`: the classes macro averages run over (default all; evaluate passes those present in the data)."""
    from sklearn.metrics import (accuracy_score, confusion_matrix, f1_score, log_loss,
                                 precision_recall_fscore_support, top_k_accuracy_score)

    all_labels = list(range(len(classes)))
    present = all_labels if labels is None else list(labels)
    p, r, f, s = precision_recall_fscore_support(y, pred, labels=all_labels, zero_division=0)
    labels = all_labels
    out = {
        "n": int(len(y)),
        "accuracy": float(accuracy_score(y, pred)),
        "macro_f1": float(f1_score(y, pred, labels=present, average="macro", zero_division=0)),
        "balanced_accuracy": float(np.mean([(pred[y == c] == c).mean() for c in present if (y == c).any()]))
        if len(y) else 0.0,
        "unknown_rate": float((pred < 0).mean()) if len(pred) else 0.0,
        "per_class": {c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
                      for i, c in enumerate(classes)},
        "confusion_matrix": confusion_matrix(y, pred, labels=labels).tolist(),
        "classes": list(classes),
    }
    if proba is not None and len(y):
        out["nll"] = float(log_loss(y, np.clip(proba, 1e-12, 1), labels=labels))
        out["ece"] = expected_calibration_error(proba, y)
        if len(classes) > 2:
            k = min(top, len(classes) - 1)
            out[f"top{k}_accuracy"] = float(top_k_accuracy_score(y, proba, k=k, labels=labels))
    return out


def binary_head_metrics(conf: np.ndarray, targets: np.ndarray, thresholds: np.ndarray) -> list[dict]:
    """Each head as a detector on validation data: precision, recall, F1 at its threshold (scikit-learn's
    definitions with zero_division=0, computed for all heads at once: its per-call checks cost more than the
    arithmetic, 64 calls a sizeable part of a small fit). "positives": the head's validation positives (with none,
    precision, recall and F1 are 0 by that convention, not a measurement)."""
    fired = conf >= np.asarray(thresholds)[None, :]
    t = np.asarray(targets).astype(bool)
    tp = (fired & t).sum(0).astype(float)
    n_fired, n_true = fired.sum(0).astype(float), t.sum(0).astype(float)
    p = np.divide(tp, n_fired, out=np.zeros_like(tp), where=n_fired > 0)
    r = np.divide(tp, n_true, out=np.zeros_like(tp), where=n_true > 0)
    f = np.divide(2 * tp, n_fired + n_true, out=np.zeros_like(tp), where=(n_fired + n_true) > 0)
    return [{"precision": float(a), "recall": float(b), "f1": float(c), "positives": int(k)}
            for a, b, c, k in zip(p, r, f, n_true)]


def worst_errors(paths: list, y: np.ndarray, pred: np.ndarray, conf: np.ndarray, classes: list[str],
                 per_class: int = 4) -> list[dict]:
    """The error gallery's rows: for each true class (y; -1: none), the rows answered wrongly (pred; -1: unknown)
    with the highest confidence in their answer (conf [n, K]; an 'unknown' counts at its best head's)."""
    out = []
    for k in sorted(set(y[y >= 0].tolist())):
        rows = np.flatnonzero((y == k) & (pred != k))
        c = [conf[r, pred[r]] if pred[r] >= 0 else conf[r].max() for r in rows]
        for r, cr in sorted(zip(rows, c), key=lambda t: -t[1])[:per_class]:
            out.append({"path": str(paths[r]), "true": classes[k],
                        "predicted": classes[pred[r]] if pred[r] >= 0 else "unknown", "confidence": float(cr)})
    return out


MULTILABEL_SCALARS = ("mAP", "micro_f1", "macro_f1", "subset_accuracy", "hamming_loss")


def multilabel_metrics(T: np.ndarray, conf: np.ndarray, fired: np.ndarray, classes: list[str]) -> dict:
    """Multi-label scores with scikit-learn's metrics. T, fired: bool [n, K] (true labels; heads that fire at
    their stored thresholds); conf: [n, K] per-head confidences. AP and mAP over classes with a positive."""
    from sklearn.metrics import (accuracy_score, average_precision_score, f1_score, hamming_loss,
                                 precision_recall_fscore_support)

    T, fired = np.asarray(T, dtype=bool), np.asarray(fired, dtype=bool)
    present = [k for k in range(T.shape[1]) if T[:, k].any()]
    ap = {classes[k]: float(average_precision_score(T[:, k], conf[:, k])) for k in present}
    p, r, f, s = precision_recall_fscore_support(T, fired, average=None, zero_division=0)
    return {
        "multilabel": True, "n": int(len(T)), "classes": classes,
        "mAP": float(np.mean(list(ap.values()))) if ap else float("nan"),
        "micro_f1": float(f1_score(T, fired, average="micro", zero_division=0)),
        "macro_f1": float(f1_score(T[:, present], fired[:, present], average="macro", zero_division=0)),
        "subset_accuracy": float(accuracy_score(T, fired)),
        "hamming_loss": float(hamming_loss(T, fired)),
        "per_class": {classes[k]: {"precision": float(p[k]), "recall": float(r[k]), "f1": float(f[k]),
                                   "support": int(s[k]), "ap": ap.get(classes[k])} for k in range(T.shape[1])},
    }
