import numpy as np
import pytest
import torch

from ovr.learn import aggregate
from ovr.learn.estimators import OvRClassifier, SoftmaxClassifier
from ovr.learn.heads import SEARCH_TOL, fit_ovr_heads, init_linear, stacked_logits
from ovr.learn.solver import adam_columns, weighted_bce


def blobs(n_classes=5, n=40, d=16, seed=0):
    g = np.random.default_rng(seed)
    centers = g.normal(0, 3, (n_classes, d))
    y = np.repeat(np.arange(n_classes), n)
    X = centers[y] + g.normal(0, 1, (len(y), d))
    return torch.tensor(X, dtype=torch.float32), torch.tensor(y)


FAST = dict(head="linear", hidden=8, epochs=30, lr=1e-2, batch_size=32, patience=5, l2_grid=(1e-3, 1e-1), pos_weight=True,
            seed=0)


def onehot(y, K):
    return (y[:, None] == torch.arange(K)).float()


def fit(X, y, Xv, yv, targets, names, **kw):
    K = int(y.max()) + 1
    T = onehot(y, K)[:, targets]
    Tv = onehot(yv, K)[:, targets] if Xv is not None else None
    return fit_ovr_heads(X, T, Xv, Tv, names, **{**FAST, **kw})


@pytest.mark.parametrize("head,search", [("linear", "path"), ("linear", "sweep"), ("mlp", "path")])
def test_head_alone_equals_head_in_a_stack_of_100(head, search):
    X, y = blobs(100, 6, 12, seed=1)
    Xv, yv = blobs(100, 2, 12, seed=2)
    names = [f"class{i}" for i in range(100)]
    kw = dict(head=head, seed=7, epochs=10, l2_search=search, l2_grid=(1e-3, 1e-2, 1e-1, 1.0))
    alone = fit(X, y, Xv, yv, [42], [names[42]], **kw)[0]
    stack = fit(X, y, Xv, yv, list(range(100)), names, **kw)
    # Linear heads: the solver's float32 GEMMs round a one-column product differently from a 100-column one
    # (float64 solves agree to 1e-10: test_estimators.py); every decision is per column.
    atol = 1e-4 if head == "linear" else 1e-5
    for k in alone.params:
        assert torch.allclose(alone.params[k], stack[42].params[k], atol=atol), k
    assert alone.l2 == stack[42].l2 and abs(alone.iterations - stack[42].iterations) <= 1
    # order of the other classes does not matter either
    rev = fit(X, y, Xv, yv, list(range(99, -1, -1)), names[::-1], **kw)
    w = "weight" if head == "linear" else "w1"
    assert torch.allclose(rev[99 - 42].params[w], stack[42].params[w], atol=atol)


def test_seed_changes_heads():
    X, y = blobs()
    a = fit(X, y, None, None, [0], ["a"], head="mlp", seed=1)[0]
    b = fit(X, y, None, None, [0], ["a"], head="mlp", seed=2)[0]
    assert not torch.allclose(a.params["w1"], b.params["w1"])
    # linear heads are solved exactly: the seed cannot matter
    a = fit(X, y, None, None, [0], ["a"], seed=1)[0]
    b = fit(X, y, None, None, [0], ["a"], seed=2)[0]
    assert torch.equal(a.params["weight"], b.params["weight"])


def test_pos_weight_is_negatives_over_positives_and_raises_recall():
    X, y = blobs(8, 30, 4, seed=3)  # hard: 4 dims, 8 classes -> one vs seven, imbalanced
    fits = fit(X, y, None, None, [0], ["c0"])
    assert fits[0].positives == 30 and fits[0].negatives == 210 and fits[0].pos_weight == pytest.approx(7.0)
    est = {k: v for k, v in FAST.items() if k != "pos_weight"}
    on = OvRClassifier(**est, device="cpu").fit(X, y)
    off = OvRClassifier(**est, pos_weight=False, device="cpu").fit(X, y)
    recall = lambda m: ((m.confidences(X) > 0.5) & (y[:, None].numpy() == np.arange(8))).sum() / len(y)  # noqa: E731
    assert recall(on) > recall(off)
    assert off.model_.records["0"].pos_weight == 1.0


