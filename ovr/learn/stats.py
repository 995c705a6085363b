"""Sufficient statistics of a model's remembered embeddings, and what is solved from them in closed form.

Per class: the count and the sum of its rows' features; shared: the number of rows, their sum and the Gram matrix
G = sum phi(x) phi(x)^T, all in float64. The features phi are the embeddings themselves, or a fixed random ReLU
projection of them to M dimensions (as RanPAC does: it makes the classes more separable for a linear solve).

These numbers add and subtract exactly, so `add_class` and `remove_class` touch the rows of one class only, and a
model grown one class at a time has the same statistics as one built on all its classes at once (up to float64
rounding). From them come:
- one-vs-rest ridge regression of every class (W = (G_c + lam I)^-1 Q_c, centred), with lam chosen by
  generalised cross-validation, which needs only G's eigenvalues and Q: no embedding is read again;
- each ridge column's logit, from the two-Gaussian (equal-variance) model of its score, whose means and pooled
  variance also come from the statistics: `ridge_heads`;
- a shared-covariance LDA of every class (shrunk towards a multiple of the identity): `Stats.lda`, the default gate;
- the gate's posterior temperature, from the Gaussian model of the score vectors: `gate_posterior`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import OvrError

LAMBDAS = tuple(10.0 ** (k / 4) for k in range(-20, 9))  # ridge strengths relative to mean(eigenvalue of G_c)
BETAS = tuple(2.0 ** (k / 2) for k in range(-10, 21))  # gate sharpness: softmax(beta * score), 1/32 .. 1024
# The LDA gate's covariance is (1 - a) * pooled within-class covariance + a * its mean eigenvalue * I. A fixed a,
# chosen by measurement (benchmarks/add_class.py --gate-shrinkage): every a the statistics could pick in-sample
# favours no shrinkage, and where rows are fewer than features the pooled covariance is singular.
GATE_SHRINKAGE = 0.35
# The largest squared separation (m1 - m0)^2 / var a ridge head may claim: where the solve interpolates its training
# rows (fewer rows than features) the within-class variance of the scores is ~0, and the logits would be set by
# rounding (huge, and different after an add-and-remove). 40 puts a class mean at logit 20.
SEPARATION_MAX = 40.0
MC_PER_CLASS = 256  # samples per class of the Gaussian score model that picks the gate's sharpness
MOMENT_ROWS = 16384  # rows per block when summing the embeddings' moments in float64


@dataclass
class FeatureMap:
    """phi(x): x itself (projection None), or relu(x @ projection) with a seeded Gaussian projection [D, M]."""
    projection: torch.Tensor | None = None

    @classmethod
    def random(cls, dim: int, size: int, seed: int = 0) -> "FeatureMap":
        if size <= 0:
            return cls(None)
        g = torch.Generator().manual_seed(seed)
        return cls(torch.randn(dim, size, generator=g, dtype=torch.float64).div_(dim ** 0.5).float())

    def __call__(self, X: torch.Tensor) -> torch.Tensor:
        if self.projection is None:
            return X
        return torch.relu(X @ self.projection.to(X.device, X.dtype))

    def size(self, dim: int) -> int:
        return dim if self.projection is None else self.projection.shape[1]


def moments(*parts: torch.Tensor) -> torch.Tensor:
    """[2, D] float64 on the CPU: the column sums and sums of squares of the rows of all `parts`, summed on their
    device (matrix-vector products: torch's reductions over dim 0 are slow on the CPU)."""
    out = None
    for part in parts:
        for s in range(0, len(part), MOMENT_ROWS):  # a float64 copy of a block at a time, not of every row
            P = part[s:s + MOMENT_ROWS].to(torch.float64)
            ones = torch.ones(len(P), dtype=torch.float64, device=P.device)
            m = torch.stack([ones @ P, ones @ P.square()]).cpu()
            out = m if out is None else out + m
    return out


@dataclass
class Stats:
    """Counts, sums and the Gram matrix of phi(embeddings), float64. `sums[k]`/`counts[k]` follow `classes`; rows
    with no class (extra negatives) count in rows, total and gram only."""
    classes: list[str]
    counts: torch.Tensor  # [K]
    sums: torch.Tensor  # [K, M]
    rows: torch.Tensor  # [] number of rows in gram
    total: torch.Tensor  # [M]
    gram: torch.Tensor  # [M, M]
    features: FeatureMap
    # [2, D]: the sum and the sum of squares of the embeddings themselves (not phi), for the BCE heads'
    # standardisation without a pass over the rows; None in statistics saved before they were kept
    moments: torch.Tensor | None = None

    @classmethod
    def empty(cls, size: int, features: FeatureMap, dim: int) -> "Stats":
        z = torch.zeros((), dtype=torch.float64)
        return cls([], torch.zeros(0, dtype=torch.float64), torch.zeros(0, size, dtype=torch.float64), z.clone(),
                   torch.zeros(size, dtype=torch.float64), torch.zeros(size, size, dtype=torch.float64), features,
                   torch.zeros(2, dim, dtype=torch.float64))

    @property
    def dim(self) -> int:
        return self.total.shape[0]

    def _phi(self, X: torch.Tensor) -> torch.Tensor:
        return self.features(X.float()).to("cpu", torch.float64)

    def _column(self, name: str) -> int:
        if name not in self.classes:
            self.classes.append(name)
            self.counts = torch.cat([self.counts, torch.zeros(1, dtype=torch.float64)])
            self.sums = torch.cat([self.sums, torch.zeros(1, self.dim, dtype=torch.float64)])
        return self.classes.index(name)

    def update(self, X: torch.Tensor, labels: torch.Tensor, names: list[str], sign: float = 1.0) -> None:
        """Add (sign=1) or subtract (sign=-1) rows X. labels: [n] indices into `names` (-1: no class), or a target
        matrix [n, len(names)] (multi-label). Only these rows are read."""
        if not len(X):
            for c in names:
                self._column(c)
            return
        F = self._phi(X)
        T = labels.to("cpu", torch.float64) if labels.ndim == 2 else (
            labels.cpu()[:, None] == torch.arange(len(names))[None]).to(torch.float64)
        cols = [self._column(c) for c in names]
        self.counts[cols] += sign * T.sum(0)
        self.sums[cols] += sign * (T.T @ F)
        self.rows += sign * len(F)
        self.total += sign * F.sum(0)
        self.gram += sign * (F.T @ F)
        if self.moments is not None:
            self.moments += sign * moments(X)

    def drop(self, name: str) -> None:
        """Forget class `name`'s column (after its rows were subtracted, or to keep them as plain negatives)."""
        k = self.classes.index(name)
        keep = [i for i in range(len(self.classes)) if i != k]
        self.classes = [self.classes[i] for i in keep]
        self.counts, self.sums = self.counts[keep], self.sums[keep]

    def check(self) -> None:
        if not len(self.classes) or float(self.rows) < 2:
            raise OvrError("the model's statistics hold fewer than two rows")
        if float(self.counts.min()) <= 0:
            empty = self.classes[int(self.counts.argmin())]
            raise OvrError(f"the model's statistics have no rows of class {empty!r}")

    # --- closed-form solves -----------------------------------------------------------------------------------

    def ridge(self, classes: list[str]) -> "Scores":
        """One-vs-rest ridge regression of `classes` on phi, intercept unpenalised, lam by GCV (float64)."""
        self.check()
        cols = [self.classes.index(c) for c in classes]
        n, mu = float(self.rows), self.total / self.rows
        Gc = self.gram - n * torch.outer(mu, mu)
        counts = self.counts[cols]
        Qc = self.sums[cols].T - torch.outer(mu, counts)  # sum over rows of (phi - mu) y_k
        e, V = torch.linalg.eigh(Gc)
        # directions G does not span (rounding-level eigenvalues) carry no signal: their projections are noise
        span = e > 1e-10 * float(e.max().clamp_min(1e-300))
        e = torch.where(span, e, torch.zeros_like(e))
        P = (V.T @ Qc) * span[:, None]
        signal = (P * P).sum(1) / torch.where(span, e, torch.ones_like(e))  # per direction, what lam = 0 fits
        tss = float((counts * (1 - counts / n)).sum())
        # the residual at lam = 0: none where G spans every centred row (rows <= features + 1), else what is left
        rss0 = 0.0 if int(span.sum()) >= n - 1 else max(tss - float(signal.sum()), 0.0)
        scale = float(e.mean()) or 1.0
        best = None
        for rel in LAMBDAS:
            lam = rel * scale
            # rss(lam) = rss(0) + sum_j signal_j (lam / (e_j + lam))^2: no cancellation, so GCV stays defined where
            # the solve interpolates (both rss and n - 1 - df go to 0 with lam; tss - fit would be rounding)
            rss = rss0 + float((signal * (lam / (e + lam)) ** 2).sum())
            df = float((e / (e + lam)).sum())
            gcv = n * rss / max(n - 1 - df, 1e-9) ** 2
            if best is None or gcv < best[0]:
                best = (gcv, rel * scale, df)
        _, lam, df = best
        W = V @ (P / (e + lam)[:, None])
        b = counts / n - mu @ W
        return Scores(classes, W, b, lam, df, self)

    def within(self, cols: list[int]) -> torch.Tensor:
        """The pooled within-class scatter of phi over these classes' rows: gram minus each class's mean outer
        product, the rows of no class (extra negatives) centred as one group of their own."""
        counts = self.counts[cols].clamp_min(1)
        Sw = self.gram - (self.sums[cols].T / counts) @ self.sums[cols]
        rest = float(self.rows - self.counts[cols].sum())
        if rest >= 1:  # single-label rows: the rest are the rows of no class
            r = self.total - self.sums[cols].sum(0)
            Sw = Sw - torch.outer(r, r) / rest
        return Sw

    def lda(self, classes: list[str], shrinkage: float = GATE_SHRINKAGE) -> "Scores":
        """Linear discriminants of `classes` on phi with one shared covariance, shrunk: score_k(x) = phi W_k + b_k,
        the log-density of class k up to a constant, equal priors (a class added with few rows is not outvoted by
        its count). From the statistics alone, float64."""
        self.check()
        cols = [self.classes.index(c) for c in classes]
        mu = self.sums[cols] / self.counts[cols].clamp_min(1)[:, None]
        cov = self.within(cols) / max(float(self.rows) - len(cols), 1.0)
        cov = (cov + cov.T) / 2
        mean_eig = float(cov.diagonal().mean())  # the trace over M: no eigendecomposition needed
        sigma = (1 - shrinkage) * cov + shrinkage * mean_eig * torch.eye(len(cov), dtype=cov.dtype)
        L, info = torch.linalg.cholesky_ex(sigma)  # definite with any shrinkage > 0: no eigendecomposition needed
        W = (torch.cholesky_solve(mu.T, L) if int(info) == 0 else torch.linalg.pinv(sigma, hermitian=True) @ mu.T).T
        return Scores(classes, W.T, -0.5 * (W * mu).sum(1), shrinkage, 0.0, self)


@dataclass
class Scores:
    """Linear scores phi @ weight + bias of `classes`, solved from `stats`: a ridge regression (`strength` its lam,
    `df` its effective degrees of freedom) or an LDA (`strength` its shrinkage, df 0)."""
    classes: list[str]
    weight: torch.Tensor  # [M, K] on phi
    bias: torch.Tensor  # [K]
    strength: float
    df: float
    stats: Stats

    def score_moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per class, the mean score vector of its rows [K, K]; and the pooled within-class covariance of the
        score vectors [K, K], inflated by GCV's (n / (n - df))^2 so that it speaks for unseen rows, not the
        training rows a ridge solve has fitted."""
        s = self.stats
        cols = [s.classes.index(c) for c in self.classes]
        counts = s.counts[cols].clamp_min(1)
        means = (s.sums[cols] / counts[:, None]) @ self.weight + self.bias
        n = float(s.rows)
        cov = self.weight.T @ s.within(cols) @ self.weight / max(n - len(cols), 1.0)
        inflate = (n / max(n - self.df, 1.0)) ** 2
        return means, cov * inflate


def ridge_heads(ridge: Scores) -> tuple[torch.Tensor, torch.Tensor]:
    """Each class's ridge score turned into a logit: the log-odds of the class under two equal-variance Gaussians
    (its rows' scores and the other rows' scores, equal priors, as pos_weight balances the BCE heads), from the
    statistics alone. Returns (weight [K, M], bias [K]) acting on phi."""
    s = ridge.stats
    cols = [s.classes.index(c) for c in ridge.classes]
    n = float(s.rows)
    w, b = ridge.weight, ridge.bias
    pos = s.counts[cols].clamp_min(1)
    neg = (n - s.counts[cols]).clamp_min(1)
    sp = (s.sums[cols] * w.T).sum(1)  # sum of w_k . phi over class k's rows
    st = s.total @ w  # ... over every row
    m1, m0 = sp / pos + b, (st - sp) / neg + b
    ss = ((s.gram @ w) * w).sum(0)  # sum of (w_k . phi)^2 over every row
    # pooled within-group variance of the score (without the bias: it cancels)
    var = (ss - sp ** 2 / pos - (st - sp) ** 2 / neg) / max(n - 2, 1.0)
    var = var.clamp_min(0) * (n / max(n - ridge.df, 1.0)) ** 2
    var = torch.maximum(var, (m1 - m0) ** 2 / SEPARATION_MAX).clamp_min(1e-12)
    a = (m1 - m0) / var
    return (a[:, None] * w.T), a * (b - (m1 + m0) / 2)


def gate_posterior(scores: Scores, samples: int = MC_PER_CLASS) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The gate's posterior softmax(beta * (phi @ W + b)) for linear scores (ridge or LDA): beta minimises the
    expected class-balanced NLL under the Gaussian model of the score vectors (`score_moments`), estimated on
    seeded samples. Returns (weight [K, M], bias [K], beta), beta folded in."""
    means, cov = scores.score_moments()
    K = len(means)
    order = sorted(range(K), key=lambda k: scores.classes[k])  # samples by class name: the same in any class order
    means, cov = means[order][:, order], cov[order][:, order]
    g = torch.Generator().manual_seed(0)
    cov = (cov + cov.T) / 2
    scale = float(cov.diagonal().mean().clamp_min(1e-12))
    for jitter in (1e-9, 1e-6, 1e-3, 1e-1):  # the statistics' subtraction can leave cov a hair from semi-definite
        L, info = torch.linalg.cholesky_ex(cov + jitter * scale * torch.eye(K, dtype=cov.dtype))
        if int(info) == 0:
            break
    Z = torch.randn(K, samples, K, generator=g, dtype=torch.float64)
    S = means[:, None, :] + Z @ L.T  # [K, samples, K]
    y = torch.arange(K)[:, None].expand(K, samples)
    best = None
    for beta in BETAS:
        nll = float(torch.nn.functional.cross_entropy((beta * S).reshape(-1, K), y.reshape(-1)))
        if best is None or nll < best[0]:
            best = (nll, beta)
    beta = best[1]
    return beta * scores.weight.T, beta * scores.bias, beta
