"""ovr's heads against scikit-learn, both sides measured in one run on the same features and splits.

Rows per dataset (synthetic 20,000 x 512 with 100 classes; digits and photos embedded by EfficientNet-Lite0):
- same protocol: every head sweeps the same L2 grid on the same validation split, keeps its best strength by
  validation loss, and is refit on train + validation. ovr: `Model.fit_heads` (all heads x strengths as columns of
  one L-BFGS solve). scikit-learn: `OneVsRestClassifier(LogisticRegression(C=1/(l2*n)), n_jobs=-1)` per strength,
  then each head refit at its strength; its time includes the sweep. On the synthetic set scikit-learn's sweep is
  timed on a subset of heads and scaled to all of them (said in the output; the accuracy row is then not computed).
- what a user types: `OvRClassifier()` vs `make_pipeline(StandardScaler(), OneVsRestClassifier(LogisticRegression(),
  n_jobs=-1))`, both fit on train + validation, over 5 seeded resplits (mean and spread).
- stacked vs one by one: the same heads solved together vs one after another.

    python benchmarks/heads_vs_sklearn.py [--device cpu|cuda] [--datasets synthetic digits photos]
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.multiclass import OneVsRestClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import datasets
from ovr.config import TrainConfig
from ovr.learn.estimators import OvRClassifier
from ovr.learn.model import Model
from ovr.runtime import machine_name, resolve_device
from ovr.learn.solver import weighted_bce

GRID = TrainConfig().l2_grid


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def ovr_fit(X, y, Xv, yv, dev, names=None):
    names = names or [str(k) for k in range(int(y.max()) + 1)]
    classes = [str(k) for k in range(int(y.max()) + 1)]
    t = lambda a: torch.as_tensor(a, device=dev)  # noqa: E731
    m = Model({"dim": X.shape[1]}, "standardize", "linear", classes)
    sync(dev)
    t0 = time.perf_counter()
    m.fit_heads(names, t(X), t(y), t(Xv), t(yv), TrainConfig())
    sync(dev)
    return m, time.perf_counter() - t0


def sklearn_same_protocol(X, y, Xv, yv, heads: list[int]):
    """Per head: sweep GRID (OneVsRest per strength), keep the best validation loss, refit on train + val."""
    sc = StandardScaler().fit(np.concatenate([X, Xv]))
    Xs, Xvs = sc.transform(X), sc.transform(Xv)
    n = len(X)
    K = int(y.max()) + 1
    T, Tv = (y[:, None] == np.arange(K))[:, heads], (yv[:, None] == np.arange(K))[:, heads]
    t0 = time.perf_counter()
    val = np.zeros((len(heads), len(GRID)))
    for g, l2 in enumerate(GRID):
        est = OneVsRestClassifier(LogisticRegression(C=1 / (l2 * n), max_iter=1000), n_jobs=-1).fit(Xs, T)
        z = np.stack([e.decision_function(Xvs) for e in est.estimators_], 1)
        pw = (len(T) - T.sum(0)) / T.sum(0)
        val[:, g] = weighted_bce(torch.tensor(z), torch.tensor(Tv, dtype=torch.float64), torch.tensor(pw)).numpy()
    best = val.argmin(1)
    Xa, Ta = np.concatenate([Xs, Xvs]), np.concatenate([T, Tv])
    coefs = []
    for j in range(len(heads)):  # refit; scikit-learn's OvR takes one C, so heads are refit one by one (in joblib)
        coefs.append((GRID[best[j]], Ta[:, j]))
    from joblib import Parallel, delayed
    fits = Parallel(n_jobs=-1)(delayed(lambda l2, t: LogisticRegression(C=1 / (l2 * len(Xa)), max_iter=1000).fit(Xa, t))(l2, t)
                               for l2, t in coefs)
    seconds = time.perf_counter() - t0
    return fits, sc, seconds


def bench(name, X, y, Xv, yv, Xt, yt, dev, sk_heads: int | None = None) -> dict:
    K = int(y.max()) + 1
    res: dict = {"dataset": name, "train": list(X.shape), "val": len(Xv), "test": len(Xt), "classes": K,
                 "device": str(dev), "grid": list(GRID)}
    ovr_fit(X[:200], y[:200], Xv[:50], yv[:50], dev)  # warm-up (threads, CUDA context)
    m, t_ovr = ovr_fit(X, y, Xv, yv, dev)
    acc_ovr = float((m.answer(torch.as_tensor(Xt, device=dev)).index == yt).mean())
    its = [r.iterations for r in m.records.values()]
    res["ovr_same_protocol"] = {"seconds": t_ovr, "accuracy": acc_ovr, "iterations_max": max(its),
                                "grad_norm_max": max(r.grad_norm for r in m.records.values())}
    heads = list(range(K)) if sk_heads is None else list(range(sk_heads))
    fits, sc, t_sk = sklearn_same_protocol(X, y, Xv, yv, heads)
    t_sk_all = t_sk * K / len(heads)
    row = {"seconds": t_sk_all, "heads_timed": len(heads), "extrapolated": len(heads) < K}
    if len(heads) == K:
        z = np.stack([f.decision_function(sc.transform(Xt)) for f in fits], 1)
        row["accuracy"] = float((z.argmax(1) == yt).mean())
    res["sklearn_same_protocol"] = row
    res["same_protocol_speedup"] = t_sk_all / t_ovr
    acc_note = f", acc {row['accuracy']:.4f} vs ovr {acc_ovr:.4f}" if "accuracy" in row else " (accuracy not computed)"
    print(f"[{name}] same protocol: ovr {t_ovr:.2f} s, scikit-learn {t_sk_all:.2f} s"
          f"{' (scaled from %d heads)' % len(heads) if row['extrapolated'] else ''} -> {t_sk_all / t_ovr:.1f}x{acc_note}",
          flush=True)

    # stacked vs one by one (the same protocol, same heads)
    n_loop = min(K, 10)
    loop = sum(ovr_fit(X, y, Xv, yv, dev, names=[str(k)])[1] for k in range(n_loop)) * K / n_loop
    res["stacked_vs_loop"] = {"heads": K, "stacked_s": t_ovr, "loop_s": loop, "loop_heads_timed": n_loop,
                              "speedup": loop / t_ovr, "speedup_over_N": loop / t_ovr / K}
    print(f"[{name}] {K} heads stacked {t_ovr:.2f} s vs one by one {loop:.2f} s: {loop / t_ovr:.1f}x = "
          f"{loop / t_ovr / K:.2f} x N", flush=True)

    # what a user types, over 5 resplits of train + val
    Xa, ya = np.concatenate([X, Xv]), np.concatenate([y, yv])
    # "ovr" is what OvRClassifier() does (pos-weighted heads, as the tool trains them); "ovr_no_pos_weight" is
    # the same without pos-weights, which is what scikit-learn's OvR optimises.
    rows = {"ovr": [], "ovr_no_pos_weight": [], "sklearn": []}
    if len(Xa) <= 5000:
        for seed in range(5):
            Xtr, _, ytr, _ = train_test_split(Xa, ya, test_size=0.1, stratify=ya, random_state=seed)
            o, to = timed(lambda: OvRClassifier(device=str(dev), seed=seed).fit(Xtr, ytr))
            u, tu = timed(lambda: OvRClassifier(device=str(dev), seed=seed, pos_weight=False).fit(Xtr, ytr))
            s, ts = timed(lambda: make_pipeline(StandardScaler(), OneVsRestClassifier(
                LogisticRegression(), n_jobs=-1)).fit(Xtr, ytr))
            rows["ovr"].append((to, float((o.predict(Xt) == yt).mean())))
            rows["ovr_no_pos_weight"].append((tu, float((u.predict(Xt) == yt).mean())))
            rows["sklearn"].append((ts, float((s.predict(Xt) == yt).mean())))
        stat = lambda v: {"mean": float(np.mean(v)), "std": float(np.std(v)), "values": list(map(float, v))}  # noqa: E731
        res["defaults"] = {k: {"seconds": stat([r[0] for r in v]), "accuracy": stat([r[1] for r in v])}
                           for k, v in rows.items()}
        d = res["defaults"]
        res["defaults"]["speedup"] = d["sklearn"]["seconds"]["mean"] / d["ovr"]["seconds"]["mean"]
        print(f"[{name}] defaults over 5 resplits: ovr {d['ovr']['seconds']['mean']:.2f} s acc "
              f"{d['ovr']['accuracy']['mean']:.4f} +-{d['ovr']['accuracy']['std']:.4f} (no pos-weight: "
              f"{d['ovr_no_pos_weight']['seconds']['mean']:.2f} s acc {d['ovr_no_pos_weight']['accuracy']['mean']:.4f} "
              f"+-{d['ovr_no_pos_weight']['accuracy']['std']:.4f}); scikit-learn "
              f"{d['sklearn']['seconds']['mean']:.2f} s acc {d['sklearn']['accuracy']['mean']:.4f} "
              f"+-{d['sklearn']['accuracy']['std']:.4f} -> {res['defaults']['speedup']:.1f}x", flush=True)
    return res


def synthetic64(seed: int = 0):
    """The issue's synthetic set: 24,000 x 384, 64 classes (20,000 to train and validate, 4,000 held out)."""
    from sklearn.datasets import make_classification

    X, y = make_classification(n_samples=24000, n_features=384, n_informative=96, n_redundant=0, n_classes=64,
                               n_clusters_per_class=1, class_sep=2.0, random_state=seed)
    X = X.astype(np.float32)
    return X[:17000], y[:17000], X[17000:20000], y[17000:20000], X[20000:], y[20000:]


