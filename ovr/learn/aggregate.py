"""What the answer is built from: per-head calibration and thresholds (fitted on validation logits), and the gate of
a grown model. The answer itself is `answer.answer`."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..config import CALIBRATION
from .heads import Normalizer, joined
from .solver import softmax_lbfgs, softplus

UNKNOWN = -1


CALIBRATION_HEADS = 256  # heads calibrated at once


def fit_calibration(logits: np.ndarray, targets: np.ndarray, kind: str = "platt", iters: int = 50
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Per-head (a, b) with p = sigmoid(a*z + b), fitted by Newton's method on that head's validation BCE, kept
    only where it helps on rows it was not fitted on: cross-fitted over two stratified halves of the validation
    rows, a head whose calibrated held-out loss is not below its raw one keeps the identity (1, 0). With a few
    validation positives Platt's smoothed targets cap a positive's confidence near (n+1)/(n+2), and the
    calibration made every confidence worse (ECE 0.0006 raw vs 0.23 calibrated with 3-4 positives per class).

    A head with fewer than two validation positives (or negatives) keeps the identity too: one half would hold
    none, so the check could not test the calibration on a positive (with none at all, the fit only squashes every
    confidence towards one smoothed target).

    'temperature' fits a only (b = 0); 'none' returns the identity. Each head uses its own column only, so
    calibration keeps heads independent.
    """
    if kind not in CALIBRATION:
        raise ValueError(f"calibration must be platt, temperature or none, not {kind!r}")
    N = logits.shape[1]
    if kind == "none" or len(logits) == 0:
        return np.ones(N), np.zeros(N)
    if N > CALIBRATION_HEADS:  # heads are independent: a block at a time bounds the [heads, rows] work arrays
        parts = [fit_calibration(logits[:, s:s + CALIBRATION_HEADS], targets[:, s:s + CALIBRATION_HEADS], kind, iters)
                 for s in range(0, N, CALIBRATION_HEADS)]
        return np.concatenate([a for a, _ in parts]), np.concatenate([b for _, b in parts])
    # heads as rows [N, n]: a head's validation logits are contiguous, so its sums and the working set's rows are
    # cheap to reach (a column of a row-major [n, N] array is strided, and gathering columns is a copy of it)
    z = torch.as_tensor(logits, dtype=torch.float64).T.contiguous()
    t = torch.as_tensor(targets, dtype=torch.float64).T.contiguous()
    # cross-fit: per head, positives and negatives dealt alternately into two halves; each half's entries
    # gathered to the front of its rows (the halves' sizes differ by at most two per head: the rest is padding of
    # weight 0), so a half's fit reads half the entries
    pos = t > 0.5
    rank = torch.where(pos, pos.cumsum(1), (~pos).cumsum(1))
    held_cal = torch.zeros(N, dtype=torch.float64)
    fits = []
    for half in (rank % 2 == 0, rank % 2 == 1):
        size = half.sum(1)
        idx = torch.argsort((~half).to(torch.int8), dim=1, stable=True)[:, :int(size.max())]
        inside = (torch.arange(idx.shape[1])[None, :] < size[:, None]).double()
        fa, fb = _fit_ab(z.gather(1, idx), t.gather(1, idx), inside, kind, iters)
        held_cal += torch.linalg.vecdot(_bce(torch.addcmul(fb[:, None], fa[:, None], z), t), (~half).double())
        fits.append((fa, fb))
    helps = (held_cal < _bce(z, t).sum(1)) & (pos.sum(1) >= 2) & ((~pos).sum(1) >= 2)
    a, b = torch.ones(N, dtype=torch.float64), torch.zeros(N, dtype=torch.float64)
    # the heads it helps, on all their entries, from the halves' mean (the loss is strictly convex: the start
    # changes only the iterations)
    h = torch.nonzero(helps).flatten()
    if len(h):
        a[h], b[h] = _fit_ab(z[h], t[h], None, kind, iters,
                             start=((fits[0][0][h] + fits[1][0][h]) / 2, (fits[0][1][h] + fits[1][1][h]) / 2))
    return a.numpy(), b.numpy()


