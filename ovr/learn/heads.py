"""One-vs-rest heads: N independent binary classifiers on embeddings, trained together as stacked columns.

Independence is by construction: each column's loss is a mean over the batch and columns are summed, so a
column's gradient, its Adam state, its early stop and its L2 choice depend on that column alone. The batch
order comes from the global seed and initial weights from (seed, class name), never from the other classes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..config import HEADS, NORMALIZE
from ..runtime import head_seed
from .solver import Curvature, adam_columns, centered, logistic_lbfgs, weighted_bce
from .stats import moments

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
    def fit(cls, kind: str, *parts: torch.Tensor) -> "Normalizer":
        """The statistics of the rows of all `parts` together (train and validation: no concatenated copy)."""
        if kind not in NORMALIZE:
            raise ValueError(f"normalize must be standardize or l2, not {kind!r}")
        if kind == "l2":
            return cls("l2")
        parts = tuple(P for P in parts if len(P))
        return cls.from_moments(moments(*parts), sum(len(P) for P in parts), parts[0].dtype)

    @classmethod
    def from_moments(cls, sums: torch.Tensor, rows: float, dtype: torch.dtype) -> "Normalizer":
        """Standardisation from running sums (`stats.moments`: the rows' sum and sum of squares, float64): the
        statistics of rows that need not be read again."""
        mean = sums[0] / rows
        std = (sums[1] / rows - mean * mean).clamp_min_(0).sqrt_()
        std = std.clamp_min(max(1e-6, STD_FLOOR * float(std.mean())))
        return cls("standardize", mean.to(dtype), std.to(dtype))

    def finite(self, *parts: torch.Tensor) -> bool:
        """Whether the rows it was fitted on (`parts`) are all finite: a NaN or infinity anywhere makes the column
        statistics non-finite, so standardisation checks D numbers instead of n x D."""
        if self.mean is None:
            return all(bool(torch.isfinite(P).all()) for P in parts if len(P))
        return bool(torch.isfinite(self.mean).all() and torch.isfinite(self.std).all())

    def __call__(self, X: torch.Tensor) -> torch.Tensor:
        return self.rows(X)[0]

    def rows(self, *parts: torch.Tensor) -> list[torch.Tensor]:
        """Each part normalised, their rows one after another in one buffer: `joined` gives the rows of
        consecutive parts (train + validation for the refit) without a copy, and a pass over 100,000 rows does not
        allocate twice."""
        X = parts[0]
        out = torch.empty(sum(len(P) for P in parts), X.shape[1], dtype=X.dtype, device=X.device)
        if self.kind != "l2":  # (x - mean) / std as one multiply-add: one pass over the rows instead of two
            scale = 1 / self.std.to(X.device, torch.float64)
            shift = (-self.mean.to(X.device, torch.float64) * scale).to(X.dtype)
            scale = scale.to(X.dtype)
        views, s = [], 0
        for P in parts:
            v = out[s:s + len(P)]
            if self.kind == "l2":
                F.normalize(P.to(X.dtype), dim=1, out=v)
            else:
                torch.addcmul(shift, P.to(X.dtype), scale, out=v)
            views.append(v)
            s += len(P)
        return views

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
            out["weight"], out["bias"] = centered(w, head["bias"].to(torch.float64), (mean, std))
        else:  # mlp: w1 [D, H]
            out["w1"], out["b1"] = w / std[:, None], head["b1"] - (mean / std) @ w
        return {k: v.to(head[k].dtype) for k, v in out.items()}


def adjacent(A: torch.Tensor, B: torch.Tensor) -> bool:
    """Whether B's rows follow A's in one buffer."""
    return (A.device == B.device and A.dtype == B.dtype and A.is_contiguous() and B.is_contiguous()
            and A.ndim == B.ndim == 2 and A.shape[1] == B.shape[1]
            and A.untyped_storage().data_ptr() == B.untyped_storage().data_ptr()
            and B.data_ptr() == A.data_ptr() + A.numel() * A.element_size())


def one_block(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A and B as consecutive rows of one buffer: themselves when they already are, else one copy of both."""
    if adjacent(A, B):
        return A, B
    both = torch.cat([A, B.to(A.device, A.dtype)])
    return both[:len(A)], both[len(A):]


def joined(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """torch.cat([A, B]), without the copy when B's rows follow A's in one buffer (`one_block`, `Normalizer.rows`)."""
    B = B.to(A.device, A.dtype)
    if adjacent(A, B):
        return A.as_strided((len(A) + len(B), A.shape[1]), A.stride())
    return torch.cat([A, B])


def val_losses(Xv: torch.Tensor, Tv: torch.Tensor, pw: torch.Tensor, W: torch.Tensor, b: torch.Tensor,
               center=None) -> torch.Tensor:
    """The validation loss (mean pos-weighted BCE) of each linear head W [C, D], b [C] on the rows Xv, as float64
    [C]. The logits and the loss are computed in the rows' dtype (float32 embeddings): they only rank the strengths
    of the L2 search, which float32's seven digits resolve, and in float64 (logits, log and sigmoid) they were a
    large share of a 1,000-head search."""
    return weighted_bce(linear_logits(Xv, W, b, center, Xv.dtype), Tv, pw).to(torch.float64)


def check_head(head: str) -> None:
    if head not in HEADS:
        raise ValueError(f"head must be one of {', '.join(HEADS)}, not {head!r}")


def linear_logits(X: torch.Tensor, W: torch.Tensor, b: torch.Tensor, center=None,
                  dtype: torch.dtype | None = None) -> torch.Tensor:
    """The logits of linear heads W [C, D], b [C] on rows X, in `dtype` (default W's); center = (mean, std): the
    heads act on (X - mean) / std (folded into W and b in W's own precision, before any conversion)."""
    W, b = centered(W, b, center)
    W, b = (W, b) if dtype is None else (W.to(dtype), b.to(dtype))
    return X.to(W.device, W.dtype) @ W.T + b


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

def ce_columns(z: torch.Tensor, y: torch.Tensor, _unused=None) -> torch.Tensor:
    """Cross-entropy of each softmax column: z [B, C, K], y [B] -> [C]."""
    B, C, K = z.shape
    return F.cross_entropy(z.reshape(B * C, K), y.repeat_interleave(C), reduction="none").view(B, C).mean(0)


def autograd_grad(loss_fn: Callable) -> Callable:
    def grad(p: Tensors, X: torch.Tensor, t: torch.Tensor, extra) -> Tensors:
        q = {k: v.detach().requires_grad_(True) for k, v in p.items()}
        loss = loss_fn(stacked_logits(q, X), t, extra).sum()  # sum over columns keeps them independent
        gs = torch.autograd.grad(loss, list(q.values()))
        return dict(zip(q.keys(), gs))
    return grad


# --- one-vs-rest: N heads x G strengths as columns of one solve --------------------------------------------

DEFAULT_TOL = 1e-4  # max |gradient| of a head's per-sample-mean objective, as scikit-learn's lbfgs tol (same scale)


@dataclass
class HeadFit:
    """What training decided for one head, beside its weights (which act on normalised features)."""
    params: Tensors
    seed: int
    positives: int
    negatives: int
    pos_weight: float
    l2: float
    val_loss: float  # nan without validation data
    solver: str  # lbfgs (exact, linear heads) | adam (mlp heads)
    iterations: int  # L-BFGS iterations of the final solve, or Adam's best epoch
    grad_norm: float  # max |gradient| at the answer (nan for adam)
    val_logits: np.ndarray | None  # held-out logits on the validation rows (the head before its refit)
    l2_path: list = None  # [[strength, validation loss], ...] over the grid: the curve the choice was made on
    curve: list = None  # adam: [[epoch, train loss, validation loss], ...] of the chosen strength


def _pos_weights(T: torch.Tensor, on: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    pos = T.sum(0)
    neg = T.shape[0] - pos
    return pos, neg, (neg / pos.clamp_min(1)) if on else torch.ones_like(pos)


def fit_ovr_heads(X: torch.Tensor, T: torch.Tensor, Xv: torch.Tensor | None, Tv: torch.Tensor | None,
                  names: list[str], *, head: str, hidden: int, epochs: int, lr: float, batch_size: int,
                  patience: int, l2_grid: tuple[float, ...], pos_weight: bool, seed: int, tol: float = DEFAULT_TOL,
                  max_iter: int = 500, refit: bool = True, l2_search: str = "path", search_rows: int = 0,
                  center: tuple[torch.Tensor, torch.Tensor] | None = None, block: Callable[[int], int] | None = None,
                  progress: Callable | None = None) -> list[HeadFit]:
    """One binary head per column of T (targets in {0, 1}, [n, N]) on normalised features: the rows X, Xv, or
    with center = (mean, std) (linear heads) the rows (X - mean) / std, standardised inside the solver's products
    rather than in a copy of every row.

    Linear heads: the exact solver. Each head keeps the strength of `l2_grid` with the lowest validation loss
    (pos-weighted BCE), searched by `l2_search`: "path" (`l2_path`: strong to weak, warm-started, a head stops once
    its loss has not improved for two strengths) or "sweep" (every head x strength one column of a single L-BFGS
    solve; the path on at most `search_rows` training rows, `search_path`); then it is refit on train + validation
    at that strength (more data; the linear-probe protocol), warm-started. The validation logits of the head before
    its refit are kept, so calibration and thresholds are fitted on rows the head has not seen. MLP heads: minibatch Adam with per-column early stopping (no refit).
    Without validation data every head uses the middle strength of the grid.

    block(rows): how many columns one L-BFGS solve over that many rows takes at a time (`logistic_lbfgs`'s block;
    None: all). The path on a subset of the rows and the solves on all of them then each get their own size.
    """
    check_head(head)
    block = block or (lambda rows: 0)
    if center is not None and head != "linear":
        raise ValueError("center is for linear heads: standardise the rows of other heads first")
    dev = X.device
    N, G = T.shape[1], len(l2_grid)
    T = T.to(dev, torch.float32)
    pos, neg, pw = _pos_weights(T, pos_weight)
    seeds = [head_seed(seed, nm) for nm in names]
    has_val = Xv is not None and len(Xv) > 0
    grid = torch.tensor(l2_grid if has_val else [sorted(l2_grid)[G // 2]], dtype=torch.float64)
    G = len(grid)
    Tv = Tv.to(dev, torch.float32) if has_val else None
    if head == "linear" and has_val and l2_search == "path":
        W, b, val, choice, iters, gn, curv = search_path(X, T, Xv, Tv, pw, grid, rows=search_rows, seed=seed,
                                                   pos_weight=pos_weight, tol=tol, max_iter=max_iter,
                                                   center=center, block=block, progress=progress)
        val_logits = linear_logits(Xv, W, b, center).cpu().numpy()
        # the final solve, to tol itself: on train + validation (refit), or polishing the path's answer on train
        Xa, Ta = (joined(X, Xv), joined(T, Tv)) if refit else (X, T)
        pos, neg, pw = _pos_weights(Ta, pos_weight)
        sol = logistic_lbfgs(Xa, Ta, pw, grid[choice.cpu()], init=(W, b), curvature=curv, center=center, tol=tol,
                             max_iter=max_iter, block=block(len(Xa)), progress=progress,
                             stage="refit" if refit else "solve")
        W, b, iters, gn = sol.weight, sol.bias, sol.iterations, sol.grad_norm
        params = [{"weight": W[j].float().cpu(), "bias": b[j].float().cpu()} for j in range(N)]
        stats = [(int(iters[j]), float(gn[j])) for j in range(N)]
        solver = "lbfgs"
    elif head == "linear":
        sol = logistic_lbfgs(X, T.repeat_interleave(G, 1), pw.repeat_interleave(G), grid.repeat(N), center=center,
                             tol=tol, max_iter=max_iter, block=block(len(X)), progress=progress)
        W, b = sol.weight, sol.bias
        if has_val:
            # The lowest mean validation loss, per head (the one-standard-error rule, the strongest strength within
            # one SE of it, was tried and lost accuracy: it over-regularises small validation sets).
            val = val_losses(Xv, Tv.repeat_interleave(G, 1), pw.repeat_interleave(G), W, b, center).view(N, G)
            choice = val.argmin(1)
        else:
            val = torch.full((N, G), float("nan"), dtype=W.dtype, device=dev)
            choice = torch.zeros(N, dtype=torch.long, device=dev)
        cols = torch.arange(N, device=dev) * G + choice
        W, b, iters, gn = W[cols], b[cols], sol.iterations[cols], sol.grad_norm[cols]
        val_logits = linear_logits(Xv, W, b, center).cpu().numpy() if has_val else None
        if has_val and refit:
            Xa, Ta = joined(X, Xv), joined(T, Tv)
            pos, neg, pw = _pos_weights(Ta, pos_weight)
            sol = logistic_lbfgs(Xa, Ta, pw, grid[choice.cpu()], init=(W, b), center=center, tol=tol,
                                 max_iter=max_iter, block=block(len(Xa)), progress=progress, stage="refit")
            W, b, iters, gn = sol.weight, sol.bias, sol.iterations, sol.grad_norm
        params = [{"weight": W[j].float().cpu(), "bias": b[j].float().cpu()} for j in range(N)]
        stats = [(int(iters[j]), float(gn[j])) for j in range(N)]
        solver = "lbfgs"
    else:
        col_seeds = [s for s in seeds for _ in range(G)]
        p0 = init_mlp(col_seeds, X.shape[1], hidden)
        Tvc = Tv.repeat_interleave(G, 1) if has_val else None
        res = adam_columns(p0, autograd_grad(weighted_bce), weighted_bce, X, T.repeat_interleave(G, 1),
                           Xv if has_val else None, Tvc, l2=grid.float().repeat(N), extra=pw.repeat_interleave(G),
                           logits_fn=stacked_logits, epochs=epochs, lr=lr, batch_size=batch_size, patience=patience,
                           seed=seed, progress=progress)
        val = res.best_val.view(N, G) if has_val else torch.full((N, G), float("nan"))
        choice = val.nan_to_num(float("inf")).argmin(1)
        cols = torch.arange(N) * G + choice.cpu()
        params = [{k: v[int(c)].cpu().clone() for k, v in res.params.items()} for c in cols]
        val_logits = stacked_logits(stack_heads(params, dev), Xv).cpu().numpy() if has_val else None
        stats = [(int(res.best_epoch[int(c)]), float("nan")) for c in cols]
        solver = "adam"
        curves = [[[e + 1, float(tr[int(c)]), None if va is None else float(va[int(c)])]
                   for e, (tr, va) in enumerate(res.history or [])] for c in cols]
    paths = [[[float(grid[g]), float(val[j, g])] for g in range(G) if not math.isnan(float(val[j, g]))]
             if has_val else [] for j in range(N)]
    if solver == "lbfgs":
        curves = [[] for _ in range(N)]
    return [HeadFit(params[j], seeds[j], int(pos[j]), int(neg[j]), float(pw[j]), float(grid[int(choice[j])]),
                    float(val[j, choice[j]]), solver, stats[j][0], stats[j][1],
                    val_logits[:, j] if val_logits is not None else None, paths[j], curves[j]) for j in range(N)]


SEARCH_MIN_POSITIVES = 10  # a head with fewer positives among the search rows searches on all of them


def search_path(X: torch.Tensor, T: torch.Tensor, Xv: torch.Tensor, Tv: torch.Tensor, pw: torch.Tensor,
                grid: torch.Tensor, *, rows: int, seed: int, pos_weight: bool, tol: float, max_iter: int,
                center=None, block: Callable[[int], int] = lambda rows: 0, progress: Callable | None = None):
    """`l2_path` on at most `rows` training rows, as l2_path returns it. With more rows than that (and rows > 0),
    the path runs on a seeded random subset of them (the same rows for every head: it depends on the seed and the
    row count only, so a head's answer does not depend on the heads beside it; a head with fewer than
    SEARCH_MIN_POSITIVES positives among them searches on all rows). The strength a head chose on m of n rows is
    then moved to the grid value nearest to it x m / n (the same total penalty l2 * rows: the per-row strength that
    minimises the validation loss falls as the rows grow), and the head is solved at it on all training rows,
    warm-started; its validation loss there replaces the subset's at that strength, and its validation logits are
    the ones calibration sees. The path over all rows solves several strengths on every row; this solves them on
    `rows` rows and one strength on all."""
    n = len(X)
    if not rows or n <= rows or len(grid) == 1:  # one strength: nothing to choose, nothing to save
        return l2_path(X, T, Xv, Tv, pw, grid, tol=tol * SEARCH_TOL, max_iter=max_iter, center=center,
                       block=block(n), progress=progress)
    dev = X.device
    sub = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:rows].to(dev)
    Ts = T[sub]
    on_all = Ts.sum(0) < torch.clamp(T.sum(0), max=SEARCH_MIN_POSITIVES)
    parts = []
    for heads, Xh, Th in ((~on_all, X[sub], Ts), (on_all, X, T)):
        idx = torch.nonzero(heads).flatten()
        if len(idx):
            pwh = _pos_weights(Th[:, idx], pos_weight)[2]
            parts.append((idx, l2_path(Xh, Th[:, idx], Xv, Tv[:, idx], pwh, grid, tol=tol * SEARCH_TOL,
                                       max_iter=max_iter, center=center, block=block(len(Xh)),
                                       progress=progress)))
    N, D = T.shape[1], X.shape[1]
    W = torch.zeros(N, D, dtype=torch.float64, device=dev)
    b = torch.zeros(N, dtype=torch.float64, device=dev)
    val = torch.full((N, len(grid)), float("nan"), dtype=torch.float64, device=dev)
    choice = torch.zeros(N, dtype=torch.long, device=dev)
    iters = torch.zeros(N, dtype=torch.long, device=dev)
    gn = torch.zeros(N, dtype=torch.float64, device=dev)
    curv = None
    for idx, out in parts:
        W[idx], b[idx], val[idx], choice[idx], iters[idx], gn[idx] = out[:6]
        curv = Curvature.put_into(curv, N, idx, out[6])
    moved = torch.nonzero(~on_all).flatten()
    if len(moved):
        logs = torch.log(grid.clamp_min(1e-300)).to(dev)
        target = logs[choice[moved]] + math.log(rows / n)
        was = grid[choice[moved].cpu()]
        choice[moved] = (logs[None, :] - target[:, None]).abs().argmin(1)
        start = curv.keep(moved).reweighted(grid[choice[moved].cpu()] - was, D)
        sol = logistic_lbfgs(X, T[:, moved], pw[moved], grid[choice[moved].cpu()], init=(W[moved], b[moved]),
                             curvature=start, center=center, tol=tol * SEARCH_TOL, max_iter=max_iter,
                             block=block(n), progress=progress, stage="all rows")
        W[moved], b[moved], iters[moved], gn[moved] = sol.weight, sol.bias, sol.iterations, sol.grad_norm
        curv.put(moved, sol.curvature)
        val[moved, choice[moved]] = val_losses(Xv, Tv[:, moved], pw[moved], sol.weight, sol.bias, center)
    return W, b, val, choice, iters, gn, curv


PATH_PATIENCE = 2  # strengths in a row without a better validation loss before a head's path stops
SEARCH_TOL = 10  # the path ranks strengths solved to tol * SEARCH_TOL; the chosen one is refit to tol itself


def l2_path(X: torch.Tensor, T: torch.Tensor, Xv: torch.Tensor, Tv: torch.Tensor, pw: torch.Tensor,
            grid: torch.Tensor, *, tol: float, max_iter: int, patience: int = PATH_PATIENCE, center=None,
            block: int = 0, progress: Callable | None = None):
    """The L2 strength of each linear head by a regularisation path: strengths from strong to weak, each solved
    to `tol` warm-started from the previous one's answer (a strongly regularised column converges in a few
    iterations, and each next one starts near its answer), its validation loss recorded; a head's path stops
    after `patience` strengths in a row without a lower validation loss, so the weak strengths (the expensive,
    slowly converging ones) are solved only for heads whose loss still falls there. Every decision is per head:
    a head's path, and so its answer, does not depend on the heads beside it.

    block > 0: at most that many heads at a time go through the whole path (the same answers): a block's state
    between strengths (its logits on every row, its curvature pairs) stays its own contiguous arrays, where heads
    leaving the path cost a gather within the block, not from every head's.

    -> (weight [N, D], bias [N]: each head at its chosen strength; val [N, G] validation losses (nan: not
    solved); choice [N] index into grid; iterations [N], grad_norm [N] of the chosen solve; its Curvature)."""
    N, D, G = T.shape[1], X.shape[1], len(grid)
    if 0 < block < N:
        starts = range(0, N, block)
        parts = []
        for i, s in enumerate(starts):
            c = slice(s, s + block)
            tell = progress and (lambda st, done, total, i=i, **kw: progress(st, i * total + done,
                                                                              len(starts) * total, **kw))
            parts.append(l2_path(X, T[:, c], Xv, Tv[:, c], pw[c], grid, tol=tol, max_iter=max_iter,
                                 patience=patience, center=center, progress=tell))
        pairs = [p[6] for p in parts]
        return (*(torch.cat([p[k] for p in parts]) for k in range(6)),
                Curvature(torch.cat([q.S for q in pairs], 1), torch.cat([q.Y for q in pairs], 1)))
    dev = X.device
    order = sorted(range(G), key=lambda g: -float(grid[g]))
    val = torch.full((N, G), float("nan"), dtype=torch.float64, device=dev)
    best = torch.full((N,), float("inf"), dtype=torch.float64, device=dev)
    choice = torch.zeros(N, dtype=torch.long, device=dev)
    rises = torch.zeros(N, dtype=torch.long, device=dev)
    W = torch.zeros(N, D, dtype=torch.float64, device=dev)
    b = torch.zeros(N, dtype=torch.float64, device=dev)
    bestW, bestb = W.clone(), b.clone()
    iters = torch.zeros(N, dtype=torch.long, device=dev)
    gn = torch.zeros(N, dtype=torch.float64, device=dev)
    active = torch.arange(N, device=dev)
    curv = best_curv = last = state = None  # active heads were all solved at the last strength: their pairs belong to it
    for k, g in enumerate(order):
        if progress:
            progress("l2 path", k, G, heads=len(active))
        # each head starts from its answer at the previous strength, where it ended (its logits, the data term's
        # value and gradient: no pass over the rows to begin), and from the curvature pairs it ended with, moved to
        # the new strength exactly: the first step is then a quasi-Newton step along the path
        pairs = None if curv is None else curv.keep(active).reweighted((grid[g] - last).repeat(len(active)), D)
        sol = logistic_lbfgs(X, T[:, active], pw[active], grid[g].repeat(len(active)),
                             init=(W[active], b[active]), curvature=pairs, start=state, keep_state=True,
                             center=center, tol=tol, max_iter=max_iter)
        W[active], b[active] = sol.weight, sol.bias
        curv = Curvature.put_into(curv, N, active, sol.curvature)
        last = grid[g]
        v = val_losses(Xv, Tv[:, active], pw[active], sol.weight, sol.bias, center)
        val[active, g] = v
        better = v < best[active]
        idx = active[better]
        best[idx], choice[idx] = v[better], g
        bestW[idx], bestb[idx] = sol.weight[better], sol.bias[better]
        # the chosen solve's pairs: the refit starts from them
        best_curv = Curvature.put_into(best_curv, N, idx, sol.curvature.keep(better))
        iters[idx], gn[idx] = sol.iterations[better], sol.grad_norm[better]
        rises[active] = torch.where(better, 0, rises[active] + 1)
        going = rises[active] < patience
        active, state = active[going], sol.state.keep(going)
        if not len(active):
            break
    if progress:
        progress("l2 path", G, G, heads=0)
    return bestW, bestb, val, choice, iters, gn, best_curv


def stack_heads(heads: list[Tensors], device: torch.device | str = "cpu") -> Tensors:
    return {k: torch.stack([h[k] for h in heads]).to(device) for k in heads[0]}