def test_early_stopping_is_per_head_and_keeps_best_weights():
    X, y = blobs(4, 20, 8)
    Xv, yv = blobs(4, 10, 8, seed=5)
    g = torch.Generator().manual_seed(0)
    noisy = torch.where(torch.rand(len(y), generator=g) < 0.3, torch.randint(0, 4, (len(y),), generator=g), y)
    T = (noisy[:, None] == torch.arange(4)).float()  # label noise: heads start to overfit at different epochs
    Tv = (yv[:, None] == torch.arange(4)).float()
    seen = []
    from ovr.learn.heads import autograd_grad
    res = adam_columns(init_linear([0, 1, 2, 3], 8), autograd_grad(weighted_bce), weighted_bce, X, T, Xv, Tv,
                       l2=torch.zeros(4), extra=torch.ones(4), logits_fn=stacked_logits, epochs=300, lr=0.003, batch_size=16,
                       patience=3, seed=0, progress=lambda s, d, t, **kw: seen.append(kw["training"]))
    assert res.epochs_run < 300  # all stopped before the limit
    assert len(set(res.best_epoch.tolist())) > 1  # stopped at different epochs
    assert seen == sorted(seen, reverse=True) and seen[-1] == 0
    with torch.no_grad():
        best = weighted_bce(Xv @ res.params["weight"].T + res.params["bias"], Tv, torch.ones(4))
    assert torch.allclose(best, res.best_val, atol=1e-5)


def test_l2_grid_picks_per_head():
    X, y = blobs(3, 15, 30, seed=4)
    Xv, yv = blobs(3, 15, 30, seed=4)
    fits = fit(X, y, Xv, yv, [0, 1, 2], ["a", "b", "c"], l2_grid=(1e-3, 10.0))
    assert {f.l2 for f in fits} <= {1e-3, 10.0}
    assert all(f.l2 == 1e-3 for f in fits)  # huge L2 can only hurt on separable blobs


def test_estimators_learn_and_match_sklearn_api():
    X, y = blobs(4, 30, 10)
    names = np.array(["cat", "dog", "eel", "fox"])[y.numpy()]
    kw = dict(epochs=30, lr=1e-2, batch_size=32, patience=5, l2_grid=(1e-3, 1e-1), device="cpu")
    for est in [OvRClassifier(**kw), SoftmaxClassifier(**kw)]:
        assert est.fit(X.numpy(), names) is est
        assert list(est.classes_) == ["cat", "dog", "eel", "fox"]
        assert (est.predict(X.numpy()) == names).mean() > 0.95
        p = est.predict_proba(X.numpy())
        assert p.shape == (120, 4) and np.allclose(p.sum(1), 1)
        assert est.decision_function(X.numpy()).shape == (120, 4)


def test_platt_calibration_reduces_nll_and_thresholds_maximise_f1():
    g = np.random.default_rng(0)
    t = (g.random((500, 2)) < 0.3).astype(float)
    z = (t * 2 - 1) * 6 + g.normal(0, 3, t.shape) + 4  # overconfident and shifted
    a, b = aggregate.fit_calibration(z, t, "platt")
    nll = lambda c: -np.mean(t * np.log(c) + (1 - t) * np.log(1 - c))  # noqa: E731
    assert nll(aggregate.confidences(z, a, b)) < nll(aggregate.confidences(z)) - 0.1
    at, bt = aggregate.fit_calibration(z, t, "temperature")
    assert np.all(bt == 0) and np.all(at != 1)
    conf = aggregate.confidences(z)
    thr = aggregate.fit_thresholds(conf, t)
    from sklearn.metrics import f1_score
    for j in range(2):
        best = f1_score(t[:, j], conf[:, j] >= thr[j])
        for other in [0.3, 0.5, 0.7, 0.9]:
            assert best >= f1_score(t[:, j], conf[:, j] >= other) - 1e-9


