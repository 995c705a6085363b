"""The solvers (ovr/learn/solver.py) against scikit-learn on the same problems: the exact per-column L-BFGS for
logistic heads and the multinomial one, per-column convergence, float32 work reaching the float64 optimum."""
import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from ovr.learn.solver import SPLIT_ROWS, Curvature, _Logistic, affine, back, centered, logistic_lbfgs, softmax_lbfgs

from test_estimators import blobs  # noqa: F401  (the same data helper)


@pytest.mark.parametrize("l2", [1e-4, 1e-2, 1.0])
def test_exact_solver_matches_scikit_learn(l2):
    """Same standardised features, pos-weights as sample_weight, C = 1 / (l2 * n): same weights and predictions."""
    X, y = blobs(5, 60, 20, seed=3)
    X = StandardScaler().fit_transform(X)
    n, K = len(y), 5
    T = (y[:, None] == np.arange(K)).astype(float)
    pw = (n - T.sum(0)) / T.sum(0)
    sol = logistic_lbfgs(torch.tensor(X), torch.tensor(T), torch.tensor(pw), torch.full((K,), l2), tol=1e-10,
                         matmul_dtype=torch.float64,
                         max_iter=5000)
    assert (sol.grad_norm <= 1e-8).all()
    for c in range(K):
        sk = LogisticRegression(C=1 / (l2 * n), tol=1e-10, max_iter=10000).fit(
            X, T[:, c], sample_weight=np.where(T[:, c] > 0, pw[c], 1.0))
        w = sol.weight[c].numpy()
        assert np.abs(w - sk.coef_[0]).max() <= 1e-4 * np.abs(sk.coef_[0]).max()
        assert sol.bias[c].item() == pytest.approx(sk.intercept_[0], abs=1e-4 * max(1, abs(sk.intercept_[0])))
        z = X @ w + sol.bias[c].item()
        assert np.array_equal(z > 0, sk.decision_function(X) > 0)


def test_converged_columns_stop_changing_while_others_go_on():
    X, y = blobs(3, 50, 10, seed=4)
    T = torch.tensor((y[:, None] == np.arange(3)).astype(float)).repeat(1, 2)
    l2 = torch.tensor([10.0, 10.0, 10.0, 1e-4, 1e-4, 1e-4])  # strong L2 converges in a few steps, weak in many
    sol = logistic_lbfgs(torch.tensor(X), T, torch.ones(6), l2, tol=1e-9, matmul_dtype=torch.float64)
    assert sol.iterations[:3].max() < sol.iterations[3:].min()
    alone = logistic_lbfgs(torch.tensor(X), T[:, :1], torch.ones(1), l2[:1], tol=1e-9, matmul_dtype=torch.float64)
    assert alone.iterations[0] == sol.iterations[0]
    assert torch.allclose(alone.weight[0], sol.weight[0], atol=1e-10)


def test_default_float32_matmuls_reach_the_same_optimum():
    """The default (float32 GEMMs, float64 state) against an all-float64 solve, at the default tolerance."""
    X, y = blobs(5, 60, 30, seed=5)
    T = torch.tensor((y[:, None] == np.arange(5)).astype(float))
    l2 = torch.tensor([1e-4, 1e-3, 1e-2, 1e-1, 1.0])
    a = logistic_lbfgs(torch.tensor(X), T, torch.ones(5), l2)
    b = logistic_lbfgs(torch.tensor(X), T, torch.ones(5), l2, tol=1e-10, matmul_dtype=torch.float64)
    assert (a.grad_norm <= 1e-4).all() and (a.iterations < 500).all()
    assert torch.allclose(a.loss, b.loss, rtol=1e-3, atol=2e-4)  # objective at the optimum, to the tolerance
    Xt = torch.tensor(X)
    assert torch.equal(Xt @ a.weight.T + a.bias > 0, Xt @ b.weight.T + b.bias > 0)


