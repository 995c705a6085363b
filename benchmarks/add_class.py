"""Growing a model one class at a time, through the same `Model` that `ovr add-class` uses, in one run:

(1) leave-one-class-out: for each class, train on the others, add it (one head), evaluate on all classes; the gap
    to joint training, for answers side by side: plain argmax, the guarded chain (what ovr answers; its gate a
    softmax regression at these sizes), the chain with the LDA gate that ovr used before (and uses past
    aggregate.GATE_SOFTMAX_MAX), and `refresh` of the confused old heads (which retrains them). Old-class accuracy
    and new-class recall separately.
(2) sequential growth: start with 2 classes and add the rest one at a time, 3 class orders; the gap to a joint
    model of the same classes at every step, for the same answers but refresh.
    With --resplits R (and --only-sequential), (2) over R seeded resplits of the same images into train / val /
    test of the same sizes, so the spread covers the data split as well as the class order.
(3) scaling: time to add one class (its head, then the gate) vs training all N heads, N = 10, 100, 1000
    (synthetic, one L2 strength).
Datasets: digits and photos (benchmarks/datasets.py), EfficientNet-Lite0 embeddings.

    python benchmarks/add_class.py [--device cpu|cuda] [--sizes 10 100 1000] [--datasets digits photos]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

import datasets
from ovr import aggregate
from ovr.config import TrainConfig
from ovr.model import Model
from ovr.runtime import resolve_device

SETTINGS = TrainConfig()


def fit(names: list[str], X, y, Xv, yv, classes: list[str]) -> Model:
    """A model of `classes` (labels index them) trained jointly on the rows of those classes."""
    m = Model({"dim": X.shape[1]}, "standardize", "linear", list(classes))
    m.fit_heads(list(names), X, y, Xv, yv, SETTINGS)
    return m


def subset(X, y, keep: list[int]):
    """Rows of the classes in `keep` (original labels), relabelled to their position in `keep`."""
    pos = torch.full((int(y.max()) + 1,), -1, dtype=torch.long)
    pos[torch.tensor(keep)] = torch.arange(len(keep))
    rows = pos[y] >= 0
    return X[rows.to(X.device)], pos[y][rows]


def add(m: Model, name: str, X, y, Xv, yv) -> tuple[Model, dict]:
    """`ovr add-class` on the in-memory model: one new head on all the rows, then the gate. Returns its seconds."""
    m = copy.deepcopy(m)
    m.classes.append(name)
    t0 = time.perf_counter()
    m.fit_heads([name], X, y, Xv, yv, SETTINGS)
    t1 = time.perf_counter()
    m.rebuild_gate(X, y, Xv, yv)
    t2 = time.perf_counter()
    return m, {"head_s": t1 - t0, "gate_s": t2 - t1, "total_s": t2 - t0}


def with_lda_gate(m: Model, X, y, Xv, yv, Xt) -> np.ndarray:
    """The guarded chain's answers with the gate ovr used before: a shrinkage LDA."""
    r = copy.copy(m)
    r.gate = aggregate.fit_gate(X, y, Xv, yv, m.classes, method="lda")
    return r.answer(Xt).index


def chain_on_posterior(m: Model, Xt) -> np.ndarray:
    """A rule measured and not used: the chain's candidates scored by the gate's posterior alone (not each head's
    calibrated probability x its gate), which leaves a grown model's answers to the gate."""
    post = m.gate.posterior(Xt)[:, [m.gate.classes.index(c) for c in m.classes]]
    return aggregate.guarded_chain(m.logits(Xt), post, m.unseen())  # starts, like the chain, at argmax


def answers(m: Model, X, y, Xv, yv, Xt) -> dict[str, np.ndarray]:
    a = m.answer(Xt)
    out = {"argmax": a.logits.argmax(1), "guarded": a.index,
           "guarded_lda": with_lda_gate(m, X, y, Xv, yv, Xt)}
    r = copy.deepcopy(m)
    confused = sorted(r.confused_heads(torch.cat([X, Xv]), torch.cat([y, yv])))
    if confused:
        r.fit_heads(confused, X, y, Xv, yv, SETTINGS)
        r.rebuild_gate(X, y, Xv, yv)
    out["refresh"] = r.answer(Xt).index
    return out


RULES = ("argmax", "guarded", "guarded_lda", "refresh")


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


