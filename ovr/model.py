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
from .config import TrainConfig
from .heads import Normalizer, Tensors, fit_ovr_heads, head_inputs, stack_heads, stacked_logits
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

    # --- reading --------------------------------------------------------------------------------------------

    def logits(self, X: torch.Tensor, classes: list[str] | None = None) -> np.ndarray:
        classes = classes or self.classes
        if X.ndim != 2 or (self.backbone.get("dim") and X.shape[1] != self.backbone["dim"]):
            raise ValueError(f"features must be [n, {self.backbone.get('dim')}], got {list(X.shape)}")
        p = stack_heads([self.heads[c] for c in classes], X.device)
        with torch.no_grad():
            return stacked_logits(p, head_inputs(self.normalize, X.to(p[next(iter(p))].dtype))).cpu().numpy()

    def unseen(self) -> np.ndarray:
        """U[h, k]: head h never saw an example of class k (bool [N, N])."""
        return aggregate.unseen_matrix(self.classes, [self.records[c].trained_with for c in self.classes])

    def grown(self) -> bool:
        return bool(self.unseen().any())

    def answer(self, X: torch.Tensor, *, calibrated: bool = False, reject_below: float | None = None,
               thresholds: bool = False, views: list[torch.Tensor] = ()) -> "Answer":
        """Confidences, the class of each row (guarded chain; plain argmax when no head missed a class), and
        'unknown' (-1) by --reject-below / --thresholds. With a gate, every confidence is multiplied by its
        head's gate, so a head is not believed on a class it never saw; thresholds and multi-label use those.
        `views` (test-time augmentation): more embeddings of the same rows; each head's logits, and the gate's
        posteriors, are averaged over X and them."""
        z = np.mean([self.logits(V) for V in (X, *views)], axis=0)
        N = len(self.classes)
        a = np.array([self.records[c].calibration.a for c in self.classes])
        b = np.array([self.records[c].calibration.b for c in self.classes])
        thr = np.array([self.records[c].threshold for c in self.classes])
        raw, cal = aggregate.confidences(z), aggregate.confidences(z, a, b)
        conf = cal if calibrated else raw
        if calibrated:  # the thresholds were chosen on raw confidences; calibration is monotonic
            t = np.clip(thr, 1e-12, 1 - 1e-12)
            thr = aggregate.confidences(np.log(t / (1 - t)), a, b)
        U = self.unseen()
        g = np.ones((len(z), N))
        if U.any() and self.gate is not None and len(z):
            post = np.mean([self.gate.posterior(V) for V in (X, *views)], axis=0)
            order = [self.gate.classes.index(c) for c in self.classes]
            g = aggregate.gates(post[:, order], U)
            idx = aggregate.guarded_chain(conf, cal * g, U)
        else:
            idx = conf.argmax(1) if len(z) else np.zeros(0, dtype=int)
        conf = conf * g
        idx = aggregate.predict(conf, reject_below, thr if thresholds else None, index=idx)
        return Answer(idx, conf, thr, z)

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
                  settings: TrainConfig, *, run: str | None = None, progress=None) -> None:
        """Train (or retrain) the heads of `names` on rows X (train) and Xv (validation), labels indexing
        `classes`. Features are standardised with the statistics of all these rows, and that standardisation is
        folded into the stored heads; calibration and thresholds are fitted on held-out validation logits."""
        from .metrics import binary_head_metrics  # here: scikit-learn takes 0.6 s to import; predict never needs it

        run = run or new_run_id()
        for name, A in (("training", X), ("validation", Xv)):
            if A.ndim != 2 or (self.backbone.get("dim") and A.shape[1] != self.backbone["dim"]):
                raise ValueError(f"{name} features must be [n, {self.backbone.get('dim')}], got {list(A.shape)}")
            if len(A) and not bool(torch.isfinite(A).all()):
                raise ValueError(f"{name} features contain NaN or infinity")
        targets = np.array([self.classes.index(c) for c in names])
        has_val = len(Xv) > 0
        norm = Normalizer.fit(self.normalize, torch.cat([X, Xv]) if has_val else X)
        T, Tv = head_targets(y, targets, X.device), head_targets(yv, targets, X.device) if has_val else None
        Xn, Xvn = norm(X), norm(Xv) if has_val else None
        size = heads_per_chunk(len(X) + len(Xv), len(settings.l2_grid), X.device, settings.chunk_heads)
        fits = []
        for s in range(0, len(names), size):  # heads are independent columns: chunks give the same heads
            fits += fit_ovr_heads(Xn, T[:, s:s + size], Xvn, Tv[:, s:s + size] if has_val else None,
                                  names[s:s + size], progress=progress, **settings.fit_kwargs())
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
                threshold=float(thr[j]), calibration=Calibration(settings.calibration, float(a[j]), float(b[j])),
                trained_with=list(trained_with), solver=f.solver, iterations=f.iterations,
                grad_norm=None if np.isnan(f.grad_norm) else f.grad_norm,
                val_loss=None if np.isnan(f.val_loss) else f.val_loss, val=val[j], run=run,
                l2_path=[[s, None if np.isnan(v) else v] for s, v in (f.l2_path or [])], curve=f.curve or [])

    def rebuild_gate(self, X: torch.Tensor, y: torch.Tensor, Xv: torch.Tensor, yv: torch.Tensor) -> None:
        """The gate from all remembered examples, or none when every head has seen every class. Multi-label rows
        count for their first label (the gate arbitrates single answers)."""
        self.gate = (aggregate.fit_gate(X, first_label(y), Xv, first_label(yv), self.classes) if self.grown()
                     else None)

    def remove(self, name: str) -> None:
        """Drop one head and its class's examples (so no later head learns from them as negatives). The gate
        loses that class's discriminant: the others' do not depend on it."""
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
        if self.gate is not None:
            if not self.grown():
                self.gate = None
            elif name in self.gate.classes:
                self.gate = self.gate.without(name)


@dataclass
class Answer:
    index: np.ndarray  # [n] class index, or -1 for unknown
    confidences: np.ndarray  # [n, N] per head (calibrated if asked), times its gate
    thresholds: np.ndarray  # [N] in the same space
    logits: np.ndarray  # [n, N]

    def multilabel(self) -> np.ndarray:
        return aggregate.multilabel(self.confidences, self.thresholds)


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


def heads_per_chunk(rows: int, grid: int, device, requested: int = 0) -> int:
    """How many heads one solve takes at once. The exact solver keeps about 8 float32 [rows, heads x grid] work
    arrays; 10,000 classes x 11 strengths on 100,000 rows would be 350 GB, so heads are solved in chunks sized to a
    quarter of the free memory (GPU) or 2 GB (CPU, where chunks also keep the arrays in cache-friendly sizes)."""
    if requested > 0:
        return requested
    budget = 2e9
    if torch.device(device).type == "cuda":
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        budget = free / 4
    return max(1, int(budget // (8 * 4 * max(rows, 1) * max(grid, 1))))

