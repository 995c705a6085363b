"""What the refit on train + validation buys: each head's chosen strength refit on train + validation rows (the
default) against the head as the search left it (trained on the training rows only), on the same synthetic sets
(scikit-learn's make_classification, 64 classes, 384 features, 85% of the rows to train, 15% to validate, 20,000
held out), over seeds: held-out accuracy and fit time of both.

    python benchmarks/refit.py [--rows 25000 100000] [--class-sep 1.0 1.5] [--seeds 3]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

import datasets
from ovr.config import TrainConfig
from ovr.learn.heads import fit_ovr_heads
from ovr.runtime import machine_name


def one(n: int, class_sep: float, seed: int) -> dict:
    Xtr, T, Xv, Tv, Xt, yt, names = datasets.classification64(n, class_sep, seed)
    row: dict = {"rows": n, "class_sep": class_sep, "seed": seed}
    for refit in (True, False):
        t = time.perf_counter()
        fits = fit_ovr_heads(Xtr, T, Xv, Tv, names, **{**TrainConfig().fit_kwargs(), "refit": refit})
        seconds = time.perf_counter() - t
        W = torch.stack([f.params["weight"] for f in fits])
        b = torch.stack([f.params["bias"] for f in fits])
        key = "refit" if refit else "no_refit"
        row[key] = {"accuracy_held_out": float(((Xt @ W.T + b).argmax(1).numpy() == yt).mean()), "fit_s": seconds}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[25000, 100000])
    ap.add_argument("--class-sep", type=float, nargs="+", default=[1.0, 1.5])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/refit.json"))
    a = ap.parse_args()
    runs = [one(n, s, seed) for n in a.rows for s in a.class_sep for seed in range(a.seeds)]
    summary = []
    for n in a.rows:
        for s in a.class_sep:
            rs = [r for r in runs if r["rows"] == n and r["class_sep"] == s]
            acc = {k: np.array([r[k]["accuracy_held_out"] for r in rs]) for k in ("refit", "no_refit")}
            d = acc["refit"] - acc["no_refit"]
            row = {"rows": n, "class_sep": s,
                   "refit_gain_points": {"mean": float(d.mean() * 100), "min": float(d.min() * 100),
                                         "max": float(d.max() * 100)}}
            for k, v in acc.items():
                row[k] = {"accuracy_mean": float(v.mean()), "accuracy_std": float(v.std()),
                          "fit_s_median": float(np.median([r[k]["fit_s"] for r in rs]))}
            summary.append(row)
            print(f"rows {n}, class_sep {s}: refit gains {d.mean() * 100:+.2f} points (min {d.min() * 100:+.2f}, "
                  f"max {d.max() * 100:+.2f}) over {len(d)} seeds", flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"machine": machine_name(),
                                 "torch": torch.__version__, "summary": summary, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