def _bce(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return softplus(z) - t * z  # torch's binary_cross_entropy_with_logits is several times slower in float64


def _fit_ab(z: torch.Tensor, t: torch.Tensor, m: torch.Tensor | None, kind: str, iters: int,
            start: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) per head (a row of z, t [N, n]) on the entries where m == 1 (m None: all), by Newton on the mean BCE
    against Platt's smoothed targets. Each head stops on its own (its step below 1e-9, or no step that lowers its
    loss) and leaves the working set, so a head's answer does not depend on the others, and many heads cost what
    their slowest few do, not that times their number. `start`: (a, b) to start from (default (1, 0))."""
    N, n = z.shape
    cnt = (m.sum(1) if m is not None else torch.full((N,), float(n), dtype=z.dtype)).clamp_min(1)
    # Platt's smoothed targets: without them separable validation data drives a to infinity.
    npos = t.sum(1) if m is None else torch.linalg.vecdot(t, m)
    nneg = (n if m is None else m.sum(1)) - npos
    ts = torch.where(t > 0.5, ((npos + 1) / (npos + 2))[:, None], (1 / (nneg + 2))[:, None])
    a, b = torch.ones(N, dtype=torch.float64), torch.zeros(N, dtype=torch.float64)
    if start is not None:
        a, b = start[0].clone(), start[1].clone()
    ridge = 1e-6
    # a head without positives (or negatives) among these entries has nothing to calibrate against: the optimum
    # squashes every confidence towards one smoothed target, a -> 0. It keeps the identity.
    act = torch.nonzero((npos > 0) & (nneg > 0)).flatten()
    # the working set's rows: Z, Z^2, targets, weights (targets x weights), counts; compacted as heads finish
    Z, TS, cc = z[act], ts[act], cnt[act]
    M = None if m is None else m[act]
    TM = TS if M is None else TS * M
    ZZ = Z * Z

    def wsum(v, M):
        return v.sum(1) if M is None else torch.linalg.vecdot(v, M)

    def evaluate(A, B, Z, TM, M, cc):
        """Mean loss at (A, B) and the probabilities there (the next Newton step's)."""
        u = torch.addcmul(B[:, None], A[:, None], Z)
        s = torch.sigmoid(u.abs())
        loss = (wsum(torch.relu(u) - torch.log(s), M) - torch.linalg.vecdot(TM, u)) / cc
        return loss, torch.where(u >= 0, s, 1 - s)

    A, B = a[act], b[act]
    cur, P = evaluate(A, B, Z, TM, M, cc)
    for _ in range(iters):
        if not len(act):
            break
        R, W = P - TS, P - P * P + 1e-12
        if M is not None:
            R, W = R * M, W * M
        ga, gb = torch.linalg.vecdot(R, Z) / cc, R.sum(1) / cc
        haa = torch.linalg.vecdot(W, ZZ) / cc + ridge
        hab, hbb = torch.linalg.vecdot(W, Z) / cc, W.sum(1) / cc + ridge
        if kind == "temperature":
            da, db = ga / haa, torch.zeros_like(gb)
        else:
            det = haa * hbb - hab * hab
            da, db = (hbb * ga - hab * gb) / det, (haa * gb - hab * ga) / det
        # Damped Newton: halve each head's step until its own loss does not rise (only the heads still halving
        # are evaluated again).
        step = torch.ones(len(act), dtype=torch.float64)
        na, nb = (A - da).clamp(1e-4, 1e4), B - db
        new, nP = evaluate(na, nb, Z, TM, M, cc)
        ok = new <= cur + 1e-12
        for _ in range(30):
            if ok.all():
                break
            lag = torch.nonzero(~ok).flatten()
            step[lag] /= 2
            na[lag], nb[lag] = (A[lag] - step[lag] * da[lag]).clamp(1e-4, 1e4), B[lag] - step[lag] * db[lag]
            new[lag], nP[lag] = evaluate(na[lag], nb[lag], Z[lag], TM[lag], None if M is None else M[lag], cc[lag])
            ok[lag] = new[lag] <= cur[lag] + 1e-12
        A, B, cur = torch.where(ok, na, A), torch.where(ok, nb, B), torch.where(ok, new, cur)
        a[act], b[act] = A, B
        going = ok & (step * (da.abs() + db.abs()) >= 1e-9)
        if going.all():
            P = nP
            continue
        act, A, B, cur, P = act[going], A[going], B[going], cur[going], nP[going]
        Z, ZZ, TS, TM, cc = Z[going], ZZ[going], TS[going], TM[going], cc[going]
        M = None if M is None else M[going]
    return a, b


def confidences(logits: np.ndarray, a: np.ndarray | None = None, b: np.ndarray | None = None) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    if a is not None:
        z = z * a + b
    return 1.0 / (1.0 + np.exp(-np.clip(z, -500, 500)))


def fit_thresholds(conf: np.ndarray, targets: np.ndarray, default: float = 0.5) -> np.ndarray:
    """Per head, the confidence threshold with the best F1 on validation (default where a head has no positives).

    Only the rows scoring at least the head's lowest-scoring positive are sorted: a cut below them adds false
    positives and no true one, so the best cut is among them, and the next score below them is just their
    largest. The same thresholds as sorting every row; on a large validation set most rows are a head's clear
    negatives, and sorting them was most of this function's time."""
    n, N = conf.shape
    out = np.full(N, default)
    for j in range(N):
        pos = targets[:, j].astype(bool)
        if not pos.any() or n == 0:
            continue
        c = conf[:, j]
        top = c >= c[pos].min()
        ct = c[top]
        order = np.argsort(-ct, kind="stable")
        s, y = ct[order], pos[top][order]
        tp = np.cumsum(y)
        fp = np.cumsum(~y)
        f1 = 2 * tp / (tp + fp + pos.sum())
        last = np.r_[s[1:] != s[:-1], True]  # only cut between distinct scores
        f1 = np.where(last, f1, -1)
        k = int(np.argmax(f1))
        if k + 1 < len(s):
            nxt = s[k + 1]
        else:  # the cut below every candidate: the next score is the best of the rest
            nxt = float(c[~top].max()) if len(ct) < n else 0.0
        out[j] = float((s[k] + nxt) / 2)  # midway to the next score: robust to tiny shifts
    return out


def normalise_rows(conf: np.ndarray) -> np.ndarray:
    """OvR confidences as a distribution (as scikit-learn's OneVsRestClassifier.predict_proba), for NLL and ECE."""
    return conf / np.clip(conf.sum(1, keepdims=True), 1e-12, None)


# --- grown models: the gate ----------------------------------------------------------------------------------
#
# A head that never saw class k as a negative is no evidence against k: after `add-class ring`, the circle head
# fires on rings because it never learned otherwise. Each head's confidence is therefore multiplied by its gate:
# one minus the probability, from a classifier over all classes that is rebuilt at every add without touching a
# head, that the input belongs to a class that head never saw. The default gate is solved from the model's
# statistics (Stats.lda, stats.gate_posterior), so it is exactly the same whatever the order the classes came in;
# 'softmax' is the earlier gate, refit on every remembered row at each add (kept to be measured against:
# benchmarks/add_class.py).


@dataclass
class Gate:
    """Linear discriminants: posterior = softmax(phi(X) @ weight.T + bias), phi(X) = X or relu(X @ projection).
    `method` says how they were fitted: 'lda' (shared covariance, `strength` its shrinkage; from the statistics,
    or, in models written before them, from rows), 'ridge' (from the statistics, `strength` its ridge lam) or
    'softmax' (multinomial logistic regression on rows, `strength` its L2); the temperature is folded into weight
    and bias."""
    classes: list[str]
    weight: torch.Tensor  # [K, M]
    bias: torch.Tensor  # [K]
    method: str
    strength: float
    temperature: float
    projection: torch.Tensor | None = None  # [D, M]

    def posterior(self, X: torch.Tensor) -> np.ndarray:
        X = X.to(torch.float64)
        if self.projection is not None:
            X = torch.relu(X @ self.projection.to(X))
        z = X @ self.weight.to(X.device, torch.float64).T + self.bias.to(X.device, torch.float64)
        return torch.softmax(z, 1).cpu().numpy()



GATE_TOL = 1e-5  # L-BFGS gradient tolerance: tighter gave the same answers at several times the cost
GATE_L2 = (1.0, 0.1, 0.01, 1e-3)  # chosen on validation, strongest first (each fit warm-starts the next)


def _balanced(y: torch.Tensor, K: int, dtype) -> torch.Tensor:
    """Row weights giving every class the same total weight (1/K): a class added with few images is not
    outvoted by its count (the LDA's uniform priors, the heads' pos_weight)."""
    return (1.0 / (K * torch.bincount(y, minlength=K).clamp_min(1).to(torch.float64)))[y].to(dtype)


def _softmax_fit(Z: torch.Tensor, y: torch.Tensor, K: int, l2: float, theta: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """Class-balanced multinomial logistic regression + l2/2 |theta|^2 on standardised Z. Strictly convex: the
    answer does not depend on the start `theta` (a warm start from a stronger l2 only saves iterations).
    Returns theta [K, D + 1] (weights | bias), float64."""
    return softmax_lbfgs(Z, y, _balanced(y, K, torch.float64), K, l2, init=theta, tol=GATE_TOL)[0]


def softmax_temperature(z: torch.Tensor, y: torch.Tensor, weights: torch.Tensor | None = None, *,
                        t_max: float = 50.0) -> tuple[float, float]:
    """The temperature T in [0.05, t_max] minimising the (weighted) validation NLL of softmax(z / T), and that NLL: the
    gate's, and the softmax baseline's calibration in `ovr bench`. The NLL is convex in 1/T, so a safeguarded Newton
    search takes a few evaluations where a grid takes one per point."""
    w = torch.full((len(z),), 1.0 / len(z), dtype=z.dtype, device=z.device) if weights is None else weights.to(z)
    zy = z.gather(1, y[:, None])[:, 0]

    def f(beta: float) -> float:
        return float((w * (torch.logsumexp(beta * z, 1) - beta * zy)).sum())

    lo, hi = 1 / t_max, 1 / 0.05  # bounds on beta = 1 / T
    beta, cur = 1.0, f(1.0)
    for _ in range(50):
        p = torch.softmax(beta * z, 1)
        ez = (p * z).sum(1)
        g = float((w * (ez - zy)).sum())
        h = float((w * ((p * z * z).sum(1) - ez * ez)).sum())
        step = g / h if h > 1e-12 else float(np.sign(g)) * beta
        nb = min(max(beta - step, lo), hi)
        new = f(nb)
        while new > cur and abs(nb - beta) > 1e-9:  # damped: halve the step until the NLL does not rise
            nb = (nb + beta) / 2
            new = f(nb)
        if abs(nb - beta) <= 1e-6 * beta or new > cur:
            break
        beta, cur = nb, new
    return 1.0 / beta, cur


def fit_softmax(Z: torch.Tensor, y: torch.Tensor, Zv: torch.Tensor, yv: torch.Tensor, K: int, grid, *,
                untuned: float) -> tuple[torch.Tensor, float, float]:
    """A class-balanced multinomial logistic regression on normalised rows Z, Zv (float64, validation rows right
    after the training rows: `Normalizer.rows`): its L2 strength from `grid` (strongest first, each fit
    warm-starting the next) and its temperature chosen by the validation NLL, then refit on train + validation at
    that strength. Without validation rows of two classes or more: strength `untuned`, temperature 1. The softmax
    gate and the softmax baseline. -> (theta [K, D + 1] weights | bias, strength, temperature)."""
    strength, temp, theta = untuned, 1.0, None
    if len(Zv) and len(torch.unique(yv)) > 1:
        wv, best = _balanced(yv, K, torch.float64), None
        for l2 in sorted(grid, reverse=True):
            theta = _softmax_fit(Z, y, K, l2, theta)
            t, nll = softmax_temperature(Zv @ theta[:, :-1].T + theta[:, -1], yv, wv)
            if best is None or nll < best[0]:
                best = (nll, l2, t, theta)
        _, strength, temp, theta = best
    return _softmax_fit(joined(Z, Zv), torch.cat([y, yv]), K, strength, theta), float(strength), float(temp)


def softmax_gate(X: torch.Tensor, y: torch.Tensor, Xv: torch.Tensor, yv: torch.Tensor, classes: list[str]) -> Gate:
    """The softmax gate, refit on rows (the gate before the statistics', kept to be measured against):
    `fit_softmax` over GATE_L2 on the rows with a class (y < 0: negatives without one are left out), standardised
    for the fit (the heads' Normalizer) and folded back, the temperature divided in."""
    keep, keepv = y >= 0, yv >= 0
    X, y = X[keep.to(X.device)].to(torch.float64), y[keep].to(X.device)
    Xv, yv = Xv[keepv.to(Xv.device)].to(torch.float64), yv[keepv].to(X.device)
    norm = Normalizer.fit("standardize", X, Xv)
    Z, Zv = norm.rows(X, Xv)
    theta, strength, temp = fit_softmax(Z, y, Zv, yv, len(classes), GATE_L2, untuned=0.01)
    raw = norm.fold({"weight": theta[:, :-1] / temp, "bias": theta[:, -1] / temp})
    return Gate(list(classes), raw["weight"].float().cpu(), raw["bias"].float().cpu(), "softmax", strength, temp)


def unseen_matrix(classes: list[str], trained_with: list[list[str]]) -> np.ndarray:
    """U[h, k]: head h's training set had no example of class k (bool [N, N])."""
    # rows filled by index (a set per head-class pair made 1,000 heads take 13 s per predict call; scale.py)
    index = {c: i for i, c in enumerate(classes)}
    U = np.ones((len(trained_with), len(classes)), dtype=bool)
    for h, tw in enumerate(trained_with):
        U[h, [index[c] for c in tw if c in index]] = False
    return U
