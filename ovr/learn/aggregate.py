"""What the answer is built from: per-head calibration and thresholds (fitted on validation logits), and the gate of
a grown model. The answer itself is `answer.answer`."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..config import CALIBRATION
from .heads import Normalizer, joined
from .solver import softmax_lbfgs

UNKNOWN = -1


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
    z = torch.as_tensor(logits, dtype=torch.float64)
    t = torch.as_tensor(targets, dtype=torch.float64)
    a, b = _fit_ab(z, t, torch.ones_like(z), kind, iters)
    # cross-fit: per head, positives and negatives dealt alternately into two halves
    pos = t > 0.5
    rank = torch.where(pos, pos.double().cumsum(0), (~pos).double().cumsum(0))
    half = (rank % 2 == 0).double()
    held_cal = torch.zeros(N, dtype=torch.float64)
    held_raw = torch.zeros(N, dtype=torch.float64)
    for m in (half, 1 - half):
        fa, fb = _fit_ab(z, t, m, kind, iters)
        other = 1 - m
        held_cal += (_bce(fa * z + fb, t) * other).sum(0)
        held_raw += (_bce(z, t) * other).sum(0)
    helps = (held_cal < held_raw) & (pos.sum(0) >= 2) & ((~pos).sum(0) >= 2)
    return (torch.where(helps, a, 1.0).numpy(), torch.where(helps, b, 0.0).numpy())


def _bce(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.binary_cross_entropy_with_logits(z, t, reduction="none")


def _fit_ab(z: torch.Tensor, t: torch.Tensor, m: torch.Tensor, kind: str, iters: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) per column on the rows where m == 1 (Newton on the mean BCE against Platt's smoothed targets). Each
    column stops on its own (its step below 1e-9, or no step that lowers its loss) and leaves the working set, so a
    column's answer does not depend on the others, and many heads cost what their slowest few do, not that times
    their number."""
    N = z.shape[1]
    cnt = m.sum(0).clamp_min(1)
    # Platt's smoothed targets: without them separable validation data drives a to infinity.
    npos, nneg = (t * m).sum(0), ((1 - t) * m).sum(0)
    t = torch.where(t > 0.5, (npos + 1) / (npos + 2), 1 / (nneg + 2))
    a, b = torch.ones(N, dtype=torch.float64), torch.zeros(N, dtype=torch.float64)
    ridge = 1e-6

    def loss(cols, a, b):
        return (_bce(a * z[:, cols] + b, t[:, cols]) * m[:, cols]).sum(0) / cnt[cols]

    # a column without positives (or negatives) among these rows has nothing to calibrate against: the optimum
    # squashes every confidence towards one smoothed target, a -> 0. It keeps the identity.
    act = torch.nonzero((npos > 0) & (nneg > 0)).flatten()
    cur = torch.zeros(N, dtype=torch.float64)
    cur[act] = loss(act, a[act], b[act])
    for _ in range(iters):
        if not len(act):
            break
        zc, tc, mc, cc, ac, bc = z[:, act], t[:, act], m[:, act], cnt[act], a[act], b[act]

        def mean(v):
            return (v * mc).sum(0) / cc

        p = torch.sigmoid(ac * zc + bc)
        w = p * (1 - p) + 1e-12
        r = p - tc
        ga, gb = mean(r * zc), mean(r)
        haa, hab, hbb = mean(w * zc * zc) + ridge, mean(w * zc), mean(w) + ridge
        if kind == "temperature":
            da, db = ga / haa, torch.zeros_like(gb)
        else:
            det = haa * hbb - hab * hab
            da, db = (hbb * ga - hab * gb) / det, (haa * gb - hab * ga) / det
        # Damped Newton: halve each column's step until its own loss does not rise (only the columns still halving
        # are evaluated again).
        step = torch.ones(len(act), dtype=torch.float64)
        na, nb = (ac - da).clamp(1e-4, 1e4), bc - db
        new = loss(act, na, nb)
        ok = new <= cur[act] + 1e-12
        for _ in range(30):
            if ok.all():
                break
            lag = torch.nonzero(~ok).flatten()
            step[lag] /= 2
            na[lag], nb[lag] = (ac[lag] - step[lag] * da[lag]).clamp(1e-4, 1e4), bc[lag] - step[lag] * db[lag]
            new[lag] = loss(act[lag], na[lag], nb[lag])
            ok[lag] = new[lag] <= cur[act[lag]] + 1e-12
        a[act], b[act] = torch.where(ok, na, ac), torch.where(ok, nb, bc)
        cur[act] = torch.where(ok, new, cur[act])
        act = act[ok & (step * (da.abs() + db.abs()) >= 1e-9)]
    return a, b


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


def softmax_gate(X: torch.Tensor, y: torch.Tensor, Xv: torch.Tensor, yv: torch.Tensor, classes: list[str]) -> Gate:
    """The softmax gate, refit on rows (the gate before the statistics', kept to be measured against): a
    class-balanced multinomial logistic regression, its L2 strength and temperature chosen on validation (NLL),
    then refit on train + validation. Rows with y < 0 (negatives without a class) are left out. Features are
    standardised for the fit (the heads' Normalizer); that is folded back."""
    K = len(classes)
    keep, keepv = y >= 0, yv >= 0
    X, y = X[keep.to(X.device)].to(torch.float64), y[keep].to(X.device)
    Xv, yv = Xv[keepv.to(Xv.device)].to(torch.float64), yv[keepv].to(X.device)
    ya = torch.cat([y, yv])
    norm = Normalizer.fit("standardize", X, Xv)
    Z, Zv = norm.rows(X, Xv)
    Za = joined(Z, Zv)
    tuned = len(Xv) and len(torch.unique(yv)) > 1
    strength, temp, theta = 0.01, 1.0, None
    if tuned:
        wv, best = _balanced(yv, K, torch.float64), None
        for l2 in GATE_L2:
            theta = _softmax_fit(Z, y, K, l2, theta)
            t, nll = softmax_temperature(Zv @ theta[:, :-1].T + theta[:, -1], yv, wv)
            if best is None or nll < best[0]:
                best = (nll, l2, t, theta)
        _, strength, temp, theta = best
    theta = _softmax_fit(Za, ya, K, strength, theta)
    raw = norm.fold({"weight": theta[:, :-1] / temp, "bias": theta[:, -1] / temp})
    return Gate(list(classes), raw["weight"].float().cpu(), raw["bias"].float().cpu(), "softmax", float(strength),
                float(temp))


def unseen_matrix(classes: list[str], trained_with: list[list[str]]) -> np.ndarray:
    """U[h, k]: head h's training set had no example of class k (bool [N, N])."""
    # rows filled by index (a set per head-class pair made 1,000 heads take 13 s per predict call; scale.py)
    index = {c: i for i, c in enumerate(classes)}
    U = np.ones((len(trained_with), len(classes)), dtype=bool)
    for h, tw in enumerate(trained_with):
        U[h, [index[c] for c in tw if c in index]] = False
    return U
