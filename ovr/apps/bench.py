"""`ovr bench`: one-vs-rest against softmax (and scikit-learn references) on the same cached features.

Every method sees the same embeddings, splits and scenarios; each number is a mean and spread over seeds.
Prints nothing: returns a dict that report.py renders as tables, JSON, Markdown and plots.
"""
from __future__ import annotations

import copy
import hashlib
import platform
import time

import numpy as np
import torch

from ..learn import aggregate
from ..runtime import cpu_model
from ..version import __version__
from ..config import Config, config_to_dict
from ..embedding.features import Progress
from ..learn.estimators import OvRClassifier, SoftmaxClassifier
from ..embedding.data import split_assignments
from ..learn.metrics import (MULTILABEL_SCALARS, classification_metrics, expected_calibration_error, reliability,
                      worst_errors)

METHODS = ("ovr", "ovr-ridge", "softmax", "sklearn-ovr", "sklearn-multinomial")
SCENARIOS = ("plain", "imbalance", "few-shot")


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def fit_temperature(z: np.ndarray, y: np.ndarray) -> float:
    """The softmax baseline's calibration: one temperature in [0.05, 20] minimising validation NLL."""
    if len(z) == 0:
        return 1.0
    return aggregate.softmax_temperature(torch.as_tensor(z, dtype=torch.float64), torch.as_tensor(y).long(), t_max=20.0)[0]


RESAMPLE = 0.9  # the share of each class's training rows a seed draws: seeds differ in data, so the spread is real


def _scenario_train(y: np.ndarray, scenario: str, seed: int, cfg: Config) -> np.ndarray:
    """Indices of the training rows a seed and scenario keep: a seeded stratified RESAMPLE share of each class
    (so seeds differ in their data, not only in their initialisation: exact solvers give the same heads for any
    seed), then all of it; odd classes cut to a fraction; k per class."""
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        idx = idx[:max(1, int(round(len(idx) * RESAMPLE)))]
        if scenario == "imbalance" and c % 2 == 1:
            idx = idx[:max(1, int(round(len(idx) * cfg.bench.imbalance_ratio)))]
        elif scenario == "few-shot":
            idx = idx[:cfg.bench.few_shot_k]
        keep.append(idx)
    return np.sort(np.concatenate(keep))


class _Method:
    """Fit + scores for one method, with the same (X, y, Xv, yv) interface for all of them."""

    def __init__(self, name: str, cfg: Config, seed: int, device: str) -> None:
        self.name, self.cfg, self.seed, self.device = name, cfg, seed, device
        self.ovr_like = name in ("ovr", "ovr-ridge", "sklearn-ovr")

    def fit(self, X, y, Xv, yv):
        t = self.cfg.train
        kw = dict(head=t.head, hidden=t.hidden, epochs=t.epochs, lr=t.lr, batch_size=t.head_batch_size,
                  patience=t.patience, normalize=t.normalize, seed=self.seed, device=self.device)
        t0 = time.perf_counter()
        if self.name in ("ovr", "ovr-ridge", "softmax"):
            Xn, yn, ev = X.cpu().numpy(), y.cpu().numpy(), (Xv.cpu().numpy(), yv.cpu().numpy())
        if self.name in ("ovr", "ovr-ridge"):  # ovr-ridge: closed-form ridge heads from the statistics
            kw["head"] = "ridge" if self.name == "ovr-ridge" else kw["head"]
            self.m = OvRClassifier(l2_grid=t.l2_grid, l2_search=t.l2_search, pos_weight=t.pos_weight,
                                   calibration=t.calibration, tol=t.tol, max_iter=t.max_iter, **kw).fit(Xn, yn, eval_set=ev)
        elif self.name == "softmax":  # the heads' strengths: the two differ in the loss only
            self.m = SoftmaxClassifier(l2_grid=t.l2_grid, **kw).fit(Xn, yn, eval_set=ev)
        else:
            from sklearn.linear_model import LogisticRegression
            from sklearn.multiclass import OneVsRestClassifier
            from sklearn.pipeline import make_pipeline
            from sklearn.preprocessing import StandardScaler

            lr = LogisticRegression(max_iter=1000)
            est = OneVsRestClassifier(lr, n_jobs=-1) if self.name == "sklearn-ovr" else lr
            self.m = make_pipeline(StandardScaler(), est).fit(X.cpu().numpy(), y.numpy())
        self.fit_seconds = time.perf_counter() - t0
        return self

    def logits(self, X) -> np.ndarray:
        if self.name in ("ovr", "ovr-ridge", "softmax"):
            return self.m._logits(X)
        return self.m.decision_function(X.cpu().numpy())

    def proba(self, z: np.ndarray) -> np.ndarray:
        return aggregate.normalise_rows(aggregate.confidences(z)) if self.ovr_like else _softmax(z)

    def calibrated(self, zv, yv, z) -> np.ndarray:
        if self.ovr_like:
            T = (yv[:, None] == np.arange(z.shape[1])).astype(float)
            a, b = aggregate.fit_calibration(zv, T, "platt")
            return aggregate.normalise_rows(aggregate.confidences(z, a, b))
        return _softmax(z / fit_temperature(zv, yv))