def test_a_column_stopped_on_a_flat_objective_stays_stopped_while_others_go_on():
    """float32 work cannot take every gradient below a tol this small: such a column stops once its objective has
    not moved for 3 iterations near tol. It stays stopped while the columns beside it go on (it once resumed when
    they kept it in the working set: the bar counted it finished while it went on, and its answer depended on how
    long its neighbours ran)."""
    X, y = blobs(3, 60, 12, seed=1)
    T = torch.tensor((y[:, None] == np.arange(3)).astype(np.float32))
    T = torch.cat([T[:, [2]], T, T], 1)
    l2 = torch.tensor([1e-2] + [1e-5] * 6)  # weakly regularised columns run long, one to max_iter
    calls: list[tuple[int, int]] = []
    sol = logistic_lbfgs(torch.tensor(X, dtype=torch.float32), T, torch.ones(7), l2, tol=1e-7, max_iter=28,
                         progress=lambda stage, n, total, iteration: calls.append((iteration, n)))
    stopped_flat = (sol.grad_norm > 1e-7) & (sol.iterations < 28)
    assert stopped_flat.sum() >= 2 and (sol.iterations == 28).any()  # the case this test is about
    # at every iteration the bar counts exactly the columns whose solve ended there or before
    assert all(n == int((sol.iterations <= step).sum()) for step, n in calls[:-1]) and calls[-1][1] == 7


def test_a_column_started_far_off_with_saturated_logits_still_converges():
    """Found on the photo set: a weakly regularised head refit from a warm start with saturated, wrong logits made
    no progress for 500 iterations (gradient 0.8) because 4 line-search steps could not reach a usable step."""
    X, y = blobs(2, 60, 200, seed=7)
    X = StandardScaler().fit_transform(X)
    T = torch.tensor((y == 1).astype(float))[:, None]
    w0 = -500 * torch.tensor(X[y == 1].mean(0) - X[y == 0].mean(0))[None]  # confidently wrong: |logits| ~ 100s
    sol = logistic_lbfgs(torch.tensor(X), T, torch.ones(1), torch.tensor([1e-4]), init=(w0, torch.zeros(1)))
    assert sol.grad_norm[0] <= 1e-4 and sol.iterations[0] < 500
    assert ((torch.tensor(X) @ sol.weight[0] + sol.bias[0] > 0).numpy() == (y == 1)).all()


@pytest.mark.parametrize("l2", [1e-3, 1e-1])
def test_softmax_solver_matches_scikit_learn(l2):
    """The grown model's gate solver: sum_i w_i CE + l2/2 (|W|^2 + |b|^2) is scikit-learn's multinomial
    LogisticRegression with C = 1 / l2, the weights as sample_weight, and the bias as a penalised constant column."""
    X, y = blobs(4, 40, 12, seed=6)
    X = StandardScaler().fit_transform(X)
    w = np.random.default_rng(0).uniform(0.5, 2.0, len(y))
    w /= w.sum()
    theta, it, g = softmax_lbfgs(torch.tensor(X), torch.tensor(y), torch.tensor(w), 4, l2, tol=1e-10,
                                 matmul_dtype=torch.float64, max_iter=5000)
    assert g <= 1e-8 and it < 5000
    X1 = np.c_[X, np.ones(len(X))]
    sk = LogisticRegression(C=1 / l2, fit_intercept=False, tol=1e-12, max_iter=10000).fit(X1, y, sample_weight=w)
    assert np.abs(theta.numpy() - sk.coef_).max() <= 1e-5 * np.abs(sk.coef_).max()
    # the default float32 work reaches the same answers from far off
    far, _, g32 = softmax_lbfgs(torch.tensor(X), torch.tensor(y), torch.tensor(w), 4, l2, init=30 * theta.flip(0))
    assert g32 <= 1e-4 and np.array_equal((X1 @ far.numpy().T).argmax(1), sk.predict(X1))


def test_fast_softplus_is_softplus():
    from ovr.learn.solver import softplus

    z = torch.cat([torch.linspace(-120, 120, 100001), torch.tensor([0.0, -0.0, 1e-30, -1e-30])])
    for dtype in (torch.float32, torch.float64):
        z64 = z.to(torch.float64)
        ref = z64.clamp_min(0) + torch.log1p(torch.exp(-z64.abs()))  # exact (F.softplus returns z above 20)
        ours = softplus(z.to(dtype)).to(torch.float64)
        assert torch.isfinite(ours).all()
        assert ((ours - ref).abs() <= 2e-7 * (1 + ref)).all() if dtype == torch.float32 else torch.allclose(ours, ref, atol=1e-15, rtol=1e-14)


