"""scikit-learn estimators on embeddings: `OvRClassifier` wraps `model.Model`; `SoftmaxClassifier` is the baseline.

Both follow scikit-learn's conventions (`__init__` only stores parameters, learned attributes end in `_`,
`check_is_fitted`, `validate_data`) and pass its `check_estimator` suite (tests/test_estimators.py), so `clone`,
`GridSearchCV`, `cross_val_score` and `Pipeline` work. Defaults come from `config.TrainConfig`, the one place they live.
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.model_selection import train_test_split
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from ..config import DataConfig, TrainConfig
from .aggregate import fit_softmax
from .heads import (Normalizer, autograd_grad, ce_columns, check_head, init_mlp,
                    stacked_logits)
from .model import Model
from ..runtime import head_seed, resolve_device
from .solver import adam_columns

_T, _D = TrainConfig(), DataConfig()
MIN_VAL_PER_CLASS = 2  # an internal validation split needs this many rows of every class in it
# Inputs keep their float dtype (as scikit-learn's own estimators accept): float32 embeddings are not copied to
# float64 only to be converted back; the heads compute in float32 either way.
FLOATS = (np.float32, np.float64)


def _split(X: np.ndarray, y: np.ndarray, eval_set, val_fraction: float, seed: int):
    """The validation data: eval_set if given, else a seeded stratified split when every class is big enough
    for one (else none: every head then uses the grid's middle strength). The split draws row indices (the same
    rows as splitting X itself) and gathers each part once, in the input's dtype."""
    if eval_set is not None:
        return X, y, np.asarray(eval_set[0]), np.asarray(eval_set[1])
    counts = np.unique(y, return_counts=True)[1]
    if val_fraction > 0 and counts.min() * val_fraction >= MIN_VAL_PER_CLASS:
        tr, va = train_test_split(np.arange(len(y)), test_size=val_fraction, stratify=y, random_state=seed)
        return X[tr], y[tr], X[va], y[va]
    return X, y, X[:0], y[:0]


def _encode(classes: np.ndarray, y: np.ndarray, what: str) -> np.ndarray:
    idx = np.searchsorted(classes, y)
    idx = np.clip(idx, 0, len(classes) - 1)
    bad = classes[idx] != y
    if bad.any():
        raise ValueError(f"{what} has a label that is not in the training labels: {y[bad].tolist()[0]!r}")
    return idx


class _Base(ClassifierMixin, BaseEstimator):
    def _prepare(self, X, y, eval_set):
        X, y = validate_data(self, X, y, dtype=FLOATS)
        check_classification_targets(y)
        self.classes_ = np.unique(y)
        if len(self.classes_) < 2:
            raise ValueError(f"{type(self).__name__} needs at least two classes in y, got 1 class")
        if eval_set is not None:
            Xv = validate_data(self, np.asarray(eval_set[0]), reset=False, dtype=FLOATS)
            eval_set = (Xv, np.asarray(eval_set[1]).ravel())
            if len(eval_set[0]) != len(eval_set[1]):
                raise ValueError("eval_set: X and y have different numbers of rows")
            _encode(self.classes_, eval_set[1], "eval_set")
        X, y, Xv, yv = _split(X, y, eval_set, self.val_fraction, self.seed)
        dev = resolve_device(self.device)
        t = lambda a: torch.tensor(np.asarray(a), dtype=torch.float32, device=dev)  # noqa: E731
        lab = lambda a: torch.as_tensor(_encode(self.classes_, np.asarray(a), "y"), dtype=torch.long)  # noqa: E731
        return t(X), lab(y), t(Xv), lab(yv) if len(yv) else torch.zeros(0, dtype=torch.long)

    def _X(self, X) -> torch.Tensor:
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=FLOATS)
        return torch.tensor(X, dtype=torch.float32)

    def decision_function(self, X) -> np.ndarray:
        """Per-class scores [n, K]; for two classes, one column (class 1 minus class 0) as scikit-learn expects."""
        z = self._logits(self._X(X))
        return z[:, 1] - z[:, 0] if z.shape[1] == 2 else z

    def predict(self, X) -> np.ndarray:
        z = self._logits(self._X(X))
        return self.classes_[z.argmax(1)]