def _add_class(method: _Method, X, y, Xv, yv, Xt, K: int) -> tuple[float, np.ndarray]:
    """Train on classes 0..K-2, then add class K-1: OvR-style methods train one head (ovr: and rebuild its gate),
    the others retrain all.
    Returns (seconds to add, test predictions over K classes)."""
    old, oldv = y < K - 1, yv < K - 1
    base = _Method(method.name, method.cfg, method.seed, method.device).fit(X[old.to(X.device)], y[old], Xv[oldv.to(Xv.device)], yv[oldv])
    t0 = time.perf_counter()
    if method.name in ("ovr", "ovr-ridge"):  # exactly what `ovr add-class` does, through the same Model
        m = copy.deepcopy(base.m.model_)
        m.add_class(str(K - 1), X[(y == K - 1).to(X.device)], Xv[(yv == K - 1).to(Xv.device)], method.cfg.train,
                    remembered=lambda: (X, y, Xv, yv))  # its head, its statistics and the gate: all timed
        return time.perf_counter() - t0, m.answer(Xt).index
    elif method.name == "sklearn-ovr":
        from sklearn.linear_model import LogisticRegression

        scaler = base.m[0]
        head = LogisticRegression(max_iter=1000).fit(scaler.transform(X.cpu().numpy()), (y.numpy() == K - 1))
        seconds = time.perf_counter() - t0
        z = np.concatenate([base.logits(Xt), head.decision_function(scaler.transform(Xt.cpu().numpy()))[:, None]], 1)
    else:
        full = _Method(method.name, method.cfg, method.seed, method.device).fit(X, y, Xv, yv)
        seconds = time.perf_counter() - t0
        z = full.logits(Xt)
    return seconds, z.argmax(1)


def _mean_std(values: list[float]) -> dict:
    v = np.asarray(values, dtype=float)
    return {"mean": float(v.mean()), "std": float(v.std()), "median": float(np.median(v)), "min": float(v.min()),
            "max": float(v.max()), "values": [float(x) for x in v]}


SCALARS = ("accuracy", "accuracy_tta", "macro_f1", "balanced_accuracy", "top3_accuracy", "nll", "ece",
           "ece_calibrated", "train_seconds", "predict_per_second", "add_class_seconds", "accuracy_after_add")