def test_weighted_bce_is_torchs_pos_weighted_bce_with_and_without_autograd():
    """The validation loss outside autograd (the vectorised softplus form) is torch's BCEWithLogitsLoss with
    pos_weight, per column, and under autograd it is torch's own (MLP heads train on it)."""
    import torch.nn.functional as F

    from ovr.learn.solver import weighted_bce

    g = torch.Generator().manual_seed(0)
    z = torch.randn(500, 6, generator=g, dtype=torch.float64) * 30  # far into both saturated ends
    T = (torch.rand(500, 6, generator=g) < 0.1).float()
    pw = torch.tensor([1.0, 0.5, 3.0, 9.0, 50.0, 1e3])
    ref = F.binary_cross_entropy_with_logits(z, T.double(), pos_weight=pw.double(), reduction="none").mean(0)
    assert torch.allclose(weighted_bce(z, T, pw), ref, rtol=1e-13, atol=0)
    assert torch.allclose(weighted_bce(z.float(), T, pw).double(), ref, rtol=1e-6, atol=0)
    zg = z.clone().requires_grad_(True)
    loss = weighted_bce(zg, T, pw)
    loss.sum().backward()
    assert torch.allclose(loss.detach(), ref) and torch.isfinite(zg.grad).all() and zg.grad.abs().sum() > 0


def test_float32_column_sums_are_within_rounding_of_float64_ones():
    """colsum(exact=False) (torch's float32 cascade reduction, for the Newton derivatives) is within 1e-7 of the
    sum of |A| of the float64 sum at 200,000 rows; exact=True is the float64 sum."""
    from ovr.learn.solver import colsum

    A = torch.rand(200_000, 7, generator=torch.Generator().manual_seed(0)) - 0.5
    exact = A.double().sum(0)
    assert torch.allclose(colsum(A), exact, rtol=1e-12, atol=1e-12) and colsum(A, exact=False).dtype == torch.float64
    assert ((colsum(A, exact=False) - exact).abs() <= 1e-7 * A.abs().double().sum(0)).all()