class OvRClassifier(_Base):
    """One independent binary head per class on embeddings (one-vs-rest), argmax of confidence.

    Linear heads are solved exactly (per-head L-BFGS to a gradient tolerance, all heads as columns of one solve);
    each head picks its L2 strength from `l2_grid` on validation data, then is refit on train + validation.

    Parameters
    ----------
    head : {"linear", "mlp", "ridge"}
        Linear heads use the exact solver; MLP heads (one hidden layer) use minibatch Adam with early stopping;
        ridge heads are solved in closed form from the model's statistics (exact under growth).
    hidden : int
        Hidden units of an MLP head.
    epochs, lr, batch_size, patience : int, float, int, int
        Adam settings, for MLP heads only.
    l2_grid : tuple of float
        L2 strengths in the per-sample-mean scale (scikit-learn's C = 1 / (l2 * n_samples)).
    l2_search : {"path", "sweep"}
        How each linear head searches `l2_grid`: a warm-started path from strong to weak that stops once the
        validation loss stops improving, or every strength.
    pos_weight : bool
        Weight each head's positives by its negatives / positives (BCEWithLogitsLoss's pos_weight).
    normalize : {"standardize", "l2"}
        Feature normalisation; standardisation is folded into each head's weights.
    calibration : {"platt", "temperature", "none"}
        Per-head calibration fitted on validation data (used by `predict_proba`).
    tol : float
        Linear heads stop when the max absolute gradient of their objective is below this.
    max_iter : int
        Linear heads: L-BFGS iterations at most.
    val_fraction : float
        Share of the training data held out to pick strengths when `fit` gets no `eval_set` (stratified, seeded);
        the heads are then refit on everything.
    seed : int
        Global seed; each head's seed derives from it and its class.
    device : str
        "auto", "cpu" or "cuda".

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
    model_ : ovr.model.Model
        The fitted one-vs-rest model (heads, per-head records).
    n_features_in_ : int
    n_iter_ : ndarray of shape (n_classes,)
        Solver iterations of each head.
    fit_seconds_ : float
    """

    def __init__(self, head: str = _T.head, *, hidden: int = _T.hidden, epochs: int = _T.epochs, lr: float = _T.lr,
                 batch_size: int = _T.head_batch_size, patience: int = _T.patience, l2_grid: tuple = _T.l2_grid,
                 pos_weight: bool = _T.pos_weight, normalize: str = _T.normalize, calibration: str = _T.calibration,
                 tol: float = _T.tol, max_iter: int = _T.max_iter, l2_search: str = _T.l2_search,
                 val_fraction: float = _D.val_fraction, seed: int = _T.seed, device: str = "auto") -> None:
        self.head, self.hidden, self.epochs, self.lr = head, hidden, epochs, lr
        self.l2_search = l2_search
        self.batch_size, self.patience, self.l2_grid, self.pos_weight = batch_size, patience, l2_grid, pos_weight
        self.normalize, self.calibration, self.tol, self.max_iter = normalize, calibration, tol, max_iter
        self.val_fraction, self.seed, self.device = val_fraction, seed, device

    def _settings(self) -> TrainConfig:
        """The parameters as a TrainConfig, which checks them (one list of allowed heads, normalisations, ...)."""
        try:
            return TrainConfig(head=self.head, hidden=self.hidden, epochs=self.epochs, lr=self.lr,
                               head_batch_size=self.batch_size, patience=self.patience, l2_grid=tuple(self.l2_grid),
                               pos_weight=self.pos_weight, normalize=self.normalize, calibration=self.calibration,
                               tol=self.tol, max_iter=self.max_iter, l2_search=self.l2_search, seed=self.seed)
        except Exception as e:  # config errors are OvrError with the CLI's wording; here they are ValueErrors
            raise ValueError(str(e).removeprefix("config: ")) from None

    def fit(self, X, y, *, eval_set: tuple | None = None, progress: Callable | None = None) -> "OvRClassifier":
        """Fit one head per class. `eval_set=(X_val, y_val)` picks each head's strength; without it a seeded
        split of (X, y) does. The heads are then refit on all the data given."""
        settings = self._settings()
        X, y, Xv, yv = self._prepare(X, y, eval_set)
        t0 = time.perf_counter()
        names = [str(c) for c in self.classes_]
        m = Model({"dim": X.shape[1]}, settings.normalize, settings.head, names, calibration=settings.calibration)
        if settings.head == "ridge":  # every head from the statistics, one solve (Model.fit keeps them)
            m.fit(X, y, Xv, yv, settings, progress=progress)
        else:
            m.fit_heads(names, X, y, Xv, yv, settings, progress=progress)
        self.model_ = m
        self.n_iter_ = np.array([max(1, m.records[c].iterations) for c in names])
        self.fit_seconds_ = time.perf_counter() - t0
        return self

    def _logits(self, X: torch.Tensor) -> np.ndarray:
        return self.model_.logits(X)

    def confidences(self, X) -> np.ndarray:
        """Each head's own sigmoid confidence [n, K] (rows do not sum to 1)."""
        return 1 / (1 + np.exp(-self._logits(self._X(X))))

    def predict_proba(self, X) -> np.ndarray:
        """Confidences normalised per row, as scikit-learn's OneVsRestClassifier does; for two classes the
        logistic of the decision function, so that both agree on the ranking."""
        z = self._logits(self._X(X))
        if len(self.classes_) == 2:
            p1 = 1 / (1 + np.exp(-(z[:, 1] - z[:, 0])))
            return np.stack([1 - p1, p1], 1)
        c = 1 / (1 + np.exp(-z))
        return c / np.clip(c.sum(1, keepdims=True), 1e-300, None)