def with_views(X: torch.Tensor, y: torch.Tensor, V: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Training rows plus their augmented views (V: [n, K, D], or None)."""
    if V is None or V.shape[1] == 0:
        return X, y
    K = V.shape[1]
    return torch.cat([X, V.reshape(-1, V.shape[-1]).to(X.device)]), torch.cat([y, y.repeat_interleave(K)])


def tta_accuracy(meth: "_Method", Xt: torch.Tensor, Vt: torch.Tensor, yt: np.ndarray) -> float:
    """Test accuracy with each head's (or the softmax's) logits averaged over the plain and K augmented views."""
    z = np.mean([meth.logits(Xt)] + [meth.logits(Vt[:, k].to(Xt.device)) for k in range(Vt.shape[1])], axis=0)
    return float((z.argmax(1) == yt).mean())


def run_bench(emb, cfg: Config, progress: Progress | None = None, methods: tuple[str, ...] | None = None,
              scenarios: tuple[str, ...] = SCENARIOS, views: dict | None = None) -> dict:
    """emb: an EmbeddedFolder. Every method x scenario x seed; add-class and its scaling on the plain scenario.
    views (from pipeline.bench_views): {"train": [n_train, K, D], "test": [n_test, K, D]} augmented views: then
    a "views" scenario (ovr and softmax trained on plain + K views of each training image) and accuracy with
    test-time augmentation (K test views) for every plain and views run."""
    classes = list(emb.folder.classes)
    K = len(classes)
    dev = str(emb.result.embeddings.device)
    X, y, _ = emb.split("train")
    Xv, yv, _ = emb.split("val")
    Xt, yt, _ = emb.split("test")
    if len(Xt) == 0 or len(Xv) == 0 or K < 3:
        from ..errors import OvrError
        raise OvrError("bench needs at least 3 classes and images in the val and test splits")
    y, yv, yt = y.cpu(), yv.cpu(), yt.cpu()
    methods = methods or tuple(m for m in METHODS if cfg.bench.sklearn and len(X) <= cfg.bench.sklearn_max_samples
                               or not m.startswith("sklearn"))
    seeds = list(range(cfg.train.seed, cfg.train.seed + cfg.bench.seeds))
    runs: dict = {s: {m: [] for m in methods} for s in scenarios}
    n_train: dict = {}
    detail: dict = {}
    total = len(scenarios) * len(methods) * len(seeds)
    done = 0
    yt_np, yv_np = yt.numpy(), yv.numpy()
    if views is not None:
        scenarios = (*scenarios, "views")
        runs["views"] = {m: [] for m in methods if m in ("ovr", "softmax")}
        total += len(runs["views"]) * len(seeds)
    for scen in scenarios:
        for seed in seeds:
            keep = torch.from_numpy(_scenario_train(y.numpy(), "plain" if scen == "views" else scen, seed, cfg))
            Xs, ys = X[keep.to(X.device)], y[keep]
            if scen == "views":
                Xs, ys = with_views(Xs, ys, views["train"][keep])
            n_train[scen] = int(len(Xs))
            for name in (m for m in methods if scen != "views" or m in ("ovr", "softmax")):
                meth = _Method(name, cfg, seed, dev).fit(Xs, ys, Xv, yv)
                t0 = time.perf_counter()
                z = meth.logits(Xt)
                pps = len(Xt) / max(time.perf_counter() - t0, 1e-9)
                proba = meth.proba(z)
                cal = meth.calibrated(meth.logits(Xv), yv_np, z)
                r = classification_metrics(yt_np, z.argmax(1), proba, classes)
                r.update(ece_calibrated=expected_calibration_error(cal, yt_np), train_seconds=meth.fit_seconds,
                         predict_per_second=pps)
                if views is not None and scen in ("plain", "views"):
                    r["accuracy_tta"] = tta_accuracy(meth, Xt, views["test"], yt_np)
                if scen == "plain":
                    secs, pred = _add_class(meth, Xs, ys, Xv, yv, Xt, K)
                    r.update(add_class_seconds=secs, accuracy_after_add=float((pred == yt_np).mean()))
                    if seed == seeds[0]:
                        detail[name] = {"confusion_matrix": r["confusion_matrix"], "per_class": r["per_class"],
                                        "reliability": reliability(proba, yt_np),
                                        "reliability_calibrated": reliability(cal, yt_np)}
                        if name == "ovr":  # the report's per-head curves and error gallery
                            recs = meth.m.model_.records
                            detail[name]["heads"] = {classes[int(c)]: {"l2": recs[c].l2, "l2_path": recs[c].l2_path,
                                                                       "curve": recs[c].curve} for c in recs}
                            test_paths = [emb.result.paths[i] for i in np.flatnonzero(emb.splits == "test")]
                            detail[name]["errors"] = worst_errors(test_paths, yt_np, z.argmax(1),
                                                                  aggregate.confidences(z), classes)
                runs[scen][name].append(r)
                done += 1
                if progress:
                    progress("bench", done, total)
    results = {s: {m: {k: _mean_std([r[k] for r in rs]) for k in SCALARS if k in rs[0]}
                   for m, rs in per.items() if rs} for s, per in runs.items()}
    per_class = {s: {m: {c: _mean_std([r["per_class"][c]["f1"] for r in rs]) for c in classes}
                     for m, rs in per.items() if rs} for s, per in runs.items()}
    scaling = add_class_scaling(X, y, Xv, yv, cfg, dev, [m for m in ("ovr", "softmax") if m in methods])
    growth = growth_curve(X, y, Xv, yv, Xt, yt, cfg) if "ovr" in methods and cfg.train.head == "linear" else None
    digest = hashlib.sha256("".join(sorted(emb.result.keys)).encode()).hexdigest()
    return {
        "classes": classes, "methods": list(methods), "scenarios": list(scenarios), "seeds": seeds,
        "n": {"train": int(len(X)), "val": int(len(Xv)), "test": int(len(Xt)), "train_per_scenario": n_train},
        "results": results, "per_class_f1": per_class, "plain_seed0": detail, "add_class_scaling": scaling,
        "growth": growth, "views": None if views is None else int(views["train"].shape[1]),
        "dataset": {"root": str(emb.folder.root), "fingerprint": digest, "images": len(emb.result.keys)},
        "backbone": emb.backbone.spec() if emb.backbone else None, "config": config_to_dict(cfg),
        "versions": {"ovr": __version__, "torch": torch.__version__, "python": platform.python_version(),
                     "numpy": np.__version__, "sklearn": __import__("sklearn").__version__},
        "device": dev if dev == "cpu" else torch.cuda.get_device_name(0), "cpu": cpu_model(),
    }


def growth_curve(X, y, Xv, yv, Xt, yt, cfg: Config, points: int = 12) -> dict:
    """One model grown from 2 classes to all, one add-class at a time (class order seeded), through
    `model.grow_in_order` as `ovr add-class` does: test accuracy on the classes so far for the model's answer and
    plain argmax, beside a model trained jointly on the same classes (at up to `points` steps: a joint fit each)."""
    from ..learn.model import Model, grow_in_order

    K = int(y.max()) + 1
    order = np.random.default_rng(cfg.train.seed).permutation(K).tolist()
    names = [str(c) for c in order]
    pos = torch.empty(K, dtype=torch.long)
    pos[torch.tensor(order)] = torch.arange(K)
    # every size when they are few (a joint fit each), else `points` sizes from 2 to K, always both ends
    steps = set(range(2, K + 1)) if K - 1 <= points else {int(round(v)) for v in np.linspace(2, K, points)} | {2, K}
    out = {"order": [int(c) for c in order], "classes": [], "grown": [], "argmax": [], "joint": []}

    def rows(A, lab, n):  # the rows of the first n classes of the order, relabelled to their position in it
        keep = pos[lab] < n
        return A[keep.to(A.device)], pos[lab][keep]

    def step(m: Model, n: int) -> None:
        if n not in steps:
            return
        Xta, yta = rows(Xt, yt, n)
        a = m.answer(Xta)
        joint = Model({"dim": X.shape[1]}, cfg.train.normalize, cfg.train.head, names[:n])
        joint.fit(*rows(X, y, n), *rows(Xv, yv, n), cfg.train)
        out["classes"].append(n)
        out["grown"].append(float((a.index == yta.numpy()).mean()))
        out["argmax"].append(float((a.logits.argmax(1) == yta.numpy()).mean()))
        out["joint"].append(float((joint.answer(Xta).index == yta.numpy()).mean()))

    grow_in_order(X, pos[y], Xv, pos[yv], names, cfg.train, normalize=cfg.train.normalize, step=step)
    return out


def add_class_scaling(X, y, Xv, yv, cfg: Config, dev: str, methods: list[str]) -> dict:
    """Time to add the n-th class for growing n (one seed): OvR trains one head, softmax retrains everything."""
    K = int(y.max()) + 1
    ns = sorted({n for n in (3, K // 2, K - 2, K) if 3 <= n <= K})
    out: dict = {"n_classes": ns}
    for name in methods:
        secs = []
        for n in ns:
            m, mv = y < n, yv < n
            secs.append(_add_class(_Method(name, cfg, cfg.train.seed, dev), X[m.to(X.device)], y[m], Xv[mv.to(Xv.device)],
                                   yv[mv], X[:1], n)[0])
        out[name] = secs
    return out


MULTILABEL_NOTE = ("softmax baseline skipped: this data is multi-label, and a softmax head answers one class per "
                   "image; ovr alone is measured (mAP, F1 at the stored thresholds, subset accuracy, Hamming loss)")


def run_bench_multilabel(emb, cfg: Config, progress: Progress | None = None) -> dict:
    """Multi-label data: ovr heads over seeded resplits of the embedded rows (no re-embedding), scored with
    scikit-learn's multi-label metrics on each resplit's test rows; mean and spread over resplits."""
    from ..embedding.data import split_assignments
    from ..learn.metrics import multilabel_metrics
    from ..learn.model import Model

    classes = list(emb.folder.classes)
    T = emb.folder.targets[emb.result.input_index]
    X = emb.result.embeddings
    Y = torch.from_numpy(T.astype(np.float32))
    seeds = list(range(cfg.train.seed, cfg.train.seed + cfg.bench.seeds))
    runs = []
    for k, seed in enumerate(seeds):
        sp = np.array(split_assignments(len(X), cfg.data.val_fraction, cfg.data.test_fraction, seed, "bench-multilabel"))
        rows = {s: torch.from_numpy(np.flatnonzero(sp == s)) for s in ("train", "val", "test")}
        m = Model(emb.backbone.spec() if emb.backbone else {}, cfg.train.normalize, cfg.train.head, classes,
                  calibration=cfg.train.calibration)
        t0 = time.perf_counter()
        m.fit_heads(classes, X[rows["train"].to(X.device)], Y[rows["train"]], X[rows["val"].to(X.device)],
                    Y[rows["val"]], cfg.train)
        seconds = time.perf_counter() - t0
        test = rows["test"].numpy()
        ans = m.answer(X[rows["test"].to(X.device)])
        r = multilabel_metrics(T[test], ans.confidences, ans.multilabel(), classes)
        r["train_seconds"] = seconds
        runs.append(r)
        if progress:
            progress("bench", k + 1, len(seeds))
    return {
        "multilabel": True, "note": MULTILABEL_NOTE, "classes": classes, "seeds": seeds, "methods": ["ovr"],
        "n": {"images": int(len(X)), "test_per_resplit": [int(r["n"]) for r in runs]},
        "results": {k: _mean_std([r[k] for r in runs]) for k in (*MULTILABEL_SCALARS, "train_seconds")},
        "per_class_ap": {c: _mean_std([r["per_class"][c]["ap"] for r in runs if r["per_class"][c]["ap"] is not None]
                                      or [float("nan")]) for c in classes},
        "dataset": {"root": str(emb.folder.root), "images": len(emb.result.keys)},
        "backbone": emb.backbone.spec() if emb.backbone else None, "config": config_to_dict(cfg),
        "versions": {"ovr": __version__, "torch": torch.__version__, "python": platform.python_version()},
    }


def compare_backbones(data, names: list[str], cfg: Config, min_images_per_s: float = 0.0,
                      progress: Progress | None = None) -> dict:
    """`ovr bench --backbones`: each backbone embeds DATA (through the cache), then OvR and softmax heads are fitted
    on `cfg.bench.seeds` seeded stratified resplits of all its images (train/val/test by cfg.data's fractions):
    test accuracy and macro-F1, mean and std; beside them the backbone's forward images/s on this machine
    (backbones.measure, with the engine in use). Recommended: the most accurate (OvR, mean) of those at least
    `min_images_per_s` fast."""
    from dataclasses import replace

    from sklearn.metrics import f1_score

    from ..embedding.backbones import measure
    from .pipeline import embed_data
    from ..runtime import resolve_device

    rows = []
    for name in names:
        # one weights file cannot fit several backbones: each takes its default weights (or none, if asked)
        weights = "none" if cfg.features.weights == "none" else "default"
        bcfg = replace(cfg, features=replace(cfg.features, backbone=name, weights=weights))
        emb = embed_data(data, bcfg, progress)
        X = emb.result.embeddings.float()
        y = torch.as_tensor(np.asarray(emb.labels))
        classes = list(emb.folder.classes)
        speed = measure(emb.backbone, resolve_device(bcfg.features.device))
        scores: dict[str, dict[str, list[float]]] = {m: {"accuracy": [], "macro_f1": []} for m in ("ovr", "softmax")}
        for seed in range(cfg.bench.seeds):
            split = np.empty(len(y), dtype=object)
            for c in range(len(classes)):  # stratified, seeded per resplit
                idx = np.flatnonzero(y.numpy() == c)
                split[idx] = split_assignments(len(idx), cfg.data.val_fraction, cfg.data.test_fraction, seed,
                                               classes[c])
            part = {s: torch.from_numpy(np.flatnonzero(split == s)) for s in ("train", "val", "test")}
            Xs, Xv, Xt = (X[part[s].to(X.device)] for s in ("train", "val", "test"))
            ys, yv, yt = (y[part[s]] for s in ("train", "val", "test"))
            for m in scores:
                pred = _Method(m, cfg, cfg.train.seed, str(X.device)).fit(Xs, ys, Xv, yv).logits(Xt).argmax(1)
                scores[m]["accuracy"].append(float((pred == yt.numpy()).mean()))
                scores[m]["macro_f1"].append(float(f1_score(yt.numpy(), pred, average="macro")))
        rows.append({"backbone": name, "dim": emb.backbone.dim, "images": len(y), "params": speed["params"],
                     "images_per_s": speed["images_per_s"], "engine": emb.backbone.engine,
                     **{f"{m}_{k}": _mean_std(v) for m, ks in scores.items() for k, v in ks.items()}})
        if progress:
            progress("backbones", len(rows), len(names))
    fast = [r for r in rows if r["images_per_s"] >= min_images_per_s]
    best = max(fast, key=lambda r: r["ovr_accuracy"]["mean"]) if fast else None
    return {"data": str(getattr(data, "root", data)), "seeds": cfg.bench.seeds, "min_images_per_s": min_images_per_s, "rows": rows,
            "recommended": best["backbone"] if best else None,
            "versions": {"ovr": __version__, "torch": torch.__version__}}