def test_thresholds_sorting_only_the_candidate_rows_match_sorting_every_row():
    def every_row(conf, targets):  # the definition: sort all rows, the first best cut between distinct scores
        out = np.full(conf.shape[1], 0.5)
        for j in range(conf.shape[1]):
            pos = targets[:, j].astype(bool)
            if not pos.any():
                continue
            order = np.argsort(-conf[:, j], kind="stable")
            s, y = conf[order, j], pos[order]
            f1 = np.where(np.r_[s[1:] != s[:-1], True], 2 * np.cumsum(y) / (np.arange(1, len(y) + 1) + pos.sum()), -1)
            k = int(np.argmax(f1))
            out[j] = (s[k] + (s[k + 1] if k + 1 < len(s) else 0.0)) / 2
        return out

    g = np.random.default_rng(3)
    t = (g.random((400, 6)) < [0.02, 0.1, 0.3, 0.5, 0.0, 1.0]).astype(float)
    conf = 1 / (1 + np.exp(-((t * 2 - 1) * [6, 1, 0.5, 0.2, 1, 1] + g.normal(0, 1.5, t.shape))))
    conf[::7, 1] = conf[0, 1]  # ties, across the lowest positive's score too
    conf[:, 2] = np.round(conf[:, 2], 2)
    conf[np.argmin(np.where(t[:, 3] > 0, conf[:, 3], 2)), 3] = conf[:, 3].min()  # a positive scores lowest
    assert np.array_equal(aggregate.fit_thresholds(conf, t), every_row(conf, t))


def test_standardize_floor_keeps_dimensions_dead_in_training_bounded():
    from ovr.learn.heads import STD_FLOOR, Normalizer

    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, 16, generator=g) * 2 + 1
    X[:, 0] = 0.0  # a dimension no training image activates
    n = Normalizer.fit("standardize", X)
    Z = n(X)
    assert torch.allclose(Z[:, 1:].mean(0), torch.zeros(15), atol=1e-5)
    assert torch.allclose(Z[:, 1:].std(0, unbiased=False), torch.ones(15), atol=1e-4)
    new = torch.zeros(1, 16)
    new[0, 0] = 1.0  # an image of a class added later lights it up
    bound = 1.0 / (STD_FLOOR * float(X.std(0, unbiased=False).mean()))
    assert float(n(new)[0, 0]) == pytest.approx(bound, rel=1e-4)
    assert float(n(new).abs().max()) < 100  # a bare 1e-6 floor gave 1e6


def test_standardisation_of_parts_and_features_that_are_not_finite():
    """Normalizer.fit over train and validation parts equals torch's mean/std of their concatenation; a NaN or an
    infinity in either part is refused by fit_heads with one message, for both normalisations."""
    from ovr.config import TrainConfig
    from ovr.learn.heads import Normalizer
    from ovr.learn.model import Model

    A, labels = blobs(4)
    X, y, Xv, yv = A[0::2], labels[0::2], A[1::2], labels[1::2]
    n = Normalizer.fit("standardize", X, Xv)
    A = torch.cat([X, Xv])  # the same rows in another order
    assert torch.allclose(n.mean, A.mean(0), atol=1e-5) and torch.allclose(n.std, A.std(0, unbiased=False), rtol=1e-4)
    assert n.finite(X, Xv)
    for norm in ("standardize", "l2"):
        for bad in (float("nan"), float("inf")):
            for part in (0, 1):
                parts = [X.clone(), Xv.clone()]
                parts[part][3, 2] = bad
                m = Model({"dim": X.shape[1]}, norm, "linear", ["0", "1", "2", "3"])
                with pytest.raises(ValueError, match="NaN or infinity"):
                    m.fit_heads(m.classes, parts[0], y, parts[1], yv, TrainConfig(l2_grid=(0.01,)))


def test_estimators_reject_unknown_options():
    X, y = blobs()[:2]
    with pytest.raises(ValueError, match="head must be"):
        OvRClassifier(head="foo", epochs=1, device="cpu").fit(X, y)
    with pytest.raises(ValueError, match="head must be"):
        SoftmaxClassifier(head="foo", epochs=1, device="cpu").fit(X, y)
    with pytest.raises(ValueError, match="normalize must be"):
        OvRClassifier(normalize="bar", epochs=1, device="cpu").fit(X, y)
    with pytest.raises(ValueError, match="calibration must be"):
        aggregate.fit_calibration(np.zeros((4, 2)), np.zeros((4, 2)), "isotonic")