class SoftmaxClassifier(_Base):
    """The baseline: one K-way softmax head on the same features, under the protocol of the OvR heads. Linear:
    solved exactly (`aggregate.fit_softmax`, the softmax gate's solver: L-BFGS to a gradient tolerance), classes
    weighted to equal totals (as the OvR heads' pos_weight balances each head), the L2 strength of `l2_grid` with
    the lowest validation NLL, then refit on train + validation. MLP: minibatch Adam, each strength one column, the
    one with the lowest validation loss kept.

    Parameters
    ----------
    head, hidden, epochs, lr, batch_size, patience, l2_grid, normalize, val_fraction, seed, device
        As for `OvRClassifier` (epochs, lr, batch_size and patience: mlp only).

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
    params_ : dict of tensors
        The chosen column's weights.
    l2_ : float
        The chosen strength.
    n_features_in_ : int
    fit_seconds_ : float
    """

    def __init__(self, head: str = _T.head, *, hidden: int = _T.hidden, epochs: int = _T.epochs, lr: float = _T.lr,
                 batch_size: int = _T.head_batch_size, patience: int = _T.patience,
                 l2_grid: tuple = _T.l2_grid, normalize: str = _T.normalize,
                 val_fraction: float = _D.val_fraction, seed: int = _T.seed, device: str = "auto") -> None:
        self.head, self.hidden, self.epochs, self.lr = head, hidden, epochs, lr
        self.batch_size, self.patience, self.l2_grid = batch_size, patience, l2_grid
        self.normalize, self.val_fraction, self.seed, self.device = normalize, val_fraction, seed, device

    def fit(self, X, y, *, eval_set: tuple | None = None, progress: Callable | None = None) -> "SoftmaxClassifier":
        check_head(self.head)
        from ..config import NORMALIZE
        if self.normalize not in NORMALIZE:
            raise ValueError(f"normalize must be standardize or l2, not {self.normalize!r}")
        X, y, Xv, yv = self._prepare(X, y, eval_set)
        dev = X.device
        K, D, G = len(self.classes_), X.shape[1], len(self.l2_grid)
        t0 = time.perf_counter()
        if self.head == "linear":
            self.normalizer_ = Normalizer.fit(self.normalize, X, Xv)
            Z, Zv = (P.to(torch.float64) for P in self.normalizer_.rows(X, Xv))
            theta, self.l2_, _ = fit_softmax(Z, y.to(dev), Zv, yv.to(dev), K, self.l2_grid,
                                             untuned=sorted(self.l2_grid)[G // 2])
            self.params_ = {"weight": theta[None, :, :-1].float().cpu(), "bias": theta[None, :, -1].float().cpu()}
            self.fit_seconds_ = time.perf_counter() - t0
            return self
        self.normalizer_ = Normalizer.fit(self.normalize, X)
        has_val = len(Xv) > 0
        seeds = [head_seed(self.seed, "softmax")] * G
        params = init_mlp(seeds, D, self.hidden, K)
        grid = torch.tensor(self.l2_grid if has_val else [sorted(self.l2_grid)[G // 2]] * G, dtype=torch.float32)
        res = adam_columns(params, autograd_grad(ce_columns), ce_columns, self.normalizer_(X), y.to(dev),
                           self.normalizer_(Xv) if has_val else None, yv.to(dev) if has_val else None, l2=grid, extra=None,
                           logits_fn=stacked_logits, epochs=self.epochs, lr=self.lr, batch_size=self.batch_size,
                           patience=self.patience, seed=self.seed, progress=progress)
        g = int(res.best_val.argmin()) if has_val else 0
        self.params_ = {k: v[g:g + 1].cpu().clone() for k, v in res.params.items()}
        self.l2_ = float(grid[g])
        self.fit_seconds_ = time.perf_counter() - t0
        return self

    def _logits(self, X: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return stacked_logits(self.params_, self.normalizer_(X.cpu()))[:, 0].double().numpy()

    def predict_proba(self, X) -> np.ndarray:
        z = self._logits(self._X(X))
        z = z - z.max(1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(1, keepdims=True)