def defaults(name, X, y, Xv, yv, Xt, yt, dev, resplits: int = 5, repeats: int = 3) -> dict:
    """Default settings on both sides, over seeded resplits of train + validation (each fit on 90% of it, the
    same held-out test rows): OvRClassifier() (the L2 path), OvRClassifier(l2_search="sweep") (every strength),
    and make_pipeline(StandardScaler(), OneVsRestClassifier(LogisticRegression())). Each is fit `repeats` times in a
    row per resplit (the fits are deterministic; the times on a shared 2-core machine are not; the sweep, a
    reference, once): the seconds are the median and spread of every fit. Time, accuracy, the strengths the two
    searches chose, how often they agree, and where not, how much validation loss the path gave up."""
    Xa, ya = np.concatenate([X, Xv]), np.concatenate([y, yv])
    rows: dict[str, list] = {"ovr path (default)": [], "ovr sweep": [], "sklearn default": []}
    agree, chosen, loss_gap = [], {"path": [], "sweep": []}, []
    OvRClassifier(device=str(dev)).fit(Xa[:300], ya[:300])  # warm-up
    make_pipeline(StandardScaler(), OneVsRestClassifier(LogisticRegression(), n_jobs=-1)).fit(Xa[:300], ya[:300])

    def fits(make, X, y, times=repeats):  # -> (the last fitted estimator, every fit's seconds)
        out = [timed(lambda: make().fit(X, y)) for _ in range(times)]
        return out[-1][0], [t for _, t in out]

    for seed in range(resplits):
        Xtr, _, ytr, _ = train_test_split(Xa, ya, test_size=0.1, stratify=ya, random_state=seed)
        p, tp = fits(lambda: OvRClassifier(device=str(dev), seed=seed), Xtr, ytr)
        w, tw = fits(lambda: OvRClassifier(device=str(dev), seed=seed, l2_search="sweep"), Xtr, ytr, 1)
        s, ts = fits(lambda: make_pipeline(StandardScaler(), OneVsRestClassifier(LogisticRegression(), n_jobs=-1)),
                     Xtr, ytr)
        for key, est, t in (("ovr path (default)", p, tp), ("ovr sweep", w, tw), ("sklearn default", s, ts)):
            rows[key].append((t, float((est.predict(Xt) == yt).mean())))
        rp, rw = p.model_.records, w.model_.records
        agree.append(float(np.mean([rp[c].l2 == rw[c].l2 for c in rp])))
        chosen["path"] += [rp[c].l2 for c in rp]
        chosen["sweep"] += [rw[c].l2 for c in rw]
        for c in rp:  # where they differ: the sweep's validation loss at the path's choice minus at its own
            full = dict(map(tuple, rw[c].l2_path)) if rw[c].l2_path else {}
            if rp[c].l2 != rw[c].l2 and rp[c].l2 in full:
                loss_gap.append(full[rp[c].l2] - full[rw[c].l2])
        print(f"  [{name}] resplit {seed}: path {np.median(tp):.2f} s acc {rows['ovr path (default)'][-1][1]:.4f}, "
              f"sweep {np.median(tw):.2f} s acc {rows['ovr sweep'][-1][1]:.4f}, scikit-learn {np.median(ts):.2f} s acc "
              f"{rows['sklearn default'][-1][1]:.4f}; strengths agree on {agree[-1]:.0%} of heads", flush=True)
    out = {"dataset": name, "train_and_val": list(Xa.shape), "test": len(Xt), "classes": int(ya.max()) + 1,
           "resplits": resplits, "repeats": repeats}
    for k, v in rows.items():
        t, acc = np.array([x for r in v for x in r[0]]), np.array([r[1] for r in v])
        out[k] = {"seconds_median": float(np.median(t)), "seconds_min": float(t.min()), "seconds_max": float(t.max()),
                  "seconds_q1_q3": [float(np.percentile(t, 25)), float(np.percentile(t, 75))],
                  "accuracy_mean": float(acc.mean()), "accuracy_std": float(acc.std()), "accuracy": acc.tolist()}
    out["path_speedup_over_sweep"] = out["ovr sweep"]["seconds_median"] / out["ovr path (default)"]["seconds_median"]
    out["path_speedup_over_sklearn"] = out["sklearn default"]["seconds_median"] / out["ovr path (default)"]["seconds_median"]
    out["strengths_agree"] = float(np.mean(agree))
    out["strengths_chosen"] = {k: {str(l2): int(n) for l2, n in zip(*np.unique(v, return_counts=True))}
                               for k, v in chosen.items()}
    out["validation_loss_given_up_where_they_differ"] = ({"n": len(loss_gap), "max": float(max(loss_gap)),
                                                         "mean": float(np.mean(loss_gap))} if loss_gap else {"n": 0})
    d = out
    print(f"[{name}] defaults, {resplits} resplits: path {d['ovr path (default)']['seconds_median']:.2f} s, sweep "
          f"{d['ovr sweep']['seconds_median']:.2f} s, scikit-learn {d['sklearn default']['seconds_median']:.2f} s "
          f"(path {d['path_speedup_over_sklearn']:.2f}x scikit-learn, {d['path_speedup_over_sweep']:.2f}x sweep); "
          f"accuracy {d['ovr path (default)']['accuracy_mean']:.4f} +-{d['ovr path (default)']['accuracy_std']:.4f} / "
          f"{d['ovr sweep']['accuracy_mean']:.4f} / {d['sklearn default']['accuracy_mean']:.4f} "
          f"+-{d['sklearn default']['accuracy_std']:.4f}; strengths agree {d['strengths_agree']:.1%}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--datasets", nargs="+", default=["digits", "photos", "synthetic"])
    ap.add_argument("--sklearn-heads-synthetic", type=int, default=10,
                    help="heads scikit-learn's sweep is timed on for the synthetic set (scaled to all 100)")
    ap.add_argument("--out", help="the JSON to write (default results/heads_vs_sklearn.json, with --only-defaults "
                                   "results/heads_defaults.json)")
    ap.add_argument("--only-defaults", action="store_true",
                    help="only default settings on both sides (path, sweep, scikit-learn) over 5 resplits; "
                         "datasets digits, photos, synthetic64")
    ap.add_argument("--resplits", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3, help="fits per resplit and method (--only-defaults)")
    a = ap.parse_args()
    a.out = a.out or str(Path(__file__).parent / "results" /
                         ("heads_defaults.json" if a.only_defaults else "heads_vs_sklearn.json"))
    dev = resolve_device(a.device)
    if a.only_defaults:
        res = {"machine": machine_name(), "torch_threads": torch.get_num_threads(), "results": []}
        for d in ("synthetic64" if d == "synthetic" else d for d in a.datasets):  # the defaults' synthetic set
            arrays = synthetic64() if d == "synthetic64" else getattr(datasets, d)(a.device)[0]
            res["results"].append(defaults(d, *arrays, dev, a.resplits, a.repeats))
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            Path(a.out).write_text(json.dumps(res, indent=2))
        return
    out = {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "machine": machine_name(),
           "device": str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(0), "results": []}
    for d in a.datasets:
        if d == "synthetic":
            out["results"].append(bench("synthetic 20000x512, 100 classes", *datasets.synthetic(), dev,
                                        sk_heads=a.sklearn_heads_synthetic))
        else:
            arrays, _ = getattr(datasets, d)(a.device)
            out["results"].append(bench(f"{d}, EfficientNet-Lite0 embeddings", *arrays, dev))
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(out, indent=2))
    print(f"-> {a.out}")


if __name__ == "__main__":
    main()
