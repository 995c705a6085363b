"""The scikit-learn estimators: scikit-learn's own check suite and the meta-estimators (the solvers against
LogisticRegression: test_solver.py)."""
import numpy as np
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.model_selection import GridSearchCV, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks

from ovr.learn.estimators import OvRClassifier, SoftmaxClassifier

FAST_SOFTMAX = dict(epochs=20, lr=0.02, device="cpu")


@parametrize_with_checks([OvRClassifier(device="cpu"), SoftmaxClassifier(**FAST_SOFTMAX)])
def test_scikit_learn_checks(estimator, check):
    # No check is skipped.
    check(estimator)


def blobs(n_classes=4, n=40, d=8, seed=0):
    g = np.random.default_rng(seed)
    centers = g.normal(0, 2, (n_classes, d))
    y = np.repeat(np.arange(n_classes), n)
    return centers[y] + g.normal(0, 1, (len(y), d)), y


def test_meta_estimators_work():
    X, y = blobs()
    est = OvRClassifier(device="cpu")
    assert clone(est).get_params() == est.get_params()
    scores = cross_val_score(est, X, y, cv=3)
    assert scores.mean() > 0.9
    gs = GridSearchCV(est, {"pos_weight": [True, False]}, cv=3).fit(X, y)
    assert gs.best_score_ > 0.9
    pipe = make_pipeline(StandardScaler(), OvRClassifier(device="cpu")).fit(X, y)
    assert (pipe.predict(X) == y).mean() > 0.95


def test_predict_before_fit_and_unseen_validation_label():
    X, y = blobs()
    with pytest.raises(NotFittedError):
        OvRClassifier(device="cpu").predict(X)
    with pytest.raises(ValueError, match="not in the training labels: 7"):
        OvRClassifier(device="cpu").fit(X, y, eval_set=(X[:5], np.array([0, 1, 7, 2, 3])))
    with pytest.raises(ValueError, match="expecting 8 features"):
        OvRClassifier(device="cpu").fit(X, y).predict(X[:, :3])
    bad = X.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        OvRClassifier(device="cpu").fit(bad, y)


def test_eval_set_picks_the_strength_and_heads_are_refit_on_everything():
    X, y = blobs(n=80, seed=1)
    X, y, Xv, yv = X[::2], y[::2], X[1::2], y[1::2]
    m = OvRClassifier(device="cpu", l2_grid=(1e-3, 1e-1, 10.0)).fit(X, y, eval_set=(Xv, yv))
    recs = m.model_.records
    assert all(r.l2 in (1e-3, 1e-1, 10.0) and r.l2 < 10 for r in recs.values())
    assert all(r.positives == 80 for r in recs.values())  # 40 train + 40 validation rows per class
    assert all(r.grad_norm <= m.tol for r in recs.values())


def test_float32_and_float64_inputs_give_the_same_heads():
    # float32 embeddings are used as they are (no float64 copy); the split draws the same rows either way
    X, y = blobs(n=30, seed=2)
    a = OvRClassifier(device="cpu", seed=3).fit(X.astype(np.float32), y)
    b = OvRClassifier(device="cpu", seed=3).fit(X.astype(np.float32).astype(np.float64), y)
    for c in a.model_.heads:
        for k, v in a.model_.heads[c].items():
            assert np.array_equal(v.numpy(), b.model_.heads[c][k].numpy())
    np.testing.assert_array_equal(a.predict_proba(X.astype(np.float32)), b.predict_proba(X))


def test_the_linear_softmax_baseline_is_solved_exactly_and_balanced():
    """The softmax baseline was minibatch Adam without class weights: its answer moved with the seed, and a class
    with a tenth of the rows was outvoted. It is now the softmax gate's exact solve (`aggregate.fit_softmax`):
    the same answer for any seed, and with classes weighted to equal totals, repeating a class's rows changes
    nothing."""
    X, y = blobs(3, 50, 6, seed=1)
    held = np.arange(len(y)) % 5 == 0
    ev = (X[held], y[held])
    keep = ~held & ((y != 2) | (np.arange(len(y)) % 4 == 1))  # class 2: 10 rows against 40
    X, y = X[keep], y[keep]
    kw = dict(l2_grid=(1e-2, 1e-1, 1.0), normalize="l2", device="cpu")  # per row: repeated rows move no statistic
    a = SoftmaxClassifier(seed=0, **kw).fit(X, y, eval_set=ev)
    b = SoftmaxClassifier(seed=7, **kw).fit(X, y, eval_set=ev)
    assert np.array_equal(a.params_["weight"].numpy(), b.params_["weight"].numpy())
    assert a.score(*ev) > 0.6  # three classes: well above chance
    # without validation rows (one strength, no refit): class 2's rows four times over are the same problem
    rep = np.concatenate([np.arange(len(y)), np.repeat(np.flatnonzero(y == 2), 3)])
    c, d = (SoftmaxClassifier(val_fraction=0, **kw).fit(X[r], y[r]) for r in (rep, np.arange(len(y))))
    np.testing.assert_allclose(c.decision_function(ev[0]), d.decision_function(ev[0]), atol=1e-3)
