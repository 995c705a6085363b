"""The L2 path on a subset of the training rows (`search_rows`, heads.search_path) against the path on every row,
in one run on the same synthetic set (scikit-learn's make_classification, 64 classes, 384 features), the same
validation and held-out rows: time of the search and of the whole fit (search + the chosen strengths solved on all
rows + the refit on train + validation), held-out accuracy, how often the two choose the same strength, and where
not, how much validation loss (measured by the all-rows path) the subset's choice gives up.

    python benchmarks/search_rows.py [--rows 100000] [--search-rows 20000] [--class-sep 2.0 1.5]
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


def one(n: int, search_rows: int, class_sep: float) -> dict:
    Xtr, T, Xv, Tv, Xt, yt, names = datasets.classification64(n, class_sep)
    cut = len(Xtr)
    out: dict = {"rows": n, "train": cut, "validation": n - cut, "held_out": 20000, "class_sep": class_sep}
    fits = {}
    for label, rows in (("all rows", 0), (f"{search_rows} rows", search_rows)):
        kw = {**TrainConfig(search_rows=rows).fit_kwargs()}
        t = time.perf_counter()
        fits[label] = fit_ovr_heads(Xtr, T, Xv, Tv, names, **kw)
        seconds = time.perf_counter() - t
        W = torch.stack([f.params["weight"] for f in fits[label]])
        b = torch.stack([f.params["bias"] for f in fits[label]])
        acc = float(((Xt @ W.T + b).argmax(1).numpy() == yt).mean())
        out[label] = {"fit_s": seconds, "accuracy_held_out": acc,
                      "strengths": {str(v): int(c) for v, c in zip(*np.unique([f.l2 for f in fits[label]],
                                                                              return_counts=True))}}
        print(f"  class_sep {class_sep}, {label}: fit {seconds:.1f} s, held-out accuracy {acc:.4f}", flush=True)
    full, sub = fits["all rows"], fits[f"{search_rows} rows"]
    out["strengths_agree"] = float(np.mean([a.l2 == s.l2 for a, s in zip(full, sub)]))
    gaps = []
    for a, s in zip(full, sub):  # the all-rows path's validation loss at the subset's choice minus at its own
        path = dict(map(tuple, a.l2_path))
        if a.l2 != s.l2 and s.l2 in path:
            gaps.append(path[s.l2] - path[a.l2])
    out["validation_loss_given_up_where_they_differ"] = ({"n": len(gaps), "max": float(max(gaps)),
                                                         "mean": float(np.mean(gaps))} if gaps else {"n": 0})
    out["speedup"] = out["all rows"]["fit_s"] / out[f"{search_rows} rows"]["fit_s"]
    print(f"[class_sep {class_sep}] {out['speedup']:.2f}x; strengths agree {out['strengths_agree']:.0%}; "
          f"loss given up {out['validation_loss_given_up_where_they_differ']}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100000)
    ap.add_argument("--search-rows", type=int, default=TrainConfig().search_rows)
    ap.add_argument("--class-sep", type=float, nargs="+", default=[2.0, 1.5])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "search_rows.json")
    a = ap.parse_args()
    res = {"machine": machine_name(), "torch_threads": torch.get_num_threads(), "results": []}
    for sep in a.class_sep:
        res["results"].append(one(a.rows, a.search_rows, sep))
        a.out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