def test_fold_puts_the_standardisation_into_the_head():
    from ovr.learn.heads import Normalizer, head_inputs, init_mlp, stack_heads, stacked_logits

    g = torch.Generator().manual_seed(0)
    X = torch.randn(50, 8, generator=g) * 3 + 2
    std = Normalizer.fit("standardize", X)
    for stacked in (init_linear([1], 8), init_mlp([1], 8, 5)):
        head = {k: v[0] * 10 for k, v in stacked.items()}  # x10: weights and biases far from zero
        on_standardised = stacked_logits(stack_heads([head]), std(X))
        on_raw = stacked_logits(stack_heads([std.fold(head)]), head_inputs("standardize", X))
        assert torch.allclose(on_standardised, on_raw, atol=1e-3, rtol=1e-5)
        assert not torch.allclose(on_standardised, stacked_logits(stack_heads([head]), X), atol=1e-1)
    l2 = Normalizer.fit("l2", X)
    head = {k: v[0] for k, v in init_linear([2], 8).items()}
    assert all(torch.equal(a, b) for a, b in zip(l2.fold(head).values(), head.values()))
    assert torch.allclose(stacked_logits(stack_heads([head]), l2(X)),
                          stacked_logits(stack_heads([l2.fold(head)]), head_inputs("l2", X)))


