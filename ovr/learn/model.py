"""THE one-vs-rest model: folded heads, typed per-head records and the gate; fit / add / refresh / remove / answer.

Everything that uses an OvR model goes through this object: `store` serialises it, `pipeline` (and so the CLI)
feeds it embeddings, `OvRClassifier` wraps it, and both `ovr bench` and `benchmarks/` measure it.

Rows are labelled by their index in `classes`; -1 marks a row that is a negative for every head (extra negatives,
or an example of a class that has been removed).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from . import aggregate
from .answer import AnswerOptions, AnswerTensors, answer, head_logits
from ..config import TrainConfig
from .heads import Normalizer, Tensors, fit_ovr_heads, one_block, stack_heads
from .metrics import binary_head_metrics
from .stats import GATE_SHRINKAGE, FeatureMap, Stats, gate_posterior, moments, ridge_heads
from .records import Calibration, HeadRecord, new_run_id, now  # noqa: F401  (re-exported: ovr.model is the API)

CONFUSED_RATE = 0.10  # a head that fires on more than this share of a class it never saw is "confused"


@dataclass
class Model:
    backbone: dict  # Backbone.spec(): name, weights, fingerprint, preprocess, dim
    normalize: str  # standardize (folded into each head) | l2 (applied to the inputs of every head)
    head_type: str  # linear | mlp
    classes: list[str]  # ordered; the index of a class is its label
    heads: dict[str, Tensors] = field(default_factory=dict)
    records: dict[str, HeadRecord] = field(default_factory=dict)
    examples: list[dict] = field(default_factory=list)  # {key, label, split}: the cached embeddings it learned from
    calibration: str = "platt"
    config: dict = field(default_factory=dict)
    created: str = field(default_factory=now)
    gate: aggregate.Gate | None = None  # only while some head has not seen every class
    stats: Stats | None = None  # counts, sums and Gram of the remembered embeddings (None: a model saved before)
    gate_method: str = "lda"  # lda | ridge: exact, from `stats` | softmax: refit on every remembered row (as before)

    # --- reading --------------------------------------------------------------------------------------------

    def check_features(self, X: torch.Tensor, what: str = "features") -> None:
        if X.ndim != 2 or (self.backbone.get("dim") and X.shape[1] != self.backbone["dim"]):
            raise ValueError(f"{what} must be [n, {self.backbone.get('dim')}], got {list(X.shape)}")

    def tensors(self, device: torch.device | str = "cpu", classes: list[str] | None = None) -> AnswerTensors:
        """What `answer.answer` reads, for these classes (all by default; a subset answers without a gate)."""
        classes = classes or self.classes
        recs = [self.records[c] for c in classes]
        f64 = lambda v: torch.tensor(v, dtype=torch.float64, device=device)  # noqa: E731
        U = aggregate.unseen_matrix(classes, [r.trained_with for r in recs])
        t = AnswerTensors(stack_heads([self.heads[c] for c in classes], device), self.normalize,
                          f64([r.calibration.a for r in recs]), f64([r.calibration.b for r in recs]),
                          f64([r.threshold for r in recs]), torch.from_numpy(U.astype("float64")).to(device))
        if self.head_type == "ridge":
            t.head_projection = self.stats.features.projection
        if U.any() and self.gate is not None and classes == self.classes:
            order = [self.gate.classes.index(c) for c in classes]
            t.gate_weight = self.gate.weight[order].to(device, torch.float64)
            t.gate_bias = self.gate.bias[order].to(device, torch.float64)
            t.gate_projection = self.gate.projection
        return t

    def logits(self, X: torch.Tensor, classes: list[str] | None = None) -> np.ndarray:
        self.check_features(X)
        with torch.no_grad():
            return head_logits(self.tensors(X.device, classes), X).cpu().numpy()

    def unseen(self) -> np.ndarray:
        """U[h, k]: head h never saw an example of class k (bool [N, N])."""
        return aggregate.unseen_matrix(self.classes, [self.records[c].trained_with for c in self.classes])

    def grown(self) -> bool:
        return bool(self.unseen().any())

    def answer(self, X: torch.Tensor, options: AnswerOptions | None = None, *, views: list[torch.Tensor] = (),
               **fields) -> "Answer":
        """`answer.answer` on this model (options, or its fields as keywords); arrays on the CPU."""
        options = options or AnswerOptions(**fields)
        self.check_features(X)
        with torch.no_grad():
            r = answer(self.tensors(X.device), X, list(views), options)
        return Answer(*(v.cpu().numpy() for v in (r.index, r.confidences, r.thresholds, r.logits, r.labels,
                                                  r.top_index, r.top_confidence, r.calibrated)))

    def fire_rates(self, X: torch.Tensor, heads: list[str]) -> dict[str, float]:
        """Share of the rows of X on which each head passes its own threshold (raw, ungated)."""
        if not len(X) or not heads:
            return {}
        conf = aggregate.confidences(self.logits(X, heads))
        thr = np.array([self.records[c].threshold for c in heads])
        return {c: float(r) for c, r in zip(heads, (conf >= thr).mean(0))}

    def confused_heads(self, X: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """Heads that fire on more than CONFUSED_RATE of the rows of classes they never saw. The one rule behind
        add-class's warning, `refresh` with no class names, `add-class --refresh` and the benchmarks."""
        out: dict[str, float] = {}
        y = first_label(y).cpu().numpy()
        for c in self.classes:
            never = [k for k in self.classes if k not in set(self.records[c].trained_with)]
            rows = np.isin(y, [self.classes.index(k) for k in never])
            if rows.any():
                rate = self.fire_rates(X[torch.from_numpy(rows).to(X.device)], [c])[c]
                if rate > CONFUSED_RATE:
                    out[c] = rate
        return out

    # --- writing --------------------------------------------------------------------------------------------

    def fit_heads(self, names: list[str], X: torch.Tensor, y: torch.Tensor, Xv: torch.Tensor, yv: torch.Tensor,
                  settings: TrainConfig, *, run: str | None = None, progress=None, all_rows: bool = False) -> None:
        """Train (or retrain) the heads of `names` on rows X (train) and Xv (validation), labels indexing
        `classes`. Features are standardised with the statistics of all these rows, and that standardisation is
        folded into the stored heads; calibration and thresholds are fitted on held-out validation logits.
        `all_rows`: these are every row the statistics hold (their running sums give the standardisation)."""
        run = run or new_run_id()
        for name, A in (("training", X), ("validation", Xv)):
            if A.ndim != 2 or (self.backbone.get("dim") and A.shape[1] != self.backbone["dim"]):
                raise ValueError(f"{name} features must be [n, {self.backbone.get('dim')}], got {list(A.shape)}")
        targets = np.array([self.classes.index(c) for c in names])
        has_val = len(Xv) > 0
        norm = self._normalizer(X, Xv, all_rows)
        if not norm.finite(X, Xv):
            raise ValueError("training or validation features contain NaN or infinity")
        T, Tv = head_targets(y, targets, X.device), head_targets(yv, targets, X.device) if has_val else None
        if has_val and settings.head == "linear":  # one buffer: the refit reads train + validation targets in place
            T, Tv = one_block(T, Tv)
        center = None
        if settings.head == "linear" and norm.kind == "standardize":  # inside the solver: no standardised copy
            # train + validation rows in one buffer (at most one copy, none for remembered rows): every chunk's
            # refit then reads them in place
            Xn, Xvn = one_block(X, Xv) if has_val else (X, None)
            center = (norm.mean, norm.std)
        else:
            Xn, Xvn = norm.rows(X, Xv) if has_val else (norm(X), None)
        if settings.head == "linear":
            # as many heads a call as their state fits in memory (curvature pairs, validation logits: every head of
            # 1,000 at 512 dimensions); each solve then takes its columns in blocks sized to its own rows
            size = heads_per_chunk(len(Xv), 1, X.device, 0, X.shape[1])
            block = lambda rows: solve_columns(rows, X.device, settings.chunk_heads, X.shape[1])  # noqa: E731
        else:
            size, block = heads_per_chunk(len(X) + len(Xv), len(settings.l2_grid), X.device, settings.chunk_heads,
                                          X.shape[1]), None
        fits = []
        for s in range(0, len(names), size):  # heads are independent columns: chunks give the same heads
            fits += fit_ovr_heads(Xn, T[:, s:s + size], Xvn, Tv[:, s:s + size] if has_val else None,
                                  names[s:s + size], center=center, block=block, progress=progress,
                                  **settings.fit_kwargs())
        seen = classes_present(y) | (classes_present(yv) if has_val else set())
        trained_with = [c for i, c in enumerate(self.classes) if i in seen]
        if has_val:
            zv = np.stack([f.val_logits for f in fits], 1)
            Tn = Tv.cpu().numpy()
            a, b = aggregate.fit_calibration(zv, Tn, settings.calibration)
            conf = aggregate.confidences(zv)
            thr = aggregate.fit_thresholds(conf, Tn)
            val = binary_head_metrics(conf, Tn, thr)
        else:
            a, b, thr, val = np.ones(len(names)), np.zeros(len(names)), np.full(len(names), 0.5), [{}] * len(names)
        for j, (c, f) in enumerate(zip(names, fits)):
            self.heads[c] = norm.fold(f.params)
            self.records[c] = HeadRecord(
                seed=f.seed, positives=f.positives, negatives=f.negatives, pos_weight=f.pos_weight, l2=f.l2,
                threshold=float(thr[j]), calibration=Calibration(settings.calibration if (a[j], b[j]) != (1.0, 0.0) else "none",
                                                                 float(a[j]), float(b[j])),
                trained_with=list(trained_with), solver=f.solver, iterations=f.iterations,
                grad_norm=None if np.isnan(f.grad_norm) else f.grad_norm,
                val_loss=None if np.isnan(f.val_loss) else f.val_loss, val=val[j], run=run,
                l2_path=[[s, None if np.isnan(v) else v] for s, v in (f.l2_path or [])], curve=f.curve or [])

    def _normalizer(self, X: torch.Tensor, Xv: torch.Tensor, all_rows: bool) -> Normalizer:
        """The rows' standardisation: from the statistics' running sums when the rows are every remembered row (no
        pass over them; statistics saved before the sums were kept get them from these rows, once), else from
        the rows."""
        st = self.stats
        if self.normalize != "standardize" or not all_rows or st is None or float(st.rows) != len(X) + len(Xv):
            return Normalizer.fit(self.normalize, X, Xv.to(X.device, X.dtype))
        if st.moments is None:
            st.moments = moments(X, Xv)
        return Normalizer.from_moments(st.moments, float(st.rows), X.dtype)

    # --- growing: the one implementation of each step --------------------------------------------------------

    def fit(self, X: torch.Tensor, y: torch.Tensor, Xv: torch.Tensor, yv: torch.Tensor, settings: TrainConfig, *,
            progress=None) -> None:
        """Every head, and the statistics, from these rows (labels index `classes`)."""
        self.stats = None
        self.remember(X, y, Xv, yv, settings)
        if self.head_type == "ridge":
            self.solve_ridge_heads(settings.seed)
        else:
            self.fit_heads(list(self.classes), X, y, Xv, yv, settings, progress=progress, all_rows=True)
        self.rebuild_gate(lambda: (X, y, Xv, yv))

    def remember(self, X: torch.Tensor, y: torch.Tensor, Xv: torch.Tensor, yv: torch.Tensor,
                 settings: TrainConfig | None = None, sign: float = 1.0) -> None:
        """Add (or subtract) rows to the statistics; builds them on first use (also for a model saved before
        statistics existed: then X.. must be every remembered row)."""
        if self.stats is None:
            settings = settings or TrainConfig()
            dim = self.backbone.get("dim") or X.shape[1]
            fm = FeatureMap.random(dim, min(settings.stats_features, 4 * dim), settings.seed)
            self.stats = Stats.empty(fm.size(dim), fm, dim)
        for A, lab in ((X, y), (Xv, yv)):
            self.stats.update(A, lab, list(self.classes), sign)

    def add_class(self, name: str, X: torch.Tensor, Xv: torch.Tensor, settings: TrainConfig, *,
                  remembered=None, progress=None) -> None:
        """One new class from its own rows (train X, validation Xv): its statistics are added, its head is trained
        (a BCE head on `remembered()` -> (X, y, Xv, yv): every remembered row, the new ones included; ridge heads are
        re-solved from the statistics alone), and the gate is rebuilt from the statistics. Other BCE heads are
        untouched. A class that exists is replaced: its old rows must have been subtracted (`forget`) first."""
        if name not in self.classes:
            self.classes.append(name)
        k = self.classes.index(name)
        lab = lambda A: torch.full((len(A),), k, dtype=torch.long)  # noqa: E731
        if self.stats is None:  # a model saved before statistics: built once from everything it remembers
            self.remember(*remembered(), settings)
        else:
            self.remember(X, lab(X), Xv, lab(Xv), settings)
        if self.head_type == "ridge":
            self.solve_ridge_heads(settings.seed)
        else:
            self.fit_heads([name], *remembered(), settings, progress=progress, all_rows=True)
        self.rebuild_gate(remembered)

    def forget(self, name: str, X: torch.Tensor) -> None:
        """Subtract class `name`'s rows X (its examples of no other class) from the statistics and drop its column."""
        if self.stats is None or name not in self.stats.classes:
            return
        self.stats.update(X, torch.full((len(X),), -1, dtype=torch.long), [], -1.0)
        self.stats.drop(name)

    def remove_class(self, name: str, X: torch.Tensor, remembered=None) -> None:
        """Drop one class: its head, its remembered examples, and its rows X (the examples that were only of this
        class) from the statistics. Other BCE heads are untouched; ridge heads and the gate are re-solved."""
        self.forget(name, X)
        self.classes.remove(name)
        del self.heads[name], self.records[name]
        kept = []
        for e in self.examples:
            if "labels" in e:  # multi-label: the image stays an example of its other labels
                e = {**e, "labels": [c for c in e["labels"] if c != name]}
                if not e["labels"]:
                    continue
                e["label"] = e["labels"][0]
            elif e["label"] == name:
                continue
            kept.append(e)
        self.examples = kept
        if self.head_type == "ridge":
            self.solve_ridge_heads(self.records[self.classes[0]].seed)
        self.rebuild_gate(remembered)

    def refresh(self, names: list[str], X: torch.Tensor, y: torch.Tensor, Xv: torch.Tensor, yv: torch.Tensor,
                settings: TrainConfig, *, progress=None) -> None:
        """Retrain the heads of `names` on every remembered row (X.. : all of them); the statistics stay."""
        if self.stats is None:
            self.remember(X, y, Xv, yv, settings)
        if self.head_type == "ridge":
            self.solve_ridge_heads(settings.seed)
        else:
            self.fit_heads(names, X, y, Xv, yv, settings, progress=progress, all_rows=True)
        self.rebuild_gate(lambda: (X, y, Xv, yv))

    def rewritten(self, changed: set[str]) -> set[str]:
        """The head files a change rewrites: `changed`, or every head of a ridge model (all re-solved together)."""
        return set(self.classes) if self.head_type == "ridge" else set(changed)

    def solve_ridge_heads(self, seed: int, run: str | None = None) -> None:
        """Every class's ridge head from the statistics (one solve for all): exact under growth."""
        run = run or new_run_id()
        r = self.stats.ridge(list(self.classes))
        W, b = ridge_heads(r)
        s = self.stats
        for j, c in enumerate(self.classes):
            n = float(s.counts[s.classes.index(c)])
            self.heads[c] = {"weight": W[j].float(), "bias": b[j].float()}
            self.records[c] = HeadRecord(
                seed=seed, positives=int(n), negatives=int(float(s.rows) - n), pos_weight=1.0, l2=r.strength,
                threshold=0.5, calibration=Calibration("none"), trained_with=list(self.classes), solver="ridge",
                run=run)

    def rebuild_gate(self, remembered=None) -> None:
        """The gate, or none when every head has seen every class. 'lda' (default) and 'ridge': solved from the
        statistics, exactly the same for a model grown in any order as for one built at once. 'softmax': the earlier
        gate, a multinomial logistic regression refit on `remembered()` -> (X, y, Xv, yv), every remembered row."""
        if not self.grown():
            self.gate = None
        elif self.gate_method in ("lda", "ridge"):
            self.gate = stats_gate(self.stats, self.classes, self.gate_method)
        else:
            X, y, Xv, yv = remembered()
            self.gate = aggregate.softmax_gate(X, first_label(y), Xv, first_label(yv), self.classes)


