"""Growing a model one class at a time, through the same `Model.add_class` that `ovr add-class` uses, in one run:

(1) leave-one-class-out: for each class, train on the others, add it, evaluate on all classes; the gap to joint
    training for: plain argmax, ovr's answer with its gate (the default: a shrinkage LDA solved from the model's
    statistics), the same heads with the ridge gate (also from the statistics), with the previous gate (a softmax
    regression refit on every remembered row), and `refresh` of the confused old heads. Old-class accuracy and
    new-class recall separately.
(2) sequential growth: start with 2 classes and add the rest one at a time, 3 class orders; the gap to a joint
    model of the same classes at every step for the same answers but refresh; and ridge heads grown vs joint.
    With --resplits R (and --only-sequential), over R seeded resplits of the same images into train / val / test
    of the same sizes, so the spread covers the data split as well as the class order.
(3) scaling (--only-scaling): time to add one class to a model that remembers 1,000 or 100,000 rows (synthetic),
    the new class of a fixed size (--new-rows), and of 1% of the remembered rows.
Datasets: digits and photos (benchmarks/datasets.py), EfficientNet-Lite0 embeddings; photos_large (the same
classes, 3x the images) where the photos' test sets are too small to measure a step.

    python benchmarks/add_class.py --only-sequential --resplits 3 --gate-shrinkage 0.2 0.5 0.7 \
        --out benchmarks/results/add_class_resplits.json
    python benchmarks/add_class.py --only-sequential --datasets photos_large --resplits 3 \
        --out benchmarks/results/add_class_photos_large.json
    python benchmarks/add_class.py --only-scaling --out benchmarks/results/add_class_scaling.json
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

import datasets
from ovr.learn import aggregate
from ovr.config import TrainConfig
from ovr.learn.model import Model, grow_in_order, stats_gate
from ovr.learn.stats import GATE_SHRINKAGE
from ovr.runtime import machine_name, resolve_device

SETTINGS = TrainConfig()


def fit(names: list[str], X, y, Xv, yv, classes: list[str], head: str = "linear") -> Model:
    """A model of `classes` (labels index them) trained jointly on the rows of those classes."""
    settings = SETTINGS if head == SETTINGS.head else TrainConfig(head=head)
    m = Model({"dim": X.shape[1]}, "standardize", head, list(classes))
    m.fit(X, y, Xv, yv, settings)
    return m


def subset(X, y, keep: list[int]):
    """Rows of the classes in `keep` (original labels), relabelled to their position in `keep`."""
    pos = torch.full((int(y.max()) + 1,), -1, dtype=torch.long)
    pos[torch.tensor(keep)] = torch.arange(len(keep))
    rows = pos[y] >= 0
    return X[rows.to(X.device)], pos[y][rows]


def add(m: Model, name: str, X, y, Xv, yv) -> tuple[Model, dict]:
    """`ovr add-class` on the in-memory model (Model.add_class: its statistics, its head, the gate); its seconds."""
    m = copy.deepcopy(m)
    k = len(m.classes)
    t0 = time.perf_counter()
    m.add_class(name, X[(y == k).to(X.device)], Xv[(yv == k).to(Xv.device)], SETTINGS,
                remembered=lambda: (X, y, Xv, yv))
    return m, {"total_s": time.perf_counter() - t0}


def with_gate(m: Model, method: str, X, y, Xv, yv, Xt) -> np.ndarray:
    """The same heads answered with another gate: 'softmax' (refit on every remembered row, the gate before the
    statistics), 'ridge' (from the statistics), or 'lda:<shrinkage>' (from the statistics, another shrinkage)."""
    r = copy.copy(m)
    if method == "softmax":
        r.gate = aggregate.softmax_gate(X, y, Xv, yv, m.classes)
    elif method == "ridge":
        r.gate = stats_gate(m.stats, m.classes, "ridge")
    else:
        r.gate = stats_gate(m.stats, m.classes, "lda", float(method[4:]))
    return r.answer(Xt).index


def answers(m: Model, X, y, Xv, yv, Xt) -> dict[str, np.ndarray]:
    a = m.answer(Xt)
    out = {"argmax": a.logits.argmax(1), "gate": a.index, "ridge_gate": with_gate(m, "ridge", X, y, Xv, yv, Xt),
           "softmax_gate": with_gate(m, "softmax", X, y, Xv, yv, Xt)}
    r = copy.deepcopy(m)
    confused = sorted(r.confused_heads(torch.cat([X, Xv]), torch.cat([y, yv])))
    if confused:
        r.refresh(confused, X, y, Xv, yv, SETTINGS)
    out["refresh"] = r.answer(Xt).index
    return out


RULES = ("argmax", "gate", "ridge_gate", "softmax_gate", "refresh")


def stat(v) -> dict:
    v = np.asarray(v, dtype=float)
    return {"mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()), "max": float(v.max())}


def leave_one_out(arrays, classes, dev) -> dict:
    X, y, Xv, yv, Xt, yt = (torch.as_tensor(a, device=dev) if i % 2 == 0 else torch.as_tensor(a)
                            for i, a in enumerate(arrays))
    yt = yt.numpy()
    K = len(classes)
    joint = fit(classes, X, y, Xv, yv, classes)
    acc_joint = float((joint.answer(Xt).index == yt).mean())
    rows = []
    for k in range(K):
        order = [c for c in range(K) if c != k] + [k]  # the added class comes last, as after add-class
        names = [classes[c] for c in order]
        Xo, yo = subset(X, y, order[:-1])
        Xvo, yvo = subset(Xv, yv, order[:-1])
        base = fit(names[:-1], Xo, yo, Xvo, yvo, names[:-1])
        Xa, ya = subset(X, y, order)
        Xva, yva = subset(Xv, yv, order)
        grown, secs = add(base, names[-1], Xa, ya, Xva, yva)
        yt_o = np.argsort(order)[yt]  # test labels in the grown model's class order
        res = {"added": classes[k], "add_seconds": secs}
        for rule, pred in answers(grown, Xa, ya, Xva, yva, Xt).items():
            new = yt_o == K - 1
            res[rule] = {"accuracy": float((pred == yt_o).mean()), "old_accuracy": float((pred[~new] == yt_o[~new]).mean()),
                         "new_recall": float((pred[new] == K - 1).mean())}
        rows.append(res)
        print(f"  add {classes[k]:>22}: " + ", ".join(f"{r} {100 * (res[r]['accuracy'] - acc_joint):+.2f}"
                                                      for r in RULES) + " pts", flush=True)
    summary = {r: {"gap_points": stat([100 * (x[r]["accuracy"] - acc_joint) for x in rows]),
                   "new_recall": stat([x[r]["new_recall"] for x in rows]),
                   "old_accuracy": stat([x[r]["old_accuracy"] for x in rows])} for r in RULES}
    return {"joint_accuracy": acc_joint, "summary": summary, "per_class": rows,
            "add_seconds": {k: stat([x["add_seconds"][k] for x in rows]) for k in rows[0]["add_seconds"]}}


def sequential(arrays, classes, dev, orders: int = 3, shrinkages: tuple[float, ...] = ()) -> dict:
    """Grown from 2 classes one add-class at a time (model.grow_in_order), 3 class orders; at every step the gap to
    a model trained jointly on the same classes: BCE heads with the default gate (LDA from the statistics), the
    ridge gate (also from the statistics), the previous softmax gate (refit on rows), LDA gates of other
    `shrinkages`, plain argmax; and ridge heads grown vs joint (identical predictions expected)."""
    X, y, Xv, yv, Xt, yt = (torch.as_tensor(a, device=dev) if i % 2 == 0 else torch.as_tensor(a)
                            for i, a in enumerate(arrays))
    K = len(classes)
    runs = []
    for seed in range(orders):
        order = np.random.default_rng(seed).permutation(K).tolist()
        names = [classes[c] for c in order]
        pos = torch.empty(K, dtype=torch.long)
        pos[torch.tensor(order)] = torch.arange(K)
        steps = []

        def step(m: Model, n: int) -> None:
            if n < 3:  # the first model, before any add-class: grown == joint
                return
            Xa, ya = subset(X, y, order[:n])
            Xva, yva = subset(Xv, yv, order[:n])
            Xta, yta = subset(Xt, torch.as_tensor(yt), order[:n])
            yta = yta.numpy()
            joint = fit(names[:n], Xa, ya, Xva, yva, names[:n])
            a = m.answer(Xta)
            steps.append({"classes": n, "joint": float((joint.answer(Xta).index == yta).mean()),
                          "argmax": float((a.logits.argmax(1) == yta).mean()),
                          "gate": float((a.index == yta).mean()),
                          **{f"{g}_gate": float((with_gate(m, g, Xa, ya, Xva, yva, Xta) == yta).mean())
                             for g in ("ridge", "softmax", *(f"lda:{v}" for v in shrinkages))}})

        grow_in_order(X, pos[y], Xv, pos[yv], names, SETTINGS, step=step)
        ridge_settings = TrainConfig(head="ridge")
        grown_ridge = grow_in_order(X, pos[y], Xv, pos[yv], names, ridge_settings)
        joint_ridge = fit(names, X, pos[y], Xv, pos[yv], names, head="ridge")
        zt = grown_ridge.answer(Xt).logits
        zj = joint_ridge.answer(Xt).logits
        ytn = pos[torch.as_tensor(yt)].numpy()
        ridge = {"grown_accuracy": float((zt.argmax(1) == ytn).mean()), "joint_accuracy": float((zj.argmax(1) == ytn).mean()),
                 "identical_predictions": bool(np.array_equal(zt.argmax(1), zj.argmax(1))),
                 "max_logit_difference": float(np.abs(zt - zj).max()),
                 "gap_to_bce_joint_points": 100 * (float((zj.argmax(1) == ytn).mean()) - steps[-1]["joint"])}
        last = steps[-1]
        print(f"  order {seed}: final joint {last['joint']:.4f}, " + ", ".join(
            f"{r} {100 * (last[r] - last['joint']):+.2f}" for r in SEQ_RULES) + " pts; worst step " + ", ".join(
            f"{r} {min(100 * (s[r] - s['joint']) for s in steps):+.2f}" for r in SEQ_RULES[1:])
            + f"; ridge heads grown == joint: {ridge['identical_predictions']} (ridge joint vs BCE joint "
            f"{ridge['gap_to_bce_joint_points']:+.2f} pts)", flush=True)
        runs.append({"order": names, "steps": steps, "ridge_heads": ridge})
    rules = [r for r in runs[0]["steps"][0] if r not in ("classes", "joint")]
    final = {r: stat([100 * (run["steps"][-1][r] - run["steps"][-1]["joint"]) for run in runs]) for r in rules}
    worst = {r: stat([min(100 * (s[r] - s["joint"]) for s in run["steps"]) for run in runs]) for r in rules}
    return {"runs": runs, "final_gap_points": final, "worst_step_gap_points": worst}


SEQ_RULES = ("argmax", "gate", "ridge_gate", "softmax_gate")


def growth_summary(resplits: list[dict]) -> dict:
    """The gap to joint (points) over every run (resplit x order) of `sequential`, per answer rule:
    - final_gap_points: at the last step;
    - step_mean_gap_points: at each step (number of classes) the mean over the runs, and the worst of those means
      (what "the worst step" means over runs: the gap the growth leaves at some point of the way);
    - worst_step_gap_points: each run's own worst step. Biased low by noise: the minimum of ~15 steps whose gaps
      scatter by a few points on a 144-image test set sits well below 0 even when no step has a gap."""
    runs = [run for x in resplits for run in x["runs"]]
    rules = list(resplits[0]["final_gap_points"])
    gap = lambda s, rule: 100 * (s[rule] - s["joint"])  # noqa: E731
    steps = sorted({s["classes"] for run in runs for s in run["steps"]})
    per_step = {rule: {n: stat([gap(s, rule) for run in runs for s in run["steps"] if s["classes"] == n])
                       for n in steps} for rule in rules}
    return {"final_gap_points": {rule: stat([gap(run["steps"][-1], rule) for run in runs]) for rule in rules},
            "step_mean_gap_points": {rule: {"worst": min(v["mean"] for v in per_step[rule].values()),
                                            "worst_at_classes": min(per_step[rule], key=lambda n: per_step[rule][n]["mean"]),
                                            "per_step": {str(n): v for n, v in per_step[rule].items()}}
                                     for rule in rules},
            "worst_step_gap_points": {rule: stat([min(gap(s, rule) for s in run["steps"]) for run in runs])
                                      for rule in rules}}


def resplit(arrays, seed: int):
    """The same rows dealt again into train / val / test of the same sizes (seed 0: the split as given)."""
    if seed == 0:
        return arrays
    X, y = np.concatenate(arrays[0::2]), np.concatenate(arrays[1::2])
    perm = np.random.default_rng(seed).permutation(len(X))
    cut = np.cumsum([len(arrays[0]), len(arrays[2])])
    parts = np.split(perm, cut)
    return tuple(a for p in parts for a in (X[p], y[p]))


def scaling(sizes: list[int], dev, classes: int = 100, dim: int = 512, repeats: int = 5,
            new_rows: int | None = None) -> list[dict]:
    """Time to add one class (statistics + head + gate, not the embedding) to a model that remembers R rows, for
    each R in `sizes`: BCE heads (one L2 strength: the head's logistic solve reads every remembered row) and ridge
    heads (every head and the gate from the statistics). The new class has `new_rows` rows at every R, or R /
    `classes` (then its own statistics grow with R too). Synthetic embeddings. Every model is built first, then
    the sizes are timed in turn, `repeats` rounds (this shared machine's speed drifts by +-40%: interleaving puts
    the drift on both sides), each on a fresh copy of the model; the best of each is kept."""
    cases = []
    for R in sizes:
        g = torch.Generator().manual_seed(R)
        centers = torch.randn(classes, dim, generator=g) * 0.5
        per_old, per_new = R // classes, new_rows or R // classes
        y = torch.cat([torch.arange(classes - 1).repeat_interleave(per_old), torch.full((per_new,), classes - 1)])
        y = y[torch.randperm(len(y), generator=g)]
        X = (centers[y] + torch.randn(len(y), dim, generator=g)).to(dev)
        cut = int(0.85 * len(y))
        names = [f"c{k}" for k in range(classes)]
        old = y < classes - 1
        for head in ("linear", "ridge"):
            settings = TrainConfig(head=head, l2_grid=(1e-2,))
            m = Model({"dim": dim}, "standardize", head, names[:-1])
            m.fit(X[:cut][old[:cut].to(X.device)], y[:cut][old[:cut]], X[cut:][old[cut:].to(X.device)],
                  y[cut:][old[cut:]], settings)
            cases.append((R, head, m, settings, X, y, cut, names, ~old[:cut], ~old[cut:], per_new))
    times: dict = {}
    for _ in range(repeats):
        for R, head, m, settings, X, y, cut, names, new, newv, _n in cases:
            grown = copy.deepcopy(m)
            t0 = time.perf_counter()
            grown.add_class(names[-1], X[:cut][new.to(X.device)], X[cut:][newv.to(X.device)], settings,
                            remembered=lambda X=X, y=y, cut=cut: (X[:cut], y[:cut], X[cut:], y[cut:]))
            times.setdefault((R, head), []).append(time.perf_counter() - t0)
    out = []
    for R in sizes:
        per_new = next(c[-1] for c in cases if c[0] == R)
        row = {"remembered_rows": int(R // classes * (classes - 1)), "new_class_rows": per_new, "classes": classes,
               "dim": dim}
        for head in ("linear", "ridge"):
            row[f"{head}_add_class_s"] = min(times[R, head])
            row[f"{head}_add_class_all_s"] = times[R, head]
        print(f"  R={row['remembered_rows']:7d}, new class {per_new} rows: add-class with BCE heads "
              f"{row['linear_add_class_s']:.2f} s, with ridge heads {row['ridge_add_class_s']:.2f} s", flush=True)
        out.append(row)
    for head in ("linear", "ridge"):
        out[-1][f"{head}_ratio_to_first"] = out[-1][f"{head}_add_class_s"] / out[0][f"{head}_add_class_s"]
    return out


def scalings(sizes: list[int], dev, new_rows: int) -> dict:
    """Both: the new class of a fixed size (what the ratio is about: the remembered rows), and of R / classes."""
    return {"fixed_new_class": scaling(sizes, dev, new_rows=new_rows), "new_class_grows_with_R": scaling(sizes, dev)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 100000], help="remembered rows for (3)")
    ap.add_argument("--datasets", nargs="+", default=["digits", "photos"])
    ap.add_argument("--new-rows", type=int, default=500, help="rows of the added class in (3)")
    ap.add_argument("--orders", type=int, default=3)
    ap.add_argument("--resplits", type=int, default=1, help="with --only-sequential: seeded resplits of the data")
    ap.add_argument("--only-sequential", action="store_true", help="only (2), over --resplits x --orders")
    ap.add_argument("--only-scaling", action="store_true", help="only (3)")
    ap.add_argument("--gate-shrinkage", type=float, nargs="*", default=[],
                    help=f"in (2), LDA gates of these shrinkages too (the default gate's: {GATE_SHRINKAGE})")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "add_class.json"))
    a = ap.parse_args()
    dev = resolve_device(a.device)
    res = {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "machine": machine_name(),
           "device": str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(0), "datasets": {}}
    if a.only_scaling:
        res["scaling"] = scalings(a.sizes, dev, a.new_rows)
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=2))
        return
    if a.only_sequential:
        for d in a.datasets:
            arrays, classes = getattr(datasets, d)(a.device)
            runs = []
            for r in range(a.resplits):
                print(f"[{d}] sequential growth, resplit {r}", flush=True)
                runs.append(sequential(resplit(arrays, r), list(classes), dev, a.orders, tuple(a.gate_shrinkage)))
            res["datasets"][d] = {"resplits": runs, **growth_summary(runs)}
            r = res["datasets"][d]
            print(f"[{d}] final gap over {a.resplits} resplits x {a.orders} orders: " + ", ".join(
                f"{k} {v['mean']:+.2f} +-{v['std']:.2f} (worst step mean {r['step_mean_gap_points'][k]['worst']:+.2f}, "
                f"worst single step {r['worst_step_gap_points'][k]['min']:+.2f})"
                for k, v in r["final_gap_points"].items()), flush=True)
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            Path(a.out).write_text(json.dumps(res, indent=2))
        return
    for d in a.datasets:
        arrays, classes = getattr(datasets, d)(a.device)
        print(f"[{d}] leave one class out", flush=True)
        loo = leave_one_out(arrays, list(classes), dev)
        s = loo["summary"]
        print(f"[{d}] joint {loo['joint_accuracy']:.4f}; mean gap: " + ", ".join(
            f"{r} {s[r]['gap_points']['mean']:+.2f} (+-{s[r]['gap_points']['std']:.2f})" for r in s) + " points", flush=True)
        print(f"[{d}] sequential growth", flush=True)
        res["datasets"][d] = {"leave_one_out": loo, "sequential": sequential(arrays, list(classes), dev, a.orders)}
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=2))
    print("[scaling] add one class to a model that remembers R rows", flush=True)
    res["scaling"] = scalings(a.sizes, dev, a.new_rows)
    Path(a.out).write_text(json.dumps(res, indent=2))
    print(f"-> {a.out}")


if __name__ == "__main__":
    main()