def test_chunked_solves_give_the_same_heads():
    """10,000 classes do not fit in one solve; chunks of heads must give the heads one solve gives."""
    from dataclasses import replace

    from ovr.config import TrainConfig
    from ovr.learn.model import CPU_COLUMNS, Model, heads_per_chunk, solve_columns

    X, y = blobs(12, 8, 10, seed=3)
    Xv, yv = blobs(12, 3, 10, seed=4)
    names = [f"k{i}" for i in range(12)]
    fits = {}
    for chunk in (0, 5, 1):
        m = Model({"name": "x", "dim": 10}, "standardize", "linear", list(names))
        m.fit_heads(names, X, y, Xv, yv, replace(TrainConfig(), l2_grid=(1e-3, 1e-1), chunk_heads=chunk))
        fits[chunk] = m
    for c in names:
        for chunk in (5, 1):
            assert torch.allclose(fits[0].heads[c]["weight"], fits[chunk].heads[c]["weight"], atol=1e-4), (c, chunk)
            assert fits[0].records[c].l2 == fits[chunk].records[c].l2
            assert fits[0].records[c].threshold == pytest.approx(fits[chunk].records[c].threshold, abs=1e-3)
    assert heads_per_chunk(100_000, 11, "cpu") == 56  # 2 GB / (8 arrays x 4 bytes x 100,000 rows x 11 strengths)
    # few rows, wide features: the per-column curvature pairs (64 bytes x 10 pairs x 1,281) bound the chunk, not
    # the [rows, heads] arrays (which alone would allow 5,681 heads, 4.6 GB of pairs)
    assert heads_per_chunk(1_000, 11, "cpu", dim=1280) == int(2e9 // (11 * (32 * 1_000 + 640 * 1281))) == 213
    # a linear solve's block of columns: one strength's memory, at most CPU_COLUMNS on the CPU
    assert solve_columns(20_000, "cpu", dim=512) == CPU_COLUMNS
    assert solve_columns(10_000_000, "cpu", dim=512) == heads_per_chunk(10_000_000, 1, "cpu", dim=512) == 6
    assert solve_columns(20_000, "cpu", requested=7) == 7
    # the heads of one linear call: bounded by their state (pairs, validation logits), not by the training rows
    assert heads_per_chunk(10_000, 1, "cpu", dim=512) >= 1_000 > heads_per_chunk(15_000, 1, "cpu", dim=4096)


def test_the_l2_path_in_blocks_of_heads_is_the_path_of_all_heads():
    """l2_path(block=k) takes k heads at a time through the whole path (their state between strengths stays
    their own): the same strengths, losses and weights as all heads together, and its bar ends at its total."""
    from ovr.learn.heads import l2_path

    X, y = blobs(7, 30, 12, seed=21)
    X = X + torch.randn(X.shape, generator=torch.Generator().manual_seed(2)) * 2
    Xv, yv = blobs(7, 15, 12, seed=22)
    T, Tv = torch.nn.functional.one_hot(y, 7).float(), torch.nn.functional.one_hot(yv, 7).float()
    pw = (len(T) - T.sum(0)) / T.sum(0)
    grid = torch.tensor((1e-3, 1e-2, 1e-1, 1.0, 10.0), dtype=torch.float64)
    bars = []
    whole = l2_path(X, T, Xv, Tv, pw, grid, tol=1e-6, max_iter=500)
    parts = l2_path(X, T, Xv, Tv, pw, grid, tol=1e-6, max_iter=500, block=3,
                    progress=lambda stage, done, total, **kw: bars.append((done, total)))
    assert torch.equal(whole[3], parts[3]) and torch.equal(whole[2].isnan(), parts[2].isnan())
    assert torch.allclose(whole[2].nan_to_num(), parts[2].nan_to_num(), rtol=1e-3)  # solves end within tol
    assert torch.allclose(whole[0], parts[0], rtol=1e-3, atol=1e-3) and parts[6].S.shape == whole[6].S.shape
    assert bars[-1] == (3 * len(grid), 3 * len(grid)) and all(d <= t for d, t in bars)


def test_validation_losses_in_float32_are_the_float64_ones_to_rounding():
    """The L2 search ranks strengths by val_losses, computed in the rows' float32: within 1e-6 (relative) of the
    same losses from float64 logits, on raw rows with a standardisation as on standardised ones."""
    from ovr.learn.heads import linear_logits, val_losses

    g = torch.Generator().manual_seed(3)
    Xv = torch.randn(2000, 16, generator=g) * 3 + 1
    mean, std = Xv.mean(0), Xv.std(0)
    W, b = torch.randn(5, 16, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    Tv, pw = (torch.rand(2000, 5, generator=g) < 0.2).float(), torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0])
    ref = weighted_bce(linear_logits(Xv.double(), W, b, (mean, std)), Tv, pw)
    got = val_losses(Xv, Tv, pw, W, b, (mean, std))
    assert got.dtype == torch.float64 and torch.allclose(got, ref, rtol=1e-6, atol=0)


def test_l2_path_chooses_what_the_full_sweep_chooses_at_a_fraction_of_the_solves():
    """Strong to weak, warm-started, a head stopping after two strengths without a better validation loss: on
    overlapping blobs (the validation loss is U-shaped in the strength) every head keeps the sweep's strength, its
    recorded path is the sweep's losses where it went, and the weakest strengths are left out."""
    X, y = blobs(12, 30, 24, seed=5)
    X = X + torch.randn(X.shape, generator=torch.Generator().manual_seed(0)) * 3  # overlap: a U-shaped curve
    Xv, yv = blobs(12, 20, 24, seed=6)
    Xv = Xv + torch.randn(Xv.shape, generator=torch.Generator().manual_seed(1)) * 3
    grid = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0, 10.0)
    kw = dict(l2_grid=grid, tol=1e-6)
    sweep = fit(X, y, Xv, yv, list(range(12)), [f"c{i}" for i in range(12)], l2_search="sweep", **kw)
    path = fit(X, y, Xv, yv, list(range(12)), [f"c{i}" for i in range(12)], l2_search="path", **kw)
    assert [f.l2 for f in path] == [f.l2 for f in sweep]
    assert len({f.l2 for f in sweep}) > 1  # the heads really chose different strengths
    for p, s in zip(path, sweep):
        full = dict(map(tuple, s.l2_path))
        # the path's strengths are solved to tol * SEARCH_TOL, the sweep's to tol: their losses differ by about that
        assert len(p.l2_path) < len(grid) and all(abs(v - full[l2]) < 1e-5 * SEARCH_TOL for l2, v in p.l2_path)
        assert torch.allclose(p.params["weight"], s.params["weight"], atol=1e-4)