def stats_gate(stats: Stats, classes: list[str], method: str = "lda", shrinkage: float = GATE_SHRINKAGE
               ) -> aggregate.Gate:
    """The gate of `classes` solved from the statistics: 'lda' (of this shrinkage) or 'ridge', its temperature from
    the Gaussian model of the scores (stats.gate_posterior)."""
    r = stats.lda(list(classes), shrinkage) if method == "lda" else stats.ridge(list(classes))
    W, b, beta = gate_posterior(r)
    return aggregate.Gate(list(classes), W.float(), b.float(), method, r.strength, 1.0 / beta,
                          stats.features.projection)


def grow_in_order(X: torch.Tensor, y: torch.Tensor, Xv: torch.Tensor, yv: torch.Tensor, classes: list[str],
                  settings: TrainConfig, *, normalize: str = "standardize", step=None) -> Model:
    """A model of classes[:2] trained together, then classes[2:] added one at a time by `Model.add_class`, as `ovr
    add-class` does (labels index `classes`). `step(model, n)` is called on the first model (n = 2) and after each
    class is added (n classes)."""
    def upto(A, lab, n):
        keep = lab < n
        return A[keep.to(A.device)], lab[keep]

    m = Model({"dim": X.shape[1]}, normalize, settings.head, list(classes[:2]), gate_method=settings.gate)
    m.fit(*upto(X, y, 2), *upto(Xv, yv, 2), settings)
    if step is not None:
        step(m, 2)
    for n in range(3, len(classes) + 1):
        Xa, ya, Xva, yva = (*upto(X, y, n), *upto(Xv, yv, n))
        m.add_class(classes[n - 1], Xa[(ya == n - 1).to(Xa.device)], Xva[(yva == n - 1).to(Xva.device)], settings,
                    remembered=lambda: (Xa, ya, Xva, yva))
        if step is not None:
            step(m, n)
    return m


