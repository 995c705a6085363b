"""One-vs-rest heads: N independent binary classifiers on embeddings, trained together as stacked columns.

Independence is by construction: each column's loss is a mean over the batch and columns are summed, so a
column's gradient, its Adam state, its early stop and its L2 choice depend on that column alone. The batch
order comes from the global seed and initial weights from (seed, class name), never from the other classes.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .config import HEADS, NORMALIZE
from .runtime import head_seed, resolve_device

Tensors = dict[str, torch.Tensor]


# --- feature normalisation -------------------------------------------------------------------------------

# Floor of a dimension's std, as a share of the mean std over dimensions. Pretrained embeddings have
# near-dead dimensions (195 of EfficientNet-Lite0's 1,280 vary by < 1e-3 on the digits); dividing by their
# tiny std turns any image that does light them up (a class added later, an odd photo at predict time)
# into values of 1e5 and wrecks every head's answer on it. On the digits (benchmarks/add_class.py) this floor
# took train-on-10 from 0.933 to 0.963 test accuracy and train-on-9-then-add from 0.920 to 0.946.
STD_FLOOR = 0.01


@dataclass
class Normalizer:
    kind: str  # standardize | l2
    mean: torch.Tensor | None = None
    std: torch.Tensor | None = None

    @classmethod
    def fit(cls, kind: str, X: torch.Tensor) -> "Normalizer":
        if kind not in NORMALIZE:
            raise ValueError(f"normalize must be standardize or l2, not {kind!r}")
        if kind == "l2":
            return cls("l2")
        std = X.std(0, unbiased=False)
        return cls(kind, X.mean(0), std.clamp_min(max(1e-6, STD_FLOOR * float(std.mean()))))

    def __call__(self, X: torch.Tensor) -> torch.Tensor:
        if self.kind == "l2":
            return F.normalize(X, dim=1)
        return (X - self.mean.to(X.device)) / self.std.to(X.device)

    def fold(self, head: Tensors) -> Tensors:
        """The same head acting on raw features: standardisation is affine, so it goes into the first layer
        (w/std, b - w.(mean/std)). Each stored head then carries the statistics of the data it was trained on,
        and a head added later can use statistics that include its own class without touching the others.
        L2 normalisation is not affine and needs no statistics: it stays a transform of the inputs."""
        if self.kind == "l2":
            return dict(head)
        w = head["weight" if "weight" in head else "w1"].to(torch.float64)
        mean, std = self.mean.to(w.device, torch.float64), self.std.to(w.device, torch.float64)
        out = dict(head)
        if "weight" in head:  # linear: w [D]
            out["weight"], out["bias"] = w / std, head["bias"] - (w * mean / std).sum(-1)
        else:  # mlp: w1 [D, H]
            out["w1"], out["b1"] = w / std[:, None], head["b1"] - (mean / std) @ w
        return {k: v.to(head[k].dtype) for k, v in out.items()}


def check_head(head: str) -> None:
    if head not in HEADS:
        raise ValueError(f"head must be one of {', '.join(HEADS)}, not {head!r}")


def head_inputs(kind: str, X: torch.Tensor) -> torch.Tensor:
    """What folded heads read: raw features, or L2-normalised ones."""
    return F.normalize(X, dim=1) if kind == "l2" else X


# --- stacked models: every parameter has a leading column axis C -------------------------------------------

def init_linear(seeds: list[int], dim: int, outputs: int = 0) -> Tensors:
    """Columns of linear models; outputs=0 for one logit per column (OvR), K for a K-way softmax per column."""
    shape = (dim,) if outputs == 0 else (outputs, dim)
    ws = []
    for s in seeds:
        g = torch.Generator().manual_seed(s)
        ws.append(torch.randn(shape, generator=g) * 0.01)
    w = torch.stack(ws)
    return {"weight": w, "bias": torch.zeros(w.shape[:-1])}


def init_mlp(seeds: list[int], dim: int, hidden: int, outputs: int = 0) -> Tensors:
    p: dict[str, list[torch.Tensor]] = {"w1": [], "b1": [], "w2": [], "b2": []}
    for s in seeds:
        g = torch.Generator().manual_seed(s)
        p["w1"].append(torch.randn(dim, hidden, generator=g) * (2.0 / dim) ** 0.5)
        p["b1"].append(torch.zeros(hidden))
        w2_shape = (hidden,) if outputs == 0 else (outputs, hidden)
        p["w2"].append(torch.randn(w2_shape, generator=g) * (1.0 / hidden) ** 0.5)
        p["b2"].append(torch.zeros(()) if outputs == 0 else torch.zeros(outputs))
    return {k: torch.stack(v) for k, v in p.items()}


def stacked_logits(p: Tensors, X: torch.Tensor) -> torch.Tensor:
    """X [B, D] -> logits [B, C] (binary columns) or [B, C, K] (softmax columns), one batched matmul."""
    if "weight" in p:
        w = p["weight"]
        if w.dim() == 2:
            return X @ w.T + p["bias"]
        return torch.einsum("bd,ckd->bck", X, w) + p["bias"]
    h = torch.relu(torch.einsum("bd,cdh->bch", X, p["w1"]) + p["b1"])
    w2 = p["w2"]
    if w2.dim() == 2:
        return torch.einsum("bch,ch->bc", h, w2) + p["b2"]
    return torch.einsum("bch,ckh->bck", h, w2) + p["b2"]


# --- losses: per column, mean over the batch -------------------------------------------------------------

def bce_columns(z: torch.Tensor, t: torch.Tensor, pos_weight: torch.Tensor) -> torch.Tensor:
    """Pos-weighted BCEWithLogitsLoss of each column [B, C] -> [C]."""
    return F.binary_cross_entropy_with_logits(z, t, pos_weight=pos_weight, reduction="none").mean(0)


def bce_linear_grad(p: Tensors, X: torch.Tensor, t: torch.Tensor, pos_weight: torch.Tensor) -> Tensors:
    """Closed-form gradient of bce_columns for linear columns: dL/dz = sigmoid(z)(1 + (pw-1)t) - pw t.

    Same numbers as autograd through BCEWithLogitsLoss (a test checks it), without the graph: several times
    faster on CPU, where this loop is the whole cost of training.
    """
    z = X @ p["weight"].T + p["bias"]
    r = torch.sigmoid(z) * (1 + (pos_weight - 1) * t) - pos_weight * t
    r /= X.shape[0]
    return {"weight": r.T @ X, "bias": r.sum(0)}


def ce_columns(z: torch.Tensor, y: torch.Tensor, _unused=None) -> torch.Tensor:
    """Cross-entropy of each softmax column: z [B, C, K], y [B] -> [C]."""
    B, C, K = z.shape
    return F.cross_entropy(z.reshape(B * C, K), y.repeat_interleave(C), reduction="none").view(B, C).mean(0)


def ce_linear_grad(p: Tensors, X: torch.Tensor, y: torch.Tensor, _unused=None) -> Tensors:
    z = torch.einsum("bd,ckd->bck", X, p["weight"]) + p["bias"]
    r = torch.softmax(z, -1)
    r[torch.arange(len(y)), :, y] -= 1
    r /= X.shape[0]
    return {"weight": torch.einsum("bck,bd->ckd", r, X), "bias": r.sum(0)}


def autograd_grad(loss_fn: Callable) -> Callable:
    def grad(p: Tensors, X: torch.Tensor, t: torch.Tensor, extra) -> Tensors:
        q = {k: v.detach().requires_grad_(True) for k, v in p.items()}
        loss = loss_fn(stacked_logits(q, X), t, extra).sum()  # sum over columns keeps them independent
        gs = torch.autograd.grad(loss, list(q.values()))
        return dict(zip(q.keys(), gs))
    return grad


# --- the trainer: Adam, per-column L2, per-column early stopping, best weights kept ----------------------

@dataclass
class TrainResult:
    params: Tensors  # best weights per column
    best_val: torch.Tensor  # [C]
    best_epoch: torch.Tensor  # [C]
    epochs_run: int
    seconds: float


def _col(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))


def train_columns(params: Tensors, grad_fn: Callable, loss_fn: Callable, X: torch.Tensor, T: torch.Tensor,
                  Xv: torch.Tensor | None, Tv: torch.Tensor | None, l2: torch.Tensor, extra: torch.Tensor | None,
                  epochs: int, lr: float, batch_size: int, patience: int, seed: int,
                  progress: Callable | None = None) -> TrainResult:
    """Minibatch Adam on C independent columns. Without validation data every column runs all epochs."""
    t0 = time.perf_counter()
    dev = X.device
    p = {k: v.to(dev).clone() for k, v in params.items()}
    C = next(iter(p.values())).shape[0]
    l2 = l2.to(dev)
    m = {k: torch.zeros_like(v) for k, v in p.items()}
    s = {k: torch.zeros_like(v) for k, v in p.items()}
    b1, b2, eps = 0.9, 0.999, 1e-8
    active = torch.ones(C, dtype=torch.bool, device=dev)
    steps = torch.zeros(C, device=dev)
    best = {k: v.clone() for k, v in p.items()}
    best_val = torch.full((C,), float("inf"), device=dev)
    best_epoch = torch.zeros(C, dtype=torch.long, device=dev)
    bad = torch.zeros(C, dtype=torch.long, device=dev)
    g = torch.Generator().manual_seed(seed)
    n = X.shape[0]
    # Small training sets (few-shot) would get one step per epoch and stop before learning anything:
    # keep at least ~8 steps per epoch. Depends on n only, so columns stay independent.
    batch_size = max(1, min(batch_size, n // 8))
    epoch = 0
    for epoch in range(1, epochs + 1):
        perm = torch.randperm(n, generator=g).to(dev)
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size]
            grads = grad_fn(p, X[idx], T[idx], extra)
            steps += active
            bc1 = _col(1 - b1 ** steps.clamp_min(1), steps)
            bc2 = _col(1 - b2 ** steps.clamp_min(1), steps)
            for k, gk in grads.items():
                if k in ("weight", "w1", "w2"):
                    gk = gk + _col(l2, gk) * p[k]
                m[k].mul_(b1).add_(gk, alpha=1 - b1)
                s[k].mul_(b2).addcmul_(gk, gk, value=1 - b2)
                upd = (m[k] / _col(bc1, gk)) / ((s[k] / _col(bc2, gk)).sqrt() + eps)
                p[k] -= lr * _col(active.float(), gk) * upd
        if Xv is None or len(Xv) == 0:
            best = p
            best_epoch[:] = epoch
            continue
        with torch.no_grad():
            val = loss_fn(stacked_logits(p, Xv), Tv, extra)
        improved = (val < best_val - 1e-6) & active
        for k in p:
            best[k] = torch.where(_col(improved, p[k]), p[k], best[k])
        best_val = torch.where(improved, val, best_val)
        best_epoch = torch.where(improved, epoch, best_epoch)
        bad = torch.where(improved, 0, bad + active.long())
        active &= bad < patience
        if progress:
            progress("train", epoch, epochs, training=int(active.sum()), finished=int(C - active.sum()),
                     best_val=f"{float(best_val[torch.isfinite(best_val)].mean()) if torch.isfinite(best_val).any() else float('nan'):.4f}")
        if not active.any():
            break
    return TrainResult({k: v.detach() for k, v in best.items()}, best_val, best_epoch, epoch, time.perf_counter() - t0)


# --- one-vs-rest -----------------------------------------------------------------------------------------

@dataclass
class HeadFit:
    """What training decided for one head, beside its weights."""
    seed: int
    positives: int
    negatives: int
    pos_weight: float
    l2: float
    val_loss: float
    best_epoch: int


def fit_ovr_heads(X: torch.Tensor, y: torch.Tensor, Xv: torch.Tensor | None, yv: torch.Tensor | None,
                  targets: list[int], names: list[str], *, head: str = "linear", hidden: int = 256, epochs: int = 100,
                  lr: float = 3e-3, batch_size: int = 128, patience: int = 10, l2_grid=(1e-3, 1e-2, 1e-1, 1.0),
                  pos_weight: bool = True, seed: int = 0, progress: Callable | None = None
                  ) -> tuple[list[Tensors], list[HeadFit]]:
    """Train one binary head per target label (positives: y == target) on normalised features.

    Grid values are extra columns of the same problem: N heads x G strengths train as N*G columns, and each head
    keeps the strength with the lowest validation loss.
    """
    check_head(head)
    dev = X.device
    N, G = len(targets), len(l2_grid)
    tgt = torch.as_tensor(targets, device=dev)
    T = (y.to(dev)[:, None] == tgt).float()
    pos = T.sum(0)
    neg = len(y) - pos
    pw = (neg / pos.clamp_min(1)) if pos_weight else torch.ones(N, device=dev)
    seeds = [head_seed(seed, nm) for nm in names]
    col_seeds = [s for s in seeds for _ in range(G)]
    D = X.shape[1]
    params = init_linear(col_seeds, D) if head == "linear" else init_mlp(col_seeds, D, hidden)
    Tc = T.repeat_interleave(G, dim=1)
    pwc = pw.repeat_interleave(G)
    has_val = Xv is not None and len(Xv) > 0
    grid = torch.tensor(l2_grid if has_val else [l2_grid[len(l2_grid) // 2]] * G, dtype=torch.float32)
    Tvc = (yv.to(dev)[:, None] == tgt).float().repeat_interleave(G, dim=1) if has_val else None
    grad_fn = bce_linear_grad if head == "linear" else autograd_grad(bce_columns)
    res = train_columns(params, grad_fn, bce_columns, X, Tc, Xv if has_val else None, Tvc, grid.repeat(N), pwc,
                        epochs, lr, batch_size, patience, seed, progress)
    val = res.best_val.view(N, G)
    choice = val.argmin(1) if has_val else torch.zeros(N, dtype=torch.long, device=dev)
    heads, fits = [], []
    for j in range(N):
        c = j * G + int(choice[j])
        heads.append({k: v[c].cpu().clone() for k, v in res.params.items()})
        fits.append(HeadFit(seeds[j], int(pos[j]), int(neg[j]), float(pw[j]), float(grid[int(choice[j])]),
                            float(val[j, choice[j]]) if has_val else float("nan"), int(res.best_epoch[c])))
    return heads, fits


def stack_heads(heads: list[Tensors], device: torch.device | str = "cpu") -> Tensors:
    return {k: torch.stack([h[k] for h in heads]).to(device) for k in heads[0]}


def encode_labels(classes: np.ndarray, y) -> torch.Tensor:
    """Labels (any hashable values) -> their index in classes_, as the estimators store them."""
    index = {c: i for i, c in enumerate(classes.tolist())}
    return torch.as_tensor([index[v] for v in np.asarray(y).tolist()], dtype=torch.long)


class OvRClassifier:
    """scikit-learn style estimator on embeddings: N independent sigmoid heads, argmax of confidence."""

    def __init__(self, head: str = "linear", hidden: int = 256, epochs: int = 100, lr: float = 3e-3,
                 batch_size: int = 128, patience: int = 10, l2_grid=(1e-3, 1e-2, 1e-1, 1.0), pos_weight: bool = True,
                 normalize: str = "standardize", seed: int = 0, device: str = "auto") -> None:
        self.head, self.hidden, self.epochs, self.lr = head, hidden, epochs, lr
        self.batch_size, self.patience, self.l2_grid, self.pos_weight = batch_size, patience, l2_grid, pos_weight
        self.normalize, self.seed, self.device = normalize, seed, device

    def _labels(self, y) -> torch.Tensor:
        return encode_labels(self.classes_, y)

    def fit(self, X, y, X_val=None, y_val=None, progress: Callable | None = None) -> "OvRClassifier":
        dev = resolve_device(self.device)
        X = torch.as_tensor(X, dtype=torch.float32).to(dev)
        self.classes_ = np.unique(np.asarray(y))
        self.normalizer_ = Normalizer.fit(self.normalize, X)
        Xv = torch.as_tensor(X_val, dtype=torch.float32).to(dev) if X_val is not None else None
        yv = self._labels(y_val) if y_val is not None else None
        t0 = time.perf_counter()
        self.heads_, self.fits_ = fit_ovr_heads(
            self.normalizer_(X), self._labels(y), self.normalizer_(Xv) if Xv is not None else None, yv,
            list(range(len(self.classes_))), [str(c) for c in self.classes_], head=self.head, hidden=self.hidden,
            epochs=self.epochs, lr=self.lr, batch_size=self.batch_size, patience=self.patience,
            l2_grid=self.l2_grid, pos_weight=self.pos_weight, seed=self.seed, progress=progress)
        self.fit_seconds_ = time.perf_counter() - t0
        return self

    def decision_function(self, X) -> np.ndarray:
        X = torch.as_tensor(X, dtype=torch.float32)
        p = stack_heads(self.heads_, X.device)
        with torch.no_grad():
            return stacked_logits(p, self.normalizer_(X)).cpu().numpy()

    def confidences(self, X) -> np.ndarray:
        """Each head's own sigmoid confidence (rows do not sum to 1)."""
        return 1 / (1 + np.exp(-self.decision_function(X)))

    def predict_proba(self, X) -> np.ndarray:
        """Confidences normalised per row, as scikit-learn's OneVsRestClassifier does."""
        c = self.confidences(X)
        return c / np.clip(c.sum(1, keepdims=True), 1e-12, None)

    def predict(self, X) -> np.ndarray:
        return self.classes_[self.decision_function(X).argmax(1)]