@pytest.mark.parametrize("head,search", [("linear", "path"), ("linear", "sweep"), ("mlp", "path")])
def test_progress_ends_where_the_work_ends(head, search):
    """Every stage's last report has done == total (bars stopped at "solve 20/500" and "train 7/100" when the
    solve converged or early stopping ended it), and a stage's total never shrinks below what it reported done."""
    X, y = blobs(4, 20, 8, seed=3)
    Xv, yv = blobs(4, 10, 8, seed=4)
    last: dict = {}

    def progress(stage, done, total, **info):
        assert 0 <= done <= total, (stage, done, total)
        last[stage] = (done, total)

    fit(X, y, Xv, yv, [0, 1, 2, 3], list("abcd"), head=head, l2_search=search, epochs=50, progress=progress)
    assert last and all(d == t for d, t in last.values()), last
    from ovr.cli import _rate

    assert _rate("solve", 20, 5.0) == "" and _rate("bench", 36, 5.0) == "" and _rate("embed", 100, 2.0) == "50 img/s"


def test_calibration_is_kept_only_where_it_helps_on_held_out_rows():
    """With 3-4 validation positives per head Platt's smoothed targets capped a positive near 0.8 and made every
    confidence worse; now such a head keeps the identity. With plenty of rows and overconfident logits, the
    calibration is kept and fixes them."""
    rng = np.random.default_rng(0)
    # well-separated, well-calibrated heads, 4 positives each among 60 rows
    t = np.zeros((60, 5))
    for j in range(5):
        t[rng.choice(60, 4, replace=False), j] = 1
    z = np.where(t > 0, 8.0, -8.0) + rng.normal(0, 0.5, t.shape)
    a, b = aggregate.fit_calibration(z, t)
    assert np.allclose(a, 1) and np.allclose(b, 0)
    # 4,000 rows, logits 4x too confident: the calibration helps on held-out rows and is kept
    zt = rng.normal(0, 1.5, (4000, 3))
    tt = (rng.random(zt.shape) < 1 / (1 + np.exp(-zt))).astype(float)
    a, b = aggregate.fit_calibration(4 * zt, tt)
    assert np.allclose(a, 0.25, atol=0.03) and np.allclose(b, 0, atol=0.1)
    # the kept (a, b) is the optimum on all rows (started from the halves' fits): Platt's smoothed targets, zero
    # gradient
    npos = tt.sum(0)
    smooth = np.where(tt > 0, (npos + 1) / (npos + 2), 1 / (len(tt) - npos + 2))
    r = 1 / (1 + np.exp(-(a * 4 * zt + b))) - smooth
    assert np.abs((r * 4 * zt).mean(0)).max() < 1e-8 and np.abs(r.mean(0)).max() < 1e-8