@dataclass
class Answer:
    index: np.ndarray  # [n] class index, or -1 for unknown
    confidences: np.ndarray  # [n, N] per head (calibrated if asked), times its gate
    thresholds: np.ndarray  # [N] in the same space
    logits: np.ndarray  # [n, N]
    labels: np.ndarray  # [n, N] bool: every class whose confidence passes its threshold (multi-label)
    top_index: np.ndarray  # [n, k] by confidence, highest first (k >= 2 where there are 2 classes)
    top_confidence: np.ndarray  # [n, k]
    calibrated: np.ndarray  # [n, N] calibrated confidences times the gate, whichever `confidences` are

    def multilabel(self) -> np.ndarray:
        return self.labels


def head_targets(y: torch.Tensor, columns: np.ndarray, device) -> torch.Tensor:
    """Targets [n, len(columns)] for the heads of these class indices: from labels [n] (-1: a negative for all),
    or from a multi-label target matrix [n, classes]."""
    cols = torch.as_tensor(columns, device=device)
    if y.ndim == 2:
        return y.to(device)[:, cols].float()
    return (y.to(device)[:, None] == cols).float()


def classes_present(y: torch.Tensor) -> set[int]:
    if y.ndim == 2:
        return set(torch.nonzero(y.sum(0) > 0).flatten().tolist())
    return set(y[y >= 0].tolist())


