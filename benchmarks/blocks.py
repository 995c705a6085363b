"""Columns per L-BFGS solve on the CPU (`model.CPU_COLUMNS`): the linear heads' default fit (the L2 path on at
most search_rows rows, then the solves on every row) of the same heads with several block sizes, in interleaved
rounds of one process.

    python benchmarks/blocks.py [--rows 200000] [--heads 256] [--blocks 28:28,128:128,256:256] [--rounds 2]

A block setting "s:f" is the columns per solve on the search rows (s) and on all rows (f); 28:28 is what the
previous sizing (by all rows and the 11 strengths of the grid) gave at 200,000 rows. Synthetic embeddings as in
scale.py (Gaussian class centres + noise, 1,000 classes, 512 dimensions); the heads are the first `--heads` classes.
Writes JSON: per setting, every round's seconds and the median.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from ovr.config import TrainConfig
from ovr.learn.heads import Normalizer, fit_ovr_heads, one_block
from ovr.learn.model import head_targets
from ovr.runtime import machine_name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--heads", type=int, default=256)
    ap.add_argument("--blocks", default="28:28,128:128,256:256")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/blocks.json"))
    a = ap.parse_args()
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    n, C, dim = a.rows, 1000, 512
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1, (C, dim)).astype(np.float32)
    y = rng.integers(0, C, n)
    X = torch.from_numpy(centres[y] + rng.normal(0, 2.0, (n, dim)).astype(np.float32))
    yt = torch.from_numpy(y)
    nv, hold = n // 10, n // 20  # as scale.py: 90% train, 5% validation
    Xt, Xv = one_block(X[nv:], X[hold:nv])
    norm = Normalizer.fit("standardize", Xt, Xv)
    K = a.heads
    T, Tv = head_targets(yt[nv:], np.arange(K), "cpu"), head_targets(yt[hold:nv], np.arange(K), "cpu")
    cfg = TrainConfig()
    settings = a.blocks.split(",")
    res = {"machine": machine_name(), "rows": n, "heads": K, "dim": dim,
           "search_rows": cfg.search_rows, "seconds": {s: [] for s in settings}}
    for _ in range(a.rounds):
        for s in settings:
            small, full = map(int, s.split(":"))
            t = time.perf_counter()
            fit_ovr_heads(Xt, T, Xv, Tv, [str(i) for i in range(K)], center=(norm.mean, norm.std),
                          block=lambda rows: small if rows <= cfg.search_rows else full, **cfg.fit_kwargs())
            res["seconds"][s].append(time.perf_counter() - t)
            print(s, f"{res['seconds'][s][-1]:.1f} s", flush=True)
    res["median_s"] = {s: statistics.median(v) for s, v in res["seconds"].items()}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=1))
    print(json.dumps(res["median_s"]))


if __name__ == "__main__":
    main()