def sequential(arrays, classes, dev, orders: int = 3) -> dict:
    X, y, Xv, yv, Xt, yt = (torch.as_tensor(a, device=dev) if i % 2 == 0 else torch.as_tensor(a)
                            for i, a in enumerate(arrays))
    K = len(classes)
    runs = []
    for seed in range(orders):
        order = np.random.default_rng(seed).permutation(K).tolist()
        names = [classes[c] for c in order]
        m = fit(names[:2], *subset(X, y, order[:2]), *subset(Xv, yv, order[:2]), names[:2])
        steps = []
        for n in range(3, K + 1):
            Xa, ya = subset(X, y, order[:n])
            Xva, yva = subset(Xv, yv, order[:n])
            m, _ = add(m, names[n - 1], Xa, ya, Xva, yva)
            Xta, yta = subset(Xt, torch.as_tensor(yt), order[:n])
            yta = yta.numpy()
            joint = fit(names[:n], Xa, ya, Xva, yva, names[:n])
            a = m.answer(Xta)
            steps.append({"classes": n, "joint": float((joint.answer(Xta).index == yta).mean()),
                          "argmax": float((a.logits.argmax(1) == yta).mean()),
                          "guarded": float((a.index == yta).mean()),
                          "guarded_lda": float((with_lda_gate(m, Xa, ya, Xva, yva, Xta) == yta).mean()),
                          "chain_on_gate_posterior": float((chain_on_posterior(m, Xta) == yta).mean())})
        last = steps[-1]
        print(f"  order {seed}: final joint {last['joint']:.4f}, " + ", ".join(
            f"{r} {100 * (last[r] - last['joint']):+.2f}" for r in SEQ_RULES) + " pts; worst step " + ", ".join(
            f"{r} {min(100 * (s[r] - s['joint']) for s in steps):+.2f}" for r in SEQ_RULES[1:]), flush=True)
        runs.append({"order": names, "steps": steps})
    final = {r: stat([100 * (run["steps"][-1][r] - run["steps"][-1]["joint"]) for run in runs]) for r in SEQ_RULES}
    worst = {r: stat([min(100 * (s[r] - s["joint"]) for s in run["steps"]) for run in runs]) for r in SEQ_RULES}
    return {"runs": runs, "final_gap_points": final, "worst_step_gap_points": worst}


SEQ_RULES = ("argmax", "guarded", "guarded_lda", "chain_on_gate_posterior")


def resplit(arrays, seed: int):
    """The same rows dealt again into train / val / test of the same sizes (seed 0: the split as given)."""
    if seed == 0:
        return arrays
    X, y = np.concatenate(arrays[0::2]), np.concatenate(arrays[1::2])
    perm = np.random.default_rng(seed).permutation(len(X))
    cut = np.cumsum([len(arrays[0]), len(arrays[2])])
    parts = np.split(perm, cut)
    return tuple(a for p in parts for a in (X[p], y[p]))


def scaling(sizes: list[int], dev, per_class: int = 20, dim: int = 512) -> list[dict]:
    global SETTINGS
    saved, SETTINGS = SETTINGS, TrainConfig(l2_grid=(1e-2,))
    out = []
    try:
        for N in sizes:
            g = torch.Generator().manual_seed(N)
            centers = torch.randn(N, dim, generator=g) * 0.5
            y = torch.arange(N).repeat_interleave(per_class)
            X = (centers[y] + torch.randn(len(y), dim, generator=g)).to(dev)
            yv = torch.arange(N).repeat_interleave(4)
            Xv = (centers[yv] + torch.randn(len(yv), dim, generator=g)).to(dev)
            names = [f"c{k}" for k in range(N)]
            t0 = time.perf_counter()
            fit(names, X, y, Xv, yv, names)
            full = time.perf_counter() - t0
            base = fit(names[:-1], *subset(X, y, list(range(N - 1))), *subset(Xv, yv, list(range(N - 1))), names[:-1])
            grown, secs = add(base, names[-1], X, y, Xv, yv)
            one, total = secs["head_s"], secs["total_s"]
            r = {"classes": N, "rows": len(y), "full_s": full, "add_one_s": one, "gate_s": secs["gate_s"],
                 "gate_method": grown.gate.method, "add_class_s": total, "speedup": full / one,
                 "speedup_with_gate": full / total, "target_speedup": N / 2}
            print(f"  N={N:5d}: all heads {full:7.2f} s, one head {one:6.3f} s -> {full / one:6.1f}x (target N/2); "
                  f"with the gate ({grown.gate.method}, {secs['gate_s']:.2f} s) {full / total:6.1f}x", flush=True)
            out.append(r)
    finally:
        SETTINGS = saved
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--datasets", nargs="+", default=["digits", "photos"])
    ap.add_argument("--orders", type=int, default=3)
    ap.add_argument("--resplits", type=int, default=1, help="with --only-sequential: seeded resplits of the data")
    ap.add_argument("--only-sequential", action="store_true", help="only (2), over --resplits x --orders")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "add_class.json"))
    a = ap.parse_args()
    dev = resolve_device(a.device)
    res = {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "machine": platform.machine(),
           "device": str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(0), "datasets": {}}
    if a.only_sequential:
        for d in a.datasets:
            arrays, classes = getattr(datasets, d)(a.device)
            runs = []
            for r in range(a.resplits):
                print(f"[{d}] sequential growth, resplit {r}", flush=True)
                runs.append(sequential(resplit(arrays, r), list(classes), dev, a.orders))
            res["datasets"][d] = {"resplits": runs, "final_gap_points": {
                rule: stat([100 * (run["steps"][-1][rule] - run["steps"][-1]["joint"]) for x in runs for run in x["runs"]])
                for rule in SEQ_RULES}}
            print(f"[{d}] final gap over {a.resplits} resplits x {a.orders} orders: " + ", ".join(
                f"{k} {v['mean']:+.2f} +-{v['std']:.2f}" for k, v in res["datasets"][d]["final_gap_points"].items()),
                flush=True)
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
    print("[scaling] add one head vs train all N", flush=True)
    res["scaling"] = scaling(a.sizes, dev)
    Path(a.out).write_text(json.dumps(res, indent=2))
    print(f"-> {a.out}")


if __name__ == "__main__":
    main()