def test_path_on_a_subset_of_rows_keeps_heads_independent_and_moves_the_strength_to_all_rows():
    """search_rows: the path runs on a seeded subset of the training rows, the strength moves to l2 * m / n on the
    grid, each head is then solved on all rows; a head with few positives in the subset searches on all rows. A
    head is the same alone or in the stack, in either order."""
    from ovr.learn.heads import SEARCH_TOL, _pos_weights, l2_path

    X, y = blobs(6, 80, 12, seed=3)
    X, y = X[:-70], y[:-70]  # class 5 keeps 10 rows: few positives among a subset of 150
    Xv, yv = blobs(6, 15, 12, seed=4)
    names = [f"k{i}" for i in range(6)]
    grid = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
    kw = dict(l2_grid=grid, search_rows=150, refit=False, tol=1e-6)
    stack = fit(X, y, Xv, yv, list(range(6)), names, **kw)
    for k in (0, 5):
        alone = fit(X, y, Xv, yv, [k], [names[k]], **kw)[0]
        assert alone.l2 == stack[k].l2 and torch.allclose(alone.params["weight"], stack[k].params["weight"], atol=1e-4)
    rev = fit(X, y, Xv, yv, list(range(5, -1, -1)), names[::-1], **kw)
    assert [h.l2 for h in rev[::-1]] == [h.l2 for h in stack]
    # head 0: its strength is the subset path's choice moved by m / n; head 5: the path over all rows
    T, Tv = onehot(y, 6), onehot(yv, 6)
    sub = torch.randperm(len(X), generator=torch.Generator().manual_seed(FAST["seed"]))[:150]
    g = torch.tensor(grid, dtype=torch.float64)
    on_sub = l2_path(X[sub], T[sub][:, :1], Xv, Tv[:, :1], _pos_weights(T[sub][:, :1], True)[2], g,
                     tol=1e-6 * SEARCH_TOL, max_iter=500)[3]
    moved = float(g[int(on_sub[0])]) * 150 / len(X)
    assert stack[0].l2 == min(grid, key=lambda v: abs(np.log(v) - np.log(moved)))
    on_all = l2_path(X, T[:, 5:], Xv, Tv[:, 5:], _pos_weights(T[:, 5:], True)[2], g, tol=1e-6 * SEARCH_TOL,
                     max_iter=500)[3]
    assert stack[5].l2 == grid[int(on_all[0])]
    # the heads are solved on all rows at their strengths: the gradient over all training rows is ~0
    assert all(h.grad_norm <= 1e-5 for h in stack)


def test_calibration_needs_a_positive_in_each_half_and_each_head_stops_on_its_own(monkeypatch):
    """A head with no validation positive, or one, keeps the identity (the old fit squashed a head without positives
    to one low confidence for every image); a head's calibration is the same alone as beside heads that take many
    more Newton steps (to rounding)."""
    rng = np.random.default_rng(1)
    n = 400
    t = np.zeros((n, 4))
    t[rng.choice(n, 1), 1] = 1  # one positive; column 0: none
    z = rng.normal(0, 1, (n, 4)) + 1.0  # raw confidences far above any rate the labels show
    true = rng.normal(0, 1.5, n)
    t[:, 2] = rng.random(n) < 1 / (1 + np.exp(-true))
    z[:, 2] = 4 * true  # 4x too confident
    z[:, 3] = 40 * np.where(t[:, 3] > 0, 1, -1) + rng.normal(0, 0.01, n)  # no positives, hard to move
    t[:3, 3] = 1
    a, b = aggregate.fit_calibration(z, t)
    assert (a[:2] == 1).all() and (b[:2] == 0).all()
    assert abs(a[2] - 0.25) < 0.1  # plenty of positives, overconfident: calibrated
    alone = aggregate.fit_calibration(z[:, 2:3], t[:, 2:3])
    assert np.isclose(alone[0][0], a[2], rtol=1e-12, atol=0) and np.isclose(alone[1][0], b[2], rtol=1e-12, atol=0)
    monkeypatch.setattr(aggregate, "CALIBRATION_HEADS", 3)  # in blocks of heads: the same answers
    blocked = aggregate.fit_calibration(z, t)
    assert np.allclose(blocked[0], a, rtol=1e-12, atol=0) and np.allclose(blocked[1], b, rtol=1e-12, atol=0)


def test_one_block_puts_train_and_validation_rows_in_one_buffer_once():
    """The refit of every chunk of heads reads train + validation rows in place: `one_block` makes them one buffer
    (one copy, and none when they already are), and `joined` then returns both without a copy."""
    from ovr.learn.heads import joined, one_block

    A, B = torch.randn(5, 3), torch.randn(2, 3)
    X, Xv = one_block(A, B)
    assert torch.equal(X, A) and torch.equal(Xv, B) and joined(X, Xv).data_ptr() == X.data_ptr()
    both = torch.randn(7, 3)
    X2, Xv2 = one_block(both[:5], both[5:])
    assert X2.data_ptr() == both.data_ptr() and Xv2.data_ptr() == both[5:].data_ptr()  # already one: no copy
    assert torch.equal(joined(*one_block(B, A)), torch.cat([B, A]))
