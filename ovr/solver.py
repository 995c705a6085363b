"""Column-wise optimisers. Each column of a stacked problem is its own problem: every scalar the methods keep (step
sizes, curvature pairs, line-search state, convergence flags) is a vector over columns, never a reduction across
them, so a column's answer does not depend on which other columns were solved beside it. No OvR knowledge here.

- `logistic_lbfgs`: the exact solver of linear heads. L2-regularised, sample-weighted logistic regression per
  column, solved to a gradient tolerance by a per-column L-BFGS. All columns share two GEMMs per iteration
  (logits of the search directions X @ P, and the gradient X^T R); the line search needs no matmul at all, since
  the logits move linearly along the step (z + a * X p): a few 1-D Newton steps per column find the exact step.
- `softmax_lbfgs`: one multinomial logistic regression (a grown model's gate), by the same L-BFGS and line search.
- `adam_columns`: minibatch Adam with per-column early stopping, for MLP heads and the softmax baseline's MLP.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

Tensors = dict[str, torch.Tensor]


# --- exact: per-column L-BFGS for weighted logistic regression ---------------------------------------------

@dataclass
class LogisticSolution:
    weight: torch.Tensor  # [C, D]
    bias: torch.Tensor  # [C]
    iterations: torch.Tensor  # [C] long
    grad_norm: torch.Tensor  # [C] max-abs gradient at the answer
    loss: torch.Tensor  # [C] objective at the answer
    seconds: float


# The step along each direction need not be exact for L-BFGS, only close: a relative tolerance of 1e-3 halves the
# line search's passes with the same iterations. Up to 20 steps: a column whose first guess is far off (saturated
# logits of a weakly regularised head) needs a few bisections/doublings; with 4 it could not move at all.
LINE_SEARCH_STEPS = 20
LINE_SEARCH_RTOL = 1e-3


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vecdot(a, b)  # fused: no [C, D] temporary, unlike (a * b).sum(-1)


def logistic_lbfgs(X: torch.Tensor, T: torch.Tensor, pos_weight: torch.Tensor, l2: torch.Tensor, *,
                   init: tuple[torch.Tensor, torch.Tensor] | None = None, tol: float = 1e-4, max_iter: int = 500,
                   memory: int = 10, dtype: torch.dtype = torch.float64, matmul_dtype: torch.dtype = torch.float32,
                   progress: Callable | None = None, stage: str = "solve") -> LogisticSolution:
    """Minimise, for every column c independently,

        f_c(w, b) = mean_i s_ic * BCE(x_i . w + b, t_ic) + l2_c / 2 * |w|^2,   s_ic = pos_weight_c if t_ic else 1

    (exactly `BCEWithLogitsLoss(pos_weight=...)` with mean reduction, plus L2 on the weights, not the bias), until
    max |grad f_c| <= tol. This is scikit-learn's `LogisticRegression(C=1 / (l2 * n))` with the pos-weights as
    sample_weight, and tol has the same meaning as its tol (1e-4 is its default). X [n, D], T [n, C] in {0, 1},
    pos_weight [C], l2 [C]. Columns that converge leave the working set, so the work shrinks as the solve goes on.

    Precision: the iterate, gradients, curvature pairs and per-column scalars are float64 (`dtype`): in float32 the
    gradient of weakly regularised heads stalls from rounding. The [n, C] arrays (logits, their change along the
    step, weights, residuals) and the two GEMMs per iteration are `matmul_dtype`, float32 by default: they are the
    whole cost (on 20,000 x 512 x 110 columns the elementwise passes over [n, C] were 70% of the time in float64),
    and their rounding (~1e-7 relative) is far below the default tol. matmul_dtype=torch.float64 solves to 1e-10
    (the scikit-learn equivalence tests use it).
    """
    t0 = time.perf_counter()
    dev = X.device
    wd = matmul_dtype
    Xm = X.to(wd)
    n, D = X.shape
    C = T.shape[1]
    Tw = T.to(dev, wd)
    Sw = torch.where(Tw > 0, pos_weight.to(dev, wd), torch.ones((), dtype=wd, device=dev)) / n  # mean folded in
    STw = Sw * Tw
    lw = l2.to(dev, dtype)
    theta = torch.zeros(C, D + 1, dtype=dtype, device=dev)
    if init is not None:
        theta[:, :D], theta[:, D] = init[0].to(dev, dtype), init[1].to(dev, dtype)
    out_theta = theta.clone()
    out_iter = torch.zeros(C, dtype=torch.long, device=dev)
    out_g = torch.zeros(C, dtype=dtype, device=dev)
    out_f = torch.zeros(C, dtype=dtype, device=dev)
    cols = torch.arange(C, device=dev)  # the working set: original column of each working column

    def objective(th: torch.Tensor, z: torch.Tensor):
        """f and its gradient at logits z: f = sum S softplus(z) - sum S T z + l2/2 |w|^2 (reductions in float64)."""
        w = th[:, :D]
        # products in the work dtype, sums in float64: a float32 sum cannot resolve the last decreases of f
        f = ((Sw * F.softplus(z)).sum(0, dtype=dtype) - (STw * z).sum(0, dtype=dtype) + 0.5 * lw * _dot(w, w))
        r = torch.addcmul(-STw, Sw, torch.sigmoid(z))  # S * (sigmoid(z) - t)
        g = torch.cat([(r.T @ Xm).to(dtype) + lw[:, None] * w, r.sum(0, dtype=dtype)[:, None]], 1)
        return f, g

    def logits(th: torch.Tensor) -> torch.Tensor:
        return torch.addmm(th[:, D].to(wd), Xm, th[:, :D].T.to(wd))

    z = logits(theta)
    f, g = objective(theta, z)
    m = memory
    Sh = torch.zeros(m, C, D + 1, dtype=dtype, device=dev)  # s_k = step, y_k = gradient change, per column
    Yh = torch.zeros_like(Sh)
    rho = torch.zeros(m, C, dtype=dtype, device=dev)  # 0 marks an empty or skipped pair (contributes nothing)
    gamma = torch.ones(C, dtype=dtype, device=dev)
    it = torch.zeros(C, dtype=torch.long, device=dev)
    # Also stop a column that is already near tol and whose objective has not moved for 3 iterations in a row
    # (scipy's ftol test, made robust to one slow step): float32 work cannot push every gradient below ~1e-5, and
    # without this such a column would run to max_iter.
    ftol = 4 * torch.finfo(wd).eps
    flat = torch.zeros(C, dtype=torch.long, device=dev)
    k = 0
    for step in range(max_iter + 1):
        gnorm = g.abs().amax(1)
        done = (gnorm <= tol) | (it >= max_iter) | ((flat >= 3) & (gnorm <= 10 * tol))
        if done.any():  # write finished columns out; shrink the working set when a quarter has finished
            idx = cols[done]
            out_theta[idx], out_iter[idx], out_g[idx], out_f[idx] = theta[done], it[done], gnorm[done], f[done]
            if done.all():
                break
            if done.sum() * 4 >= len(cols) or step == max_iter:
                keep = ~done
                cols, theta, z, f, g, it, gamma = cols[keep], theta[keep], z[:, keep], f[keep], g[keep], it[keep], gamma[keep]
                flat = flat[keep]
                Tw, Sw, STw, lw = Tw[:, keep], Sw[:, keep], STw[:, keep], lw[keep]
                Sh, Yh, rho = Sh[:, keep], Yh[:, keep], rho[:, keep]
                done = done[keep]
        active = ~done
        if progress:  # the bar counts converged columns: it ends where the solve ends
            progress(stage, int(C - active.sum()), C, iteration=step)
        # two-loop recursion, newest pair first; empty pairs have rho = 0
        q = g.clone()
        alpha = []
        for j in range(m):
            i = (k - 1 - j) % m
            a = rho[i] * _dot(Sh[i], q)
            q -= a[:, None] * Yh[i]
            alpha.append((i, a))
        r = gamma[:, None] * q
        for i, a in reversed(alpha):
            b = rho[i] * _dot(Yh[i], r)
            r += (a - b)[:, None] * Sh[i]
        p = -r
        gp = _dot(g, p)
        bad = gp >= 0  # not a descent direction (rounding): restart that column from steepest descent
        if bad.any():
            p[bad] = -g[bad]
            gp = torch.where(bad, _dot(g, p), gp)
            rho[:, bad] = 0
            gamma[bad] = 1
        p = p * active[:, None]
        # exact line search on the convex 1-D function phi(a) = f(theta + a p): logits are z + a * zp, so each
        # Newton step is elementwise work and two column sums, no matmul
        zp = logits(p)
        w, pw_ = theta[:, :D], p[:, :D]
        wp, pp = _dot(w, pw_), _dot(pw_, pw_)
        szp = Sw * zp
        szp2 = szp * zp
        tszp = torch.linalg.vecdot(STw, zp, dim=0).to(dtype)
        a = torch.ones_like(f)
        lo, hi = torch.zeros_like(f), torch.full_like(f, float("inf"))
        for _ in range(LINE_SEARCH_STEPS):
            s = torch.sigmoid(torch.addcmul(z, a.to(wd), zp))
            d1 = torch.linalg.vecdot(s, szp, dim=0).to(dtype) - tszp + lw * (wp + a * pp)
            d2 = torch.linalg.vecdot(s - s * s, szp2, dim=0).to(dtype) + lw * pp
            lo = torch.where(d1 < 0, a, lo)
            hi = torch.where(d1 >= 0, a, hi)
            nxt = torch.where(d2 > 0, a - d1 / d2.clamp_min(1e-300), a)
            inside = (nxt >= lo) & (nxt <= hi)  # inclusive: a converged step (nxt == a) stays put
            fallback = torch.where(torch.isfinite(hi), (lo + hi) / 2, 2 * a)
            nxt = torch.where(inside, nxt, fallback)
            # per column; stop when every column's step is settled to LINE_SEARCH_RTOL
            settled = bool(((nxt - a).abs() <= LINE_SEARCH_RTOL * a.abs().clamp_min(1)).all())
            a = nxt
            if settled:
                break
        a = torch.where(active, a, torch.zeros_like(a))
        new_theta = theta + a[:, None] * p
        new_z = torch.addcmul(z, a.to(wd), zp)
        new_f, new_g = objective(new_theta, new_z)
        # The step minimises a convex function along p, so f cannot rise beyond rounding; where it does (a bracket
        # that failed to close), keep the old point and restart that column's memory.
        worse = active & (new_f > f + 1e-6 * f.abs() + 1e-12)
        if worse.any():  # retry those columns at lo, the longest step known to descend (phi'(lo) < 0)
            a = torch.where(worse, lo, a)
            new_theta = theta + a[:, None] * p
            new_z = torch.addcmul(z, a.to(wd), zp)
            new_f, new_g = objective(new_theta, new_z)
            worse = active & (new_f > f + 1e-6 * f.abs() + 1e-12)
        if worse.any():
            new_theta, new_f = torch.where(worse[:, None], theta, new_theta), torch.where(worse, f, new_f)
            new_g, new_z = torch.where(worse[:, None], g, new_g), torch.where(worse, z, new_z)
            rho[:, worse], gamma[worse] = 0, 1
        sk, yk = new_theta - theta, new_g - g
        sy = _dot(sk, yk)
        ok = active & ~worse & (sy > 1e-10 * _dot(yk, yk).clamp_min(1e-300))  # curvature condition, per column
        Sh[k % m], Yh[k % m] = sk, yk
        rho[k % m] = torch.where(ok, 1 / sy.clamp_min(1e-300), torch.zeros_like(sy))
        gamma = torch.where(ok, sy / _dot(yk, yk).clamp_min(1e-300), gamma)
        k += 1
        still = active & ((f - new_f) <= ftol * torch.maximum(f.abs(), new_f.abs()))
        flat = torch.where(still, flat + 1, torch.zeros_like(flat))
        theta, f, g, z = new_theta, new_f, new_g, new_z
        it = it + active.long()
    if progress:
        progress(stage, C, C, iteration=int(out_iter.max()) if C else 0)
    return LogisticSolution(out_theta[:, :D], out_theta[:, D], out_iter, out_g, out_f, time.perf_counter() - t0)


def softmax_lbfgs(X: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, K: int, l2: float, *,
                  init: torch.Tensor | None = None, tol: float = 1e-5, max_iter: int = 1000, memory: int = 10,
                  dtype: torch.dtype = torch.float64, matmul_dtype: torch.dtype = torch.float32
                  ) -> tuple[torch.Tensor, int, float]:
    """Minimise f(theta) = sum_i weights_i * CE(x_i W^T + b, y_i) + l2 / 2 * (|W|^2 + |b|^2), theta = [W | b]
    [K, D + 1]: one multinomial logistic regression (the grown model's gate). The bias is penalised too, so a class
    without rows keeps a finite bias and the problem stays strictly convex: one optimum, whatever `init`. L-BFGS with
    logistic_lbfgs's exact line search (the logits move linearly along a step: 1-D Newton steps are elementwise work,
    two GEMMs per iteration) and its precision split (iterate and sums in `dtype`, [n, K] work in `matmul_dtype`).
    Returns (theta, iterations, max |gradient|). Not torch.optim.LBFGS: constructing any torch.optim optimizer
    imports torch._dynamo, which takes longer than the whole fit."""
    dev, wd = X.device, matmul_dtype
    Xm = X.to(wd)
    n, D = X.shape
    Y = F.one_hot(y.to(dev), K).to(wd)
    w = weights.to(dev, wd)
    theta = torch.zeros(K, D + 1, dtype=dtype, device=dev) if init is None else init.to(dev, dtype).clone()

    def logits(th: torch.Tensor) -> torch.Tensor:
        return torch.addmm(th[:, D].to(wd), Xm, th[:, :D].T.to(wd))

    def objective(th: torch.Tensor, z: torch.Tensor) -> tuple[float, torch.Tensor]:
        f = (w * (torch.logsumexp(z, 1) - (z * Y).sum(1))).sum(dtype=dtype) + 0.5 * l2 * _dot(th.flatten(), th.flatten())
        r = (torch.softmax(z, 1) - Y) * w[:, None]
        return float(f), torch.cat([(r.T @ Xm).to(dtype), r.sum(0, dtype=dtype)[:, None]], 1) + l2 * th

    z = logits(theta)
    f, g = objective(theta, z)
    pairs: list[tuple[torch.Tensor, torch.Tensor, float]] = []  # (s, y, 1 / s.y), oldest first
    ftol, flat, it = 4 * torch.finfo(wd).eps, 0, 0
    wy = w[:, None] * Y
    for it in range(max_iter):
        gnorm = float(g.abs().max())
        if gnorm <= tol or (flat >= 3 and gnorm <= 10 * tol):  # the float32 floor, as in logistic_lbfgs
            break
        q, alphas = g.clone(), []
        for s_, y_, rho in reversed(pairs):
            a = rho * float(_dot(s_.flatten(), q.flatten()))
            q -= a * y_
            alphas.append(a)
        if pairs:
            s_, y_, _ = pairs[-1]
            q *= float(_dot(s_.flatten(), y_.flatten()) / _dot(y_.flatten(), y_.flatten()))
        for (s_, y_, rho), a in zip(pairs, reversed(alphas)):
            q += (a - rho * float(_dot(y_.flatten(), q.flatten()))) * s_
        p = -q
        if float(_dot(g.flatten(), p.flatten())) >= 0:  # not a descent direction (rounding): steepest descent
            p, pairs = -g, []
        zp = logits(p)
        tp, pp = float(_dot(theta.flatten(), p.flatten())), float(_dot(p.flatten(), p.flatten()))
        wzpy = float((wy * zp).sum(dtype=dtype))
        wzp2 = w[:, None] * zp * zp
        a, lo, hi = 1.0, 0.0, float("inf")
        for _ in range(LINE_SEARCH_STEPS):  # phi(a) = f(theta + a p) is convex: Newton in a, kept in [lo, hi]
            P = torch.softmax(torch.add(z, zp, alpha=a), 1)
            pz = (P * zp).sum(1)
            d1 = float((w * pz).sum(dtype=dtype)) - wzpy + l2 * (tp + a * pp)
            d2 = float((P * wzp2).sum(dtype=dtype) - (pz * pz * w).sum(dtype=dtype)) + l2 * pp
            lo, hi = (a, hi) if d1 < 0 else (lo, a)
            nxt = a - d1 / d2 if d2 > 0 else a
            if not lo <= nxt <= hi:
                nxt = (lo + hi) / 2 if hi < float("inf") else 2 * a
            settled = abs(nxt - a) <= LINE_SEARCH_RTOL * max(abs(a), 1.0)
            a = nxt
            if settled:
                break
        for step in (a, lo):  # lo: the longest step known to descend, if the bracket failed to close
            new_theta = theta + step * p
            new_z = torch.add(z, zp, alpha=step)
            new_f, new_g = objective(new_theta, new_z)
            if new_f <= f + 1e-6 * abs(f) + 1e-12:
                break
        else:  # no progress along p: forget the curvature pairs and try steepest descent next
            pairs = []
            continue
        s_, y_ = new_theta - theta, new_g - g
        sy = float(_dot(s_.flatten(), y_.flatten()))
        if sy > 1e-10 * float(_dot(y_.flatten(), y_.flatten())):
            pairs = (pairs + [(s_, y_, 1.0 / sy)])[-memory:]
        flat = flat + 1 if f - new_f <= ftol * max(abs(f), abs(new_f)) else 0
        theta, f, g, z = new_theta, new_f, new_g, new_z
    return theta, it, float(g.abs().max())


def weighted_bce(z: torch.Tensor, T: torch.Tensor, pos_weight: torch.Tensor) -> torch.Tensor:
    """Mean pos-weighted BCE of each column [n, C] -> [C] (the data term of the objective above)."""
    return F.binary_cross_entropy_with_logits(z, T.to(z.dtype), pos_weight=pos_weight.to(z.dtype),
                                              reduction="none").mean(0)


# --- minibatch Adam: per-column L2, per-column early stopping, best weights kept ----------------------------

@dataclass
class AdamResult:
    params: Tensors  # best weights per column
    best_val: torch.Tensor  # [C]
    best_epoch: torch.Tensor  # [C]
    epochs_run: int
    seconds: float
    history: list = None  # per epoch: (train loss [C] on up to 1,024 fixed rows, val loss [C] or None)


def _col(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))


def adam_columns(params: Tensors, grad_fn: Callable, loss_fn: Callable, X: torch.Tensor, T: torch.Tensor,
                 Xv: torch.Tensor | None, Tv: torch.Tensor | None, *, l2: torch.Tensor, extra: torch.Tensor | None,
                 logits_fn: Callable, epochs: int, lr: float, batch_size: int, patience: int, seed: int,
                 progress: Callable | None = None) -> AdamResult:
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
    probe = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:1024].to(dev)  # the curve's rows
    history: list = []
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
        with torch.no_grad():
            train_loss = loss_fn(logits_fn(p, X[probe]), T[probe], extra).cpu()
        if Xv is None or len(Xv) == 0:
            best = p
            best_epoch[:] = epoch
            history.append((train_loss, None))
            continue
        with torch.no_grad():
            val = loss_fn(logits_fn(p, Xv), Tv, extra)
        history.append((train_loss, val.cpu()))
        improved = (val < best_val - 1e-6) & active
        for k in p:
            best[k] = torch.where(_col(improved, p[k]), p[k], best[k])
        best_val = torch.where(improved, val, best_val)
        best_epoch = torch.where(improved, epoch, best_epoch)
        bad = torch.where(improved, 0, bad + active.long())
        active &= bad < patience
        if progress:
            progress("train", epoch, epochs, training=int(active.sum()), finished=int(C - active.sum()))
        if not active.any():
            break
    if progress:  # early stopping ends the work before `epochs`: the bar ends with it
        progress("train", epoch, epoch, training=0, finished=C)
    return AdamResult({k: v.detach() for k, v in best.items()}, best_val, best_epoch, epoch, time.perf_counter() - t0,
                      history)