def test_curvature_pairs_move_to_another_strength_exactly():
    """Curvature.reweighted: a pair (s, y) of the objective at one L2 strength, moved to another, is the pair the
    objective at that strength gives for the same step (the penalty is on the weights, not the bias)."""
    X, y = blobs(3, 40, 8, seed=11)
    X, T = torch.tensor(X), torch.tensor((y[:, None] == np.arange(3)).astype(float))
    theta = torch.randn(3, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    s = torch.randn(3, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def pair(l2):
        p = _Logistic(X, T, torch.ones(3), torch.tensor(l2), torch.float64, torch.float64)
        g0, g1 = (p.objective(t, p.logits(t))[1] for t in (theta, theta + s))
        return g1 - g0

    a, b = [1.0, 0.1, 1e-3], [0.3, 1e-2, 1e-4]
    moved = Curvature(s[None], pair(a)[None]).reweighted(torch.tensor(b) - torch.tensor(a), 8)
    assert torch.allclose(moved.Y[0], pair(b), atol=1e-12)


def test_a_solve_started_from_curvature_pairs_reaches_the_same_answer_sooner():
    """The L2 path's warm start: the answer and curvature pairs at one strength, moved to the next strength of the
    grid, reach the same optimum as a start from the answer alone, in fewer iterations over the path (at the path's
    tolerance; one step of it alone is too small a sample: 14 against 15 once the bias step took most iterations)."""
    X, y = blobs(4, 60, 30, seed=12)
    X = torch.tensor(StandardScaler().fit_transform(X))
    T = torch.tensor((y[:, None] == np.arange(4)).astype(float))
    kw = dict(tol=1e-3, matmul_dtype=torch.float64)
    grid = [1.0, 0.3, 0.1, 0.03, 0.01, 0.003]
    warm = plain = logistic_lbfgs(X, T, torch.ones(4), torch.full((4,), grid[0]), **kw)
    warm_iterations = plain_iterations = 0
    for was, l2 in zip(grid, grid[1:]):
        nxt = torch.full((4,), l2)
        warm = logistic_lbfgs(X, T, torch.ones(4), nxt, init=(warm.weight, warm.bias),
                              curvature=warm.curvature.reweighted(nxt - was, 30), **kw)
        plain = logistic_lbfgs(X, T, torch.ones(4), nxt, init=(plain.weight, plain.bias), **kw)
        exact = logistic_lbfgs(X, T, torch.ones(4), nxt, tol=1e-10, matmul_dtype=torch.float64)
        assert (warm.grad_norm <= 1e-3).all()
        assert torch.allclose(warm.loss, exact.loss, rtol=1e-3, atol=2e-4)
        assert torch.allclose(plain.loss, exact.loss, rtol=1e-3, atol=2e-4)
        warm_iterations += int(warm.iterations.sum())
        plain_iterations += int(plain.iterations.sum())
    assert warm_iterations < plain_iterations


@pytest.mark.parametrize("rows", [SPLIT_ROWS, SPLIT_ROWS + 1])
def test_one_column_products_split_for_threads_are_the_plain_products(rows):
    """One column over many rows: the logits as two equal columns and the gradient's product as two halves of the
    rows are the plain products (even and odd row counts, a column slice of a wider buffer)."""
    g = torch.Generator().manual_seed(rows)
    X = torch.randn(rows, 9, dtype=torch.float64, generator=g)[:, 1:]
    W, b, R = torch.randn(1, 8, dtype=torch.float64), torch.randn(1, dtype=torch.float64), torch.randn(rows, 1)
    assert torch.allclose(affine(X, W, b), X @ W.T + b, rtol=0, atol=1e-10)
    assert torch.allclose(back(R.double(), X), R.double().T @ X, rtol=0, atol=1e-9)


def test_a_solve_on_raw_rows_with_their_standardisation_is_the_solve_on_standardised_rows():
    """`center`: the rows standardised inside the two products (no standardised copy) give the same heads as a solve
    on the standardised copy, also for features far from zero (mean 50 x their spread)."""
    X, y = blobs(3, 50, 12, seed=4)
    X = torch.tensor(X) * 0.1 + 5.0
    mean, std = X.mean(0), X.std(0)
    T = torch.tensor((y[:, None] == np.arange(3)).astype(float))
    kw = dict(tol=1e-9, matmul_dtype=torch.float64, max_iter=2000)
    copy = logistic_lbfgs((X - mean) / std, T, torch.full((3,), 2.0), torch.full((3,), 1e-2), **kw)
    inside = logistic_lbfgs(X, T, torch.full((3,), 2.0), torch.full((3,), 1e-2), center=(mean, std), **kw)
    assert (inside.grad_norm <= 1e-9).all()
    assert torch.allclose(inside.weight, copy.weight, atol=1e-7) and torch.allclose(inside.bias, copy.bias, atol=1e-7)
    w, c = centered(inside.weight, inside.bias, (mean, std))  # the same heads on the raw rows
    assert torch.allclose(X @ w.T + c, (X - mean) / std @ copy.weight.T + copy.bias, atol=1e-6)


def test_blocks_of_columns_give_the_same_columns():
    """block=k solves the columns k at a time (to keep the work arrays a size the caches hold): each column's
    answer, iterations and curvature pairs are the unblocked solve's, and the progress bar still ends at C of C."""
    X, y = blobs(5, 60, 12, seed=7)
    T = torch.tensor((y[:, None] == np.arange(5)).astype(float))
    l2 = torch.tensor([1e-4, 1e-3, 1e-2, 1e-1, 1.0])
    whole = logistic_lbfgs(torch.tensor(X), T, torch.ones(5), l2, tol=1e-8, matmul_dtype=torch.float64)
    seen = []
    part = logistic_lbfgs(torch.tensor(X), T, torch.ones(5), l2, tol=1e-8, matmul_dtype=torch.float64, block=2,
                          progress=lambda stage, done, total, **kw: seen.append((done, total)))
    assert torch.allclose(whole.weight, part.weight, atol=1e-10) and torch.equal(whole.iterations, part.iterations)
    assert torch.allclose(whole.curvature.S, part.curvature.S, atol=1e-6)  # the last steps are rounding-sized
    assert torch.allclose(whole.curvature.Y, part.curvature.Y, atol=1e-6)
    assert seen[-1] == (5, 5) and all(t == 5 for _, t in seen) and max(d for d, _ in seen) == 5
    again = logistic_lbfgs(torch.tensor(X), T, torch.ones(5), l2 * 2, init=(part.weight, part.bias),
                           curvature=part.curvature, tol=1e-8, matmul_dtype=torch.float64, block=3)
    assert (again.grad_norm <= 1e-8).all()


def test_a_solve_from_zero_weights_reads_the_rows_once_an_iteration(monkeypatch):
    """From zero weights the logits are the biases: the solve's first objective needs no product with the rows, so
    a solve of k iterations computes k direction products, and answers as a solve that did the product."""
    import ovr.learn.solver as solver

    X, y = blobs(3, 60, 12, seed=8)
    T = torch.tensor((y[:, None] == np.arange(3)).astype(float))
    calls = []
    real = solver.affine
    monkeypatch.setattr(solver, "affine", lambda X, W, b: calls.append(1) or real(X, W, b))
    sol = logistic_lbfgs(torch.tensor(X), T, torch.ones(3), torch.full((3,), 1e-2), tol=1e-8,
                         matmul_dtype=torch.float64)
    assert len(calls) == int(sol.iterations.max())
    tiny = 1e-300  # not zero: the first logits come from the product
    other = logistic_lbfgs(torch.tensor(X), T, torch.ones(3), torch.full((3,), 1e-2), tol=1e-8,
                           matmul_dtype=torch.float64,
                           init=(torch.full((3, 12), tiny, dtype=torch.float64), torch.zeros(3)))
    assert len(calls) == int(sol.iterations.max()) + int(other.iterations.max()) + 1
    assert torch.allclose(sol.weight, other.weight, atol=1e-9)


def test_every_iterate_has_its_optimal_bias():
    """A rare class with a large pos_weight: the bias's curvature is far from the weights', and the quasi-Newton
    steps left its gradient the last to converge (it set the iteration count of a new class's head over 100,000
    rows: 5 and 7 iterations, then 2 and 2). Each iterate now has the bias that is optimal for its weights."""
    X, y = blobs(6, 200, 40, seed=3)
    rare = np.concatenate([np.flatnonzero(y != 5), np.flatnonzero(y == 5)[:8]])  # 8 positives of 1,008 rows
    X = torch.tensor(StandardScaler().fit_transform(X[rare]))
    T = torch.tensor((y[rare][:, None] == np.arange(6)).astype(float))
    pw = (len(T) - T.sum(0)) / T.sum(0)
    for max_iter in (1, 2, 500):
        sol = logistic_lbfgs(X, T, pw, torch.full((6,), 1e-2), tol=1e-4, max_iter=max_iter,
                             matmul_dtype=torch.float64)
        p = _Logistic(X, T, pw, torch.full((6,), 1e-2), torch.float64, torch.float64)
        th = torch.cat([sol.weight, sol.bias[:, None]], 1)
        g = p.objective(th, p.logits(th))[1]
        assert g[:, -1].abs().max() < 1e-9  # the bias's gradient, at every iterate the solve stops at
    assert (sol.grad_norm <= 1e-4).all()


def test_newton_narrowed_to_the_moving_columns_finds_the_same_roots(monkeypatch):
    """The line search and the bias step work on the columns still moving once at most half are (on large
    arrays): the same steps, biases and solves as evaluating every column to the end."""
    import ovr.learn.solver as S

    g = torch.Generator().manual_seed(4)
    z, v = torch.randn(3000, 12, generator=g) * 3, torch.randn(3000, 12, generator=g)
    w = torch.rand(3000, 12, generator=g) / 3000
    v[:, :6] *= 0.01  # half the columns settle at once, the rest move far
    c, zero = S.colsum(w * (torch.rand(3000, 12, generator=g) < 0.3)), torch.zeros(12, dtype=torch.float64)
    inf = torch.full_like(zero, float("inf"))

    def roots(limit):
        monkeypatch.setattr(S, "NARROW_ELEMENTS", limit)
        line = S._SigmoidLine(z, v, w * v, w * v * v, c, p1=zero, p2=zero + 1e-3, dtype=torch.float64)
        narrowed = []
        line.narrow = (lambda f: lambda cols: narrowed.append(len(cols)) or f(cols))(line.narrow)
        return S._newton(line, torch.ones(12, dtype=torch.float64), zero.clone(), inf.clone()), narrowed

    (a_all, lo_all), never = roots(1 << 60)
    (a_nar, lo_nar), narrowed = roots(0)
    assert never == [] and narrowed and narrowed[0] <= 6  # it narrowed, to at most half the columns
    assert torch.allclose(a_nar, a_all, rtol=1e-6) and torch.equal(lo_nar <= a_nar, torch.ones(12, dtype=torch.bool))
    X, y = blobs(4, 60, 10, seed=2)
    X, T = torch.tensor(X, dtype=torch.float32), torch.tensor((y[:, None] == np.arange(4)).astype(np.float32))
    sols = []
    for limit in (1 << 60, 0):
        monkeypatch.setattr(S, "NARROW_ELEMENTS", limit)
        sols.append(logistic_lbfgs(X, T, torch.full((4,), 3.0), torch.full((4,), 1e-3, dtype=torch.float64),
                                   tol=1e-9, matmul_dtype=torch.float64))
    assert (sols[1].grad_norm <= 1e-9).all() and torch.allclose(sols[0].weight, sols[1].weight, atol=1e-7)


def test_a_solve_from_the_previous_strengths_state_reads_no_rows_to_begin(monkeypatch):
    """The path's next strength starts from where the last one ended (`SolveState`: its logits and the data term's
    value and gradient): no product with the rows before the first step, no gradient product either, and the same
    answer, iterations and handed-back state as a solve that recomputed them (in blocks of columns too)."""
    import ovr.learn.solver as solver

    X, y = blobs(4, 60, 12, seed=9)
    X, T = torch.tensor(X), torch.tensor((y[:, None] == np.arange(4)).astype(float))
    kw = dict(tol=1e-9, matmul_dtype=torch.float64, keep_state=True)
    first = logistic_lbfgs(X, T, torch.full((4,), 3.0), torch.full((4,), 1e-1, dtype=torch.float64), **kw)
    weaker = torch.full((4,), 1e-3, dtype=torch.float64)
    pairs = first.curvature.reweighted(weaker - 1e-1, 12)
    products = []
    real_affine, real_back = solver.affine, solver.back
    monkeypatch.setattr(solver, "affine", lambda *a: products.append("logits") or real_affine(*a))
    monkeypatch.setattr(solver, "back", lambda *a: products.append("gradient") or real_back(*a))
    fresh = logistic_lbfgs(X, T, torch.full((4,), 3.0), weaker, init=(first.weight, first.bias), curvature=pairs, **kw)
    begin = products[:2]
    products.clear()
    for block in (0, 3):
        warm = logistic_lbfgs(X, T, torch.full((4,), 3.0), weaker, init=(first.weight, first.bias),
                              curvature=pairs, start=first.state, block=block, **kw)
        assert torch.allclose(warm.weight, fresh.weight, atol=1e-9) and torch.equal(warm.iterations, fresh.iterations)
        assert torch.allclose(warm.state.logits, fresh.state.logits, atol=1e-9)
        assert torch.allclose(warm.state.grad, fresh.state.grad, atol=1e-9)
        assert torch.allclose(warm.state.loss, fresh.state.loss, rtol=1e-12)
    assert begin == ["logits", "gradient"]  # the fresh solve's first two products: its start
    it = fresh.iterations  # a direction's logits and a gradient an iteration, per block, nothing to begin
    assert len(products) == 2 * int(it.max()) + 2 * (int(it[:3].max()) + int(it[3:].max()))
    z = torch.addmm(fresh.bias, X, fresh.weight.T)  # the handed-back logits are the answer's
    assert torch.allclose(fresh.state.logits, z, atol=1e-9)