def first_label(y: torch.Tensor) -> torch.Tensor:
    """Labels [n] from labels or a target matrix (a row's first label; -1 for a row with none)."""
    if y.ndim == 1:
        return y
    has = y.sum(1) > 0
    return torch.where(has.to(y.device), y.argmax(1), torch.full_like(has, -1, dtype=torch.long))


def heads_per_chunk(rows: int, grid: int, device, requested: int = 0, dim: int = 0) -> int:
    """How many heads one solve takes at once, in memory. The exact solver keeps about 8 float32 [rows, heads x
    grid] work arrays, and per column about 64 bytes x 10 curvature pairs x (dim + 1) (the L-BFGS memory in float64,
    and the pairs the path hands from one strength to the next and to the refit in float32); 10,000 classes x 11
    strengths on 100,000 rows would be 350 GB, so heads are solved in chunks sized to a quarter of the free memory
    (GPU) or 2 GB (CPU). MLP heads train in chunks of this many heads; a linear solve takes `solve_columns`."""
    if requested > 0:
        return requested
    budget = 2e9
    if torch.device(device).type == "cuda":
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        budget = free / 4
    per_head = max(grid, 1) * (8 * 4 * max(rows, 1) + 64 * 10 * (dim + 1))
    return max(1, int(budget // per_head))


# Columns per L-BFGS solve on the CPU: fewer pay each pass over the rows once per handful of columns (and a
# solve's last iterations, where a few slow columns remain, once per block); more push the [rows, columns] work
# arrays out of the caches (benchmarks/blocks.py).
CPU_COLUMNS = 128


def solve_columns(rows: int, device, requested: int = 0, dim: int = 0) -> int:
    """How many columns one exact solve over `rows` rows takes at a time (`logistic_lbfgs`'s block): `requested`,
    else what the memory holds (`heads_per_chunk` of one strength), at most CPU_COLUMNS on the CPU."""
    if requested > 0:
        return requested
    fits = heads_per_chunk(rows, 1, device, 0, dim)
    return fits if torch.device(device).type == "cuda" else min(fits, CPU_COLUMNS)
