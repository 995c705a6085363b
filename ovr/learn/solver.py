"""Column-wise optimisers. Each column of a stacked problem is its own problem: every scalar the methods keep (step
sizes, curvature pairs, line-search state, convergence flags) is a vector over columns, never a reduction across
them, so a column's answer does not depend on which other columns were solved beside it. No OvR knowledge here.

- `_lbfgs`: the one L-BFGS core (two-loop recursion, exact line search, per-column convergence and working set).
  A loss plugs in as a small problem object (logits, objective, line derivatives, penalty); the line search needs no
  matmul at all, since the logits move linearly along the step (z + a * X p).
- `logistic_lbfgs`: the exact solver of linear heads, L2-regularised sample-weighted logistic regression per column.
- `softmax_lbfgs`: one multinomial logistic regression (the softmax gate and baseline), the whole theta one column.
- `adam_columns`: minibatch Adam with per-column early stopping, for MLP heads and the softmax baseline's MLP.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

Tensors = dict[str, torch.Tensor]


# --- exact: one per-column L-BFGS core with an exact line search; the losses plug into it ----------------------

# The step along each direction need not be exact for L-BFGS, only close: a relative tolerance of 1e-3 halves the
# line search's passes with the same iterations. Up to 20 steps: a column whose first guess is far off (saturated
# logits of a weakly regularised head) needs a few bisections/doublings; with 4 it could not move at all.
LINE_SEARCH_STEPS = 20
LINE_SEARCH_RTOL = 1e-3


# A Newton solve over large [rows, columns] arrays works on the columns still moving once at most half are: every
# evaluation reads all of every array, so columns that have settled would otherwise cost as much as those that
# have not, up to LINE_SEARCH_STEPS times. Below this many elements the gather costs more than it saves.
NARROW_ELEMENTS = 1 << 20


def _newton(derivatives: Callable, a: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor):
    """Per column, the root of phi'(a) for a convex phi (phi' increasing), from a inside the bracket [lo, hi]
    (either end may be infinite): Newton steps, kept inside the bracket (a step that leaves it bisects, or doubles
    towards an infinite end), until every column's step is settled to LINE_SEARCH_RTOL. derivatives(a) ->
    (phi'(a), phi''(a)); a derivatives with `narrow(cols)` (`_SigmoidLine`) is narrowed to the columns still
    moving once they are at most half of its columns and it is large (NARROW_ELEMENTS). Returns (a, lo): lo is
    the largest point known to have phi' < 0."""
    out_a = out_lo = cols = None  # cols: the working columns' places among all (None: all of them)
    for _ in range(LINE_SEARCH_STEPS):
        d1, d2 = derivatives(a)
        lo = torch.where(d1 < 0, a, lo)
        hi = torch.where(d1 >= 0, a, hi)
        nxt = torch.where(d2 > 0, a - d1 / d2.clamp_min(1e-300), a)
        inside = (nxt >= lo) & (nxt <= hi)  # inclusive: a converged step (nxt == a) stays put
        fallback = torch.where(torch.isfinite(hi) & torch.isfinite(lo), (lo + hi) / 2, 2 * a)
        nxt = torch.where(inside, nxt, fallback)
        moving = (nxt - a).abs() > LINE_SEARCH_RTOL * a.abs().clamp_min(1)
        a = nxt
        left = int(moving.sum())
        if not left:
            break
        if left * 2 <= len(a) and getattr(derivatives, "size", 0) >= NARROW_ELEMENTS:
            out_a, out_lo = _put(out_a, cols, a), _put(out_lo, cols, lo)
            keep = torch.nonzero(moving).flatten()
            derivatives, a, lo, hi = derivatives.narrow(keep), a[keep], lo[keep], hi[keep]
            cols = keep if cols is None else cols[keep]
    return _put(out_a, cols, a), _put(out_lo, cols, lo)


def _put(full: torch.Tensor, cols: torch.Tensor | None, part: torch.Tensor) -> torch.Tensor:
    if cols is None:
        return part
    full[cols] = part
    return full


class _SigmoidLine:
    """The derivatives, per column, of the logistic data term along a line of its logits z + a v, plus a quadratic
    p1 a + p2 a^2 / 2 (the penalty's share along a step):

        phi'(a) = sum_i w1_i sigmoid(z_i + a v_i) - c + p1 + a p2,   phi''(a) = sum_i w2_i sigmoid'(.) + p2.

    Along a step v = X p (w1 = S v, w2 = S v^2, c = sum S T v); in the bias v = 1 (w1 = w2 = S, c = sum S T).
    Elementwise work and column sums, no matmul; `narrow(cols)` is the same for some of the columns."""

    def __init__(self, z, v, w1, w2, c, *, p1, p2, dtype, scratch=None):
        self.z, self.v, self.w1, self.w2, self.c, self.p1, self.p2, self.dtype = z, v, w1, w2, c, p1, p2, dtype
        self.A, self.B = scratch or (torch.empty_like(z), torch.empty_like(z))
        self.size = z.numel()

    def __call__(self, a: torch.Tensor):
        A, B, dt = self.A, self.B, self.dtype
        a32 = a.to(self.z.dtype)
        s = (torch.add(self.z, a32, out=A) if self.v is None else torch.addcmul(self.z, a32, self.v, out=A)).sigmoid_()
        d1 = colsum(torch.mul(s, self.w1, out=B), dt, exact=False) - self.c + self.p1 + a * self.p2
        return d1, colsum(torch.addcmul(s, s, s, value=-1, out=B).mul_(self.w2), dt, exact=False) + self.p2

    def narrow(self, cols: torch.Tensor) -> "_SigmoidLine":
        z, w1 = self.z[:, cols], self.w1[:, cols]
        v = None if self.v is None else self.v[:, cols]
        w2 = w1 if self.w2 is self.w1 else self.w2[:, cols]
        return _SigmoidLine(z, v, w1, w2, self.c[cols], p1=self.p1[cols], p2=self.p2[cols], dtype=self.dtype)


COLSUM_ELEMENTS = 1 << 19  # float64 elements of one block of rows converted at a time (4 MB)


def colsum(A: torch.Tensor, dtype: torch.dtype = torch.float64, exact: bool = True) -> torch.Tensor:
    """Column sums of A [n, C], returned in `dtype`.

    exact=True sums in float64: the objective's sums, whose differences decide whether a step descended and when a
    column has stopped moving, need its precision. torch's A.sum(0, dtype=torch.float64) of a float32 array
    converts element by element inside the reduction, several times slower on large arrays than converting blocks
    of rows and summing each in float64, which this does (the same sums: `benchmarks/elementwise.py`).
    exact=False sums in A's own dtype, by torch's reduction, which accumulates in a cascade (its rounding grows
    with log n, not with n as a running sum's; `elementwise.py` measures it): enough for the Newton derivatives
    of the line search and the bias step and for the gradient's bias entry, whose terms are float32 products to
    begin with, and faster than converting every element (`elementwise.py`)."""
    if not exact:
        return A.sum(0).to(dtype)
    rows = max(256, COLSUM_ELEMENTS // max(1, A.shape[1]))
    if A.dtype == dtype or len(A) <= rows:
        return A.sum(0, dtype=dtype)
    out = A[:rows].to(dtype).sum(0)
    for s in range(rows, len(A), rows):
        out += A[s:s + rows].to(dtype).sum(0)
    return out


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vecdot(a, b)  # fused: no [C, D] temporary, unlike (a * b).sum(-1)


# One column over many rows (a new class's head over every remembered row) on the CPU: torch runs a
# matrix-vector product on one thread. The logits are computed as two equal columns (a matrix-matrix product, on
# every thread; X is read once either way), the gradient's product as two halves of the rows in one batched
# product (batches run on their own threads) and their sum. `benchmarks/matmul.py` measures both against the plain
# products.
SPLIT_ROWS = 16384  # fewer rows: the one-thread product is over before the others would start


def _split(X: torch.Tensor, C: int) -> bool:
    return C == 1 and X.device.type == "cpu" and len(X) >= SPLIT_ROWS


def affine(X: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """X @ W.T + b, W [C, D]."""
    if _split(X, W.shape[0]):
        return torch.addmm(b.repeat(2), X, W.repeat(2, 1).T)[:, :1].contiguous()
    return torch.addmm(b, X, W.T)


def back(R: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """R.T @ X, R [n, C]: the gradient's product."""
    if not _split(X, R.shape[1]):
        return R.T @ X
    h, D = len(X) // 2, X.shape[1]
    halves = X.as_strided((2, h, D), (h * X.stride(0), X.stride(0), X.stride(1)))
    out = torch.bmm(R[:2 * h, 0].reshape(2, 1, h), halves).sum(0)
    return out.addmm_(R[2 * h:].T, X[2 * h:]) if len(X) % 2 else out


def centered(W: torch.Tensor, b: torch.Tensor, center: tuple[torch.Tensor, torch.Tensor] | None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """A linear map (W [..., D], b) on standardised rows (x - mean) / std, center = (mean, std), as the same map
    on the raw rows x: (W / std, b - (W / std) . mean)."""
    if center is None:
        return W, b
    mean, std = center
    W = W / std
    return W, b - (W * mean).sum(-1)


def softplus(z: torch.Tensor, out: torch.Tensor | None = None, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """log(1 + e^z) as relu(z) - log(sigmoid(|z|)): within 1e-7 of F.softplus in float32 (an absolute error of at
    most e^-|z| where sigmoid(|z|) rounds to 1), and several times faster on the CPU, where F.softplus's log1p is
    not vectorised: it was the largest elementwise cost of an iteration. Written into `out`, with `scratch` (both
    z's shape; new arrays when not given)."""
    out = torch.empty_like(z) if out is None else out
    scratch = torch.empty_like(z) if scratch is None else scratch
    torch.abs(z, out=scratch).sigmoid_().log_()
    return torch.clamp_min(z, 0, out=out).sub_(scratch)


class _Logistic:
    """C independent problems: mean_i s_ic * BCE(x_i . w_c + b_c, t_ic) + l2_c / 2 * |w_c|^2. theta [C, D + 1].
    With center = (mean, std) the rows x_i are (X_i - mean) / std, applied inside the two products (`centered`)
    instead of to a copy of X."""

    def __init__(self, X, T, pos_weight, l2, dtype, wd, center=None):
        n, self.D = X.shape
        self.dtype, self.wd, self.Xm = dtype, wd, X.to(wd)
        dev = X.device
        self.center = None if center is None else tuple(v.to(dev, dtype) for v in center)
        T = T.to(dev, wd)  # the sample weights S carry everything the targets say: S and S * T are kept, not T
        self.S = torch.where(T > 0, pos_weight.to(dev, wd) / n, torch.full((), 1 / n, dtype=wd, device=dev))
        self.ST = self.S * T
        self.tsum = colsum(self.ST, dtype)  # the bias step's constant term
        self.l2 = l2.to(dev, dtype)
        self._scratch: list[torch.Tensor] = []

    def scratch(self, z: torch.Tensor) -> list[torch.Tensor]:
        """Four work arrays of z's shape, kept from one call to the next (new ones when the working set shrinks).
        The elementwise work of an iteration (objective, line search, bias step) writes into them instead of into
        dozens of new [rows, columns] arrays: on the CPU an array above glibc's mmap threshold (32 MiB) comes as
        fresh pages, and faulting them in can cost more than the work itself (`benchmarks/elementwise.py`)."""
        if not self._scratch or self._scratch[0].shape != z.shape:
            self._scratch = [torch.empty_like(z, memory_format=torch.contiguous_format) for _ in range(4)]
        return self._scratch

    def keep(self, mask: torch.Tensor) -> None:
        self.S, self.ST, self.tsum, self.l2 = self.S[:, mask], self.ST[:, mask], self.tsum[mask], self.l2[mask]

    def logits(self, th: torch.Tensor) -> torch.Tensor:  # linear in th: also the logits' change along a step
        W, b = centered(th[:, :self.D], th[:, self.D], self.center)
        if not W.any():  # a solve from zero weights: the logits are the biases, without a pass over the rows
            return b.to(self.wd).expand(len(self.Xm), -1).clone()
        return affine(self.Xm, W.to(self.wd), b.to(self.wd))

    def penalty(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:  # l2 <u, v> over the weights, not the bias
        return self.l2 * _dot(u[:, :self.D], v[:, :self.D])

    def objective(self, th: torch.Tensor, z: torch.Tensor):
        """f = sum S softplus(z) - sum S T z + l2/2 |w|^2 and its gradient: products in the work dtype; f's sums in
        float64 (a float32 sum cannot resolve the last decreases of f), the bias entry's by the float32 cascade
        (`colsum`)."""
        dt, D = self.dtype, self.D
        A, B = self.scratch(z)[:2]
        f = colsum(softplus(z, A, B).mul_(self.S), dt) - colsum(torch.mul(self.ST, z, out=B), dt)
        f = f + 0.5 * self.penalty(th, th)
        r = torch.sigmoid(z, out=A).mul_(self.S).sub_(self.ST)  # S * (sigmoid(z) - t)
        gw, gb = back(r, self.Xm).to(dt), colsum(r, dt, exact=False)
        if self.center is not None:  # sum_i r_i (X_i - mean) / std
            gw = (gw - gb[:, None] * self.center[0]) / self.center[1]
        return f, torch.cat([gw + self.l2[:, None] * th[:, :D], gb[:, None]], 1)

    def bias_step(self, z: torch.Tensor) -> torch.Tensor:
        """Per column, the change of the bias that minimises the objective with the weights where they are: every
        logit moves by it, so it is a 1-D Newton on elementwise work (no matmul). The bias is unpenalised and
        its curvature (sum_i s_i sigmoid'(z_i)) can be far from the weights' (a rare class with a large
        pos_weight): taken alone in the quasi-Newton steps it converges last and sets the iteration count."""
        zero = torch.zeros(z.shape[1], dtype=self.dtype, device=z.device)
        inf = torch.full_like(zero, float("inf"))
        line = _SigmoidLine(z, None, self.S, self.S, self.tsum, p1=zero, p2=zero, dtype=self.dtype,
                            scratch=self.scratch(z)[:2])
        return _newton(line, zero, -inf, inf)[0]

    def line(self, z: torch.Tensor, zp: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor) -> _SigmoidLine:
        """phi'(a) and phi''(a) along logits z + a zp, with the penalty's p1 + a p2 and p2."""
        A, B, szp, szp2 = self.scratch(z)
        torch.mul(self.S, zp, out=szp)
        torch.mul(szp, zp, out=szp2)
        tszp = colsum(torch.mul(self.ST, zp, out=A), self.dtype)
        return _SigmoidLine(z, zp, szp, szp2, tszp, p1=p1, p2=p2, dtype=self.dtype, scratch=(A, B))


class _Softmax:
    """One problem: sum_i w_i CE(x_i W^T + b, y_i) + l2 / 2 (|W|^2 + |b|^2). theta [1, K * (D + 1)]."""

    def __init__(self, X, y, weights, K, l2, dtype, wd):
        self.K, self.D = K, X.shape[1]
        self.dtype, self.wd, self.Xm, self.l2 = dtype, wd, X.to(wd), l2
        self.Y = F.one_hot(y.to(X.device), K).to(wd)
        self.w = weights.to(X.device, wd)
        self.wY = self.w[:, None] * self.Y

    def keep(self, mask: torch.Tensor) -> None:  # one column: the solve ends when it is done
        pass

    def bias_step(self, z: torch.Tensor) -> None:  # the biases are penalised and in theta's one column
        return None

    def logits(self, th: torch.Tensor) -> torch.Tensor:
        th = th.view(self.K, self.D + 1)
        return affine(self.Xm, th[:, :self.D].to(self.wd), th[:, self.D].to(self.wd))

    def penalty(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.l2 * _dot(u, v)

    def objective(self, th: torch.Tensor, z: torch.Tensor):
        dt = self.dtype
        f = (self.w * (torch.logsumexp(z, 1) - (z * self.Y).sum(1))).sum(dtype=dt) + 0.5 * self.penalty(th, th)
        r = (torch.softmax(z, 1) - self.Y) * self.w[:, None]
        g = torch.cat([back(r, self.Xm).to(dt), colsum(r, dt)[:, None]], 1).view(1, -1) + self.l2 * th
        return f.view(1), g

    def line(self, z: torch.Tensor, zp: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor) -> Callable:
        dt = self.dtype
        wzpy, wzp2 = (self.wY * zp).sum(dtype=dt), self.w[:, None] * zp * zp

        def derivatives(a: torch.Tensor):
            P = torch.softmax(z + a.to(self.wd) * zp, 1)
            pz = (P * zp).sum(1)
            d1 = (self.w * pz).sum(dtype=dt) - wzpy + p1 + a * p2
            return d1.view(1), ((P * wzp2).sum(dtype=dt) - (pz * pz * self.w).sum(dtype=dt) + p2).view(1)
        return derivatives


@dataclass
class Curvature:
    """The curvature pairs an L-BFGS solve ended with, per column, oldest first: steps S and gradient changes Y
    [m, C, P] (a zero pair is empty). A next solve of a nearby problem (another L2 strength, a few more rows) can
    start from them instead of from steepest descent."""
    S: torch.Tensor
    Y: torch.Tensor

    @classmethod
    def empty(cls, columns: int, like: "Curvature") -> "Curvature":
        shape = (like.S.shape[0], columns, *like.S.shape[2:])
        return cls(like.S.new_zeros(shape), like.Y.new_zeros(shape))

    def keep(self, cols: torch.Tensor) -> "Curvature":
        return Curvature(self.S[:, cols], self.Y[:, cols])

    def put(self, cols: torch.Tensor, other: "Curvature") -> None:
        self.S[:, cols], self.Y[:, cols] = other.S, other.Y

    @classmethod
    def put_into(cls, into: "Curvature | None", columns: int, cols: torch.Tensor, other: "Curvature") -> "Curvature":
        """`into` with `other`'s pairs at columns `cols`; made empty for `columns` columns on first use (the pairs'
        shape is known only once a solve has returned them)."""
        into = cls.empty(columns, other) if into is None else into
        into.put(cols, other)
        return into

    def reweighted(self, delta: torch.Tensor, D: int) -> "Curvature":
        """The same steps for the logistic objective with each column's L2 strength changed by delta [C]: a
        gradient change is the data term's plus l2 * s over the weights (the first D entries), so it moves by
        delta * s exactly."""
        Y = self.Y.clone()
        Y[..., :D] += delta.to(Y)[None, :, None] * self.S[..., :D]
        return Curvature(self.S, Y)


def _with_bias(problem, theta: torch.Tensor, z: torch.Tensor, active: torch.Tensor | None):
    """theta and its logits z with each (active) column's bias moved to its optimum for the column's weights
    (`bias_step`; problems whose bias is not a free coordinate return None). Every iterate is then optimal in
    the bias, and the quasi-Newton steps work on the weights: the curvature pairs stay pairs of actual iterates.
    z is moved in place."""
    d = problem.bias_step(z)
    if d is None:
        return theta, z
    if active is not None:
        d = torch.where(active, d, torch.zeros_like(d))
    theta = theta.clone()
    theta[:, -1] += d
    return theta, z.add_(d.to(z.dtype))  # z is the solve's own new array


def _curvature_ok(sy: torch.Tensor, yy: torch.Tensor) -> torch.Tensor:
    """The curvature condition a pair (s, y) must pass to be used: s.y > 0, up to rounding relative to |y|^2."""
    return sy > 1e-10 * yy.clamp_min(1e-300)


def _lbfgs(problem, theta: torch.Tensor, *, tol: float, max_iter: int, memory: int, progress: Callable | None,
           stage: str, curvature: Curvature | None = None, start: tuple | None = None, hand_back: bool = False):
    """Minimise every column of `problem` (a convex objective over theta [C, P]) until max |grad| <= tol. Every
    scalar kept (curvature pairs, step, bracket, convergence) is per column; columns that converge leave the working
    set, so the work shrinks as the solve goes on. The line search is exact on phi(a) = f(theta + a p): the logits
    move linearly along p, so each 1-D Newton step is the problem's elementwise `line` work, no matmul.
    `curvature`: pairs to start from (each column's own). `start`: (logits, f, gradient) at theta, whose bias is
    already optimal (no pass over the rows to begin). Returns (theta, iterations, max |grad|, f, the final
    Curvature, and with `hand_back` the final logits [n, C] and gradients [C, P], else None, None), each per column."""
    dev, dtype = theta.device, theta.dtype
    C = theta.shape[0]
    out_theta = theta.clone()
    out_iter = torch.zeros(C, dtype=torch.long, device=dev)
    out_g = torch.zeros(C, dtype=dtype, device=dev)
    out_f = torch.zeros(C, dtype=dtype, device=dev)
    cols = torch.arange(C, device=dev)  # the working set: original column of each working column
    if start is None:
        z = problem.logits(theta)
        theta, z = _with_bias(problem, theta, z, None)
        f, g = problem.objective(theta, z)
    else:
        z, f, g = start[0].contiguous(), start[1], start[2]  # read, never written: the loop makes new logits
    out_z = torch.empty_like(z) if hand_back else None
    out_grad = torch.empty_like(g) if hand_back else None
    m = memory
    gamma = torch.ones(C, dtype=dtype, device=dev)
    if curvature is None:
        Sh = torch.zeros(m, *theta.shape, dtype=dtype, device=dev)  # s_k = step, y_k = gradient change, per column
        Yh = torch.zeros_like(Sh)
        rho = torch.zeros(m, C, dtype=dtype, device=dev)  # 0 marks an empty or skipped pair (contributes nothing)
    else:  # slot m - 1 is the newest pair; the first one written (k = 0) replaces the oldest
        Sh, Yh = curvature.S.to(dev, dtype).clone(), curvature.Y.to(dev, dtype).clone()
        sy, yy = _dot(Sh, Yh), _dot(Yh, Yh)
        ok = _curvature_ok(sy, yy)
        rho = torch.where(ok, 1 / sy.clamp_min(1e-300), torch.zeros_like(sy))
        gamma = torch.where(ok[-1], sy[-1] / yy[-1].clamp_min(1e-300), gamma)
    # the pairs handed back only start a later solve (any pair satisfying the curvature test is valid there):
    # float32 halves what a caller keeps per column
    out_S, out_Y = torch.zeros_like(Sh, dtype=torch.float32), torch.zeros_like(Yh, dtype=torch.float32)
    it = torch.zeros(C, dtype=torch.long, device=dev)
    # Also stop a column that is already near tol and whose objective has not moved for 3 iterations in a row
    # (scipy's ftol test, made robust to one slow step): float32 work cannot push every gradient below ~1e-5, and
    # without this such a column would run to max_iter.
    ftol = 4 * torch.finfo(problem.wd).eps
    flat = torch.zeros(C, dtype=torch.long, device=dev)
    finished = torch.zeros(C, dtype=torch.bool, device=dev)
    k = 0
    for step in range(max_iter + 1):
        gnorm = g.abs().amax(1)
        done = (gnorm <= tol) | (it >= max_iter) | ((flat >= 3) & (gnorm <= 10 * tol))
        if done.any():  # write finished columns out; shrink the working set when a quarter has finished
            new = done & ~finished  # (a finished column stays put, but its memory would fill with empty pairs)
            if new.any():
                idx = cols[new]
                out_theta[idx], out_iter[idx], out_g[idx], out_f[idx] = theta[new], it[new], gnorm[new], f[new]
                if hand_back:
                    out_z[:, idx], out_grad[idx] = z[:, new], g[new]
                age = [(k + j) % m for j in range(m)]  # oldest first
                out_S[:, idx], out_Y[:, idx] = Sh[:, new][age].float(), Yh[:, new][age].float()
                finished = done
            if done.all():
                break
            if done.sum() * 4 >= len(cols) or step == max_iter:
                keep = ~done
                cols, theta, z, f, g, it, gamma = cols[keep], theta[keep], z[:, keep], f[keep], g[keep], it[keep], gamma[keep]
                flat, done, finished = flat[keep], done[keep], finished[keep]
                Sh, Yh, rho = Sh[:, keep], Yh[:, keep], rho[:, keep]
                problem.keep(keep)
        active = ~done
        if progress:  # the bar counts converged columns: it ends where the solve ends
            progress(stage, int(C - active.sum()), C, iteration=step)
        # two-loop recursion, newest pair first; empty pairs have rho = 0 (fused ops: on small problems the
        # solve's time is mostly the number of tensor operations per iteration)
        q = g.clone()
        alpha = []
        for j in range(m):
            i = (k - 1 - j) % m
            a = (rho[i] * _dot(Sh[i], q))[:, None]
            q.addcmul_(a, Yh[i], value=-1)
            alpha.append((i, a))
        r = gamma[:, None] * q
        for i, a in reversed(alpha):
            r.addcmul_(a - rho[i, :, None] * _dot(Yh[i], r)[:, None], Sh[i])
        p = -r
        gp = _dot(g, p)
        bad = gp >= 0  # not a descent direction (rounding): restart that column from steepest descent
        if bad.any():
            p[bad] = -g[bad]
            rho[:, bad] = 0
            gamma[bad] = 1
        p = p * active[:, None]
        zp = problem.logits(p)
        line = problem.line(z, zp, problem.penalty(theta, p), problem.penalty(p, p))
        a, lo = _newton(line, torch.ones_like(f), torch.zeros_like(f), torch.full_like(f, float("inf")))
        a = torch.where(active, a, torch.zeros_like(a))
        new_theta = theta + a[:, None] * p
        new_z = torch.addcmul(z, a.to(zp.dtype), zp)
        new_theta, new_z = _with_bias(problem, new_theta, new_z, active)
        new_f, new_g = problem.objective(new_theta, new_z)
        # The step minimises a convex function along p, so f cannot rise beyond rounding; where it does (a bracket
        # that failed to close), retry at lo, the longest step known to descend (phi'(lo) < 0), and failing that
        # keep the old point and restart that column's memory.
        worse = active & (new_f > f + 1e-6 * f.abs() + 1e-12)
        if worse.any():
            a = torch.where(worse, lo, a)
            new_theta = theta + a[:, None] * p
            new_z = torch.addcmul(z, a.to(zp.dtype), zp)
            new_f, new_g = problem.objective(new_theta, new_z)
            worse = active & (new_f > f + 1e-6 * f.abs() + 1e-12)
        if worse.any():
            new_theta, new_f = torch.where(worse[:, None], theta, new_theta), torch.where(worse, f, new_f)
            new_g, new_z = torch.where(worse[:, None], g, new_g), torch.where(worse, z, new_z)
            rho[:, worse], gamma[worse] = 0, 1
        sk, yk = new_theta - theta, new_g - g
        sy, yy = _dot(sk, yk), _dot(yk, yk)
        ok = active & ~worse & _curvature_ok(sy, yy)  # per column
        Sh[k % m], Yh[k % m] = sk, yk
        rho[k % m] = torch.where(ok, 1 / sy.clamp_min(1e-300), torch.zeros_like(sy))
        gamma = torch.where(ok, sy / yy.clamp_min(1e-300), gamma)
        k += 1
        still = active & ((f - new_f) <= ftol * torch.maximum(f.abs(), new_f.abs()))
        flat = torch.where(still, flat + 1, torch.where(active, 0, flat))  # a finished column stays finished
        theta, f, g, z = new_theta, new_f, new_g, new_z
        it = it + active.long()
    if progress:
        progress(stage, C, C, iteration=int(out_iter.max()) if C else 0)
    return out_theta, out_iter, out_g, out_f, Curvature(out_S, out_Y), out_z, out_grad


@dataclass
class SolveState:
    """Where a logistic solve ended, on its rows: the logits [n, C] and the data term's value [C] and gradient
    [C, D + 1] (without the penalty). A next solve of the same rows from the same weights at other L2 strengths (the
    path's next strength) starts from it without a pass over the rows: its objective there is this plus its own
    penalty, and each bias is already optimal (the penalty does not touch it)."""
    logits: torch.Tensor
    loss: torch.Tensor
    grad: torch.Tensor

    def keep(self, cols: torch.Tensor | slice) -> "SolveState":
        return SolveState(self.logits[:, cols], self.loss[cols], self.grad[cols])


@dataclass
class LogisticSolution:
    weight: torch.Tensor  # [C, D]
    bias: torch.Tensor  # [C]
    iterations: torch.Tensor  # [C] long
    grad_norm: torch.Tensor  # [C] max-abs gradient at the answer
    loss: torch.Tensor  # [C] objective at the answer
    seconds: float
    curvature: Curvature  # the final curvature pairs: a start for a nearby solve
    state: SolveState | None = None  # with keep_state: where it ended on its rows (`SolveState`)


def logistic_lbfgs(X: torch.Tensor, T: torch.Tensor, pos_weight: torch.Tensor, l2: torch.Tensor, *,
                   init: tuple[torch.Tensor, torch.Tensor] | None = None, curvature: Curvature | None = None,
                   start: SolveState | None = None, keep_state: bool = False,
                   center: tuple[torch.Tensor, torch.Tensor] | None = None, tol: float = 1e-4, max_iter: int = 500,
                   memory: int = 10, dtype: torch.dtype = torch.float64, matmul_dtype: torch.dtype = torch.float32,
                   block: int = 0, progress: Callable | None = None, stage: str = "solve") -> LogisticSolution:
    """Minimise, for every column c independently,

        f_c(w, b) = mean_i s_ic * BCE(x_i . w + b, t_ic) + l2_c / 2 * |w|^2,   s_ic = pos_weight_c if t_ic else 1

    (exactly `BCEWithLogitsLoss(pos_weight=...)` with mean reduction, plus L2 on the weights, not the bias), until
    max |grad f_c| <= tol. This is scikit-learn's `LogisticRegression(C=1 / (l2 * n))` with the pos-weights as
    sample_weight, and tol has the same meaning as its tol (1e-4 is its default). X [n, D], T [n, C] in {0, 1},
    pos_weight [C], l2 [C]. All columns share two GEMMs per iteration (the logits of the directions X @ P and the
    gradient X^T R). center = (mean, std): the problem's rows are (X - mean) / std, without a standardised copy of X
    (w and b are then the weights on standardised rows).

    Precision: the iterate, gradients, curvature pairs and per-column scalars are float64 (`dtype`): in float32 the
    gradient of weakly regularised heads stalls from rounding. The [n, C] arrays (logits, their change along the
    step, weights, residuals) and the two GEMMs per iteration are `matmul_dtype`, float32 by default: they are most
    of the cost, and their rounding (~1e-7 relative) is far below the default tol. matmul_dtype=torch.float64
    solves to 1e-10 (the scikit-learn equivalence tests use it).

    block > 0: at most that many columns at a time (the columns are independent: the same answers), so the [n, C]
    arrays stay a size the caches hold and the memory bounded. `start` (with `init` its weights): a previous solve's
    `SolveState` on these rows (`keep_state` returns this solve's).
    """
    t0 = time.perf_counter()
    D, C = X.shape[1], T.shape[1]
    if 0 < block < C:
        parts = []
        for s in range(0, C, block):
            c = slice(s, s + block)
            tell = progress and (lambda st, done, total, s=s, **kw: progress(st, s + done, C, **kw))
            parts.append(logistic_lbfgs(
                X, T[:, c], pos_weight[c], l2[c], init=None if init is None else (init[0][c], init[1][c]),
                curvature=None if curvature is None else curvature.keep(c),
                start=None if start is None else start.keep(c), keep_state=keep_state, center=center, tol=tol,
                max_iter=max_iter, memory=memory, dtype=dtype, matmul_dtype=matmul_dtype, progress=tell, stage=stage))
        joined = lambda objs, key, dim=0: torch.cat([getattr(o, key) for o in objs], dim)  # noqa: E731
        state = SolveState(*(joined([p.state for p in parts], k, d) for k, d in
                             (("logits", 1), ("loss", 0), ("grad", 0)))) if keep_state else None
        curv = [p.curvature for p in parts]
        return LogisticSolution(*(joined(parts, k) for k in ("weight", "bias", "iterations", "grad_norm", "loss")),
                                time.perf_counter() - t0, Curvature(joined(curv, "S", 1), joined(curv, "Y", 1)), state)
    theta = torch.zeros(C, D + 1, dtype=dtype, device=X.device)
    if init is not None:
        theta[:, :D], theta[:, D] = init[0].to(X.device, dtype), init[1].to(X.device, dtype)
    problem = _Logistic(X, T, pos_weight, l2, dtype, matmul_dtype, center)
    begin = None
    if start is not None:  # the objective at the same weights is the data term's plus this solve's penalty
        g = start.grad.to(X.device, dtype).clone()
        g[:, :D] += problem.l2[:, None] * theta[:, :D]
        begin = (start.logits, start.loss.to(X.device, dtype) + 0.5 * problem.penalty(theta, theta), g)
    th, it, g, f, curv, Z, G = _lbfgs(problem, theta, tol=tol, max_iter=max_iter, memory=memory, progress=progress,
                                      stage=stage, curvature=curvature, start=begin, hand_back=keep_state)
    state = None
    if keep_state:  # the data term's part: the next solve adds its own penalty
        G[:, :D] -= l2.to(G)[:, None] * th[:, :D]
        state = SolveState(Z, f - 0.5 * l2.to(f) * _dot(th[:, :D], th[:, :D]), G)
    return LogisticSolution(th[:, :D], th[:, D], it, g, f, time.perf_counter() - t0, curv, state)


def softmax_lbfgs(X: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, K: int, l2: float, *,
                  init: torch.Tensor | None = None, tol: float = 1e-5, max_iter: int = 1000, memory: int = 10,
                  dtype: torch.dtype = torch.float64, matmul_dtype: torch.dtype = torch.float32
                  ) -> tuple[torch.Tensor, int, float]:
    """Minimise f(theta) = sum_i weights_i * CE(x_i W^T + b, y_i) + l2 / 2 * (|W|^2 + |b|^2), theta = [W | b]
    [K, D + 1]: one multinomial logistic regression (the softmax gate and baseline), by the same L-BFGS core as
    `logistic_lbfgs` with the whole theta as one column. The bias is penalised too, so a class without rows keeps a
    finite bias and the problem stays strictly convex: one optimum, whatever `init`. Returns (theta, iterations,
    max |gradient|). Not torch.optim.LBFGS: constructing any torch.optim optimizer imports torch._dynamo, which
    takes longer than the whole fit."""
    D = X.shape[1]
    theta = torch.zeros(K, D + 1, dtype=dtype, device=X.device) if init is None else init.to(X.device, dtype)
    problem = _Softmax(X, y, weights, K, l2, dtype, matmul_dtype)
    th, it, g = _lbfgs(problem, theta.reshape(1, -1).clone(), tol=tol, max_iter=max_iter, memory=memory,
                       progress=None, stage="")[:3]
    return th.view(K, D + 1), int(it[0]), float(g[0])


def weighted_bce(z: torch.Tensor, T: torch.Tensor, pos_weight: torch.Tensor) -> torch.Tensor:
    """Mean pos-weighted BCE of each column [n, C] -> [C] (the data term of the objective above), T in {0, 1}.
    Outside autograd it is written as the objective writes it, softplus(z) + t ((pw - 1) softplus(z) - pw z), with
    the vectorised `softplus`: torch's BCE-with-logits computes log1p elementwise without vectorising it on the
    CPU, and the validation losses of every head at every strength of the path were seconds of a large fit.
    Under autograd (the training loss of MLP heads), torch's own."""
    t, pw = T.to(z.dtype), pos_weight.to(z.dtype)
    if z.requires_grad:
        return F.binary_cross_entropy_with_logits(z, t, pos_weight=pw, reduction="none").mean(0)
    sp = softplus(z)
    return sp.addcmul_(t, torch.addcmul(-pw * z, pw - 1, sp)).mean(0)


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
