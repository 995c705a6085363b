"""The solver's elementwise work on [rows, columns] arrays, two ways each, in interleaved rounds of one process:

- float64 column sums of a float32 array: torch's A.sum(0, dtype=torch.float64) against `solver.colsum` (blocks of
  rows converted, then summed in float64), and the largest difference between them; and `colsum(exact=False)`
  (torch's float32 reduction, a cascade sum), with its largest error relative to the sum of |A|;
- one elementwise operation (sigmoid of z + a * zp) into a new array against into a kept one (`_Logistic.scratch`):
  on the CPU a new array above glibc's mmap threshold (32 MiB) comes as fresh pages.

    python benchmarks/elementwise.py [--shapes 200000x128,20000x128,1168x10] [--rounds 5]

Writes JSON: per shape, each way's median milliseconds over the rounds, and the ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from ovr.learn.solver import colsum
from ovr.runtime import machine_name


def timed(fn, repeats: int) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t) / repeats * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="200000x128,20000x128,1168x10")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/elementwise.json"))
    a = ap.parse_args()
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    g = torch.Generator().manual_seed(0)
    out = {"machine": f"{machine_name()}, torch threads {torch.get_num_threads()}",
           "rounds": a.rounds, "shapes": []}
    for shape in a.shapes.split(","):
        n, C = map(int, shape.split("x"))
        A = torch.rand(n, C, generator=g) - 0.5  # a gradient-like sum: terms of both signs
        zp, k = torch.randn(n, C, generator=g), torch.empty(n, C)
        step = torch.rand(C, generator=g)
        repeats = max(3, min(200, 20_000_000 // (n * C)))
        ways = {
            "sum(0, dtype=float64)": lambda: A.sum(0, dtype=torch.float64),
            "colsum": lambda: colsum(A),
            "colsum(exact=False)": lambda: colsum(A, exact=False),
            "sigmoid into a new array": lambda: torch.addcmul(A, step, zp).sigmoid_(),
            "sigmoid into a kept array": lambda: torch.addcmul(A, step, zp, out=k).sigmoid_(),
        }
        ms: dict[str, list[float]] = {w: [] for w in ways}
        for _ in range(a.rounds):
            for w, fn in ways.items():
                ms[w].append(timed(fn, repeats))
        row = {"rows": n, "columns": C, "ms_median": {w: statistics.median(v) for w, v in ms.items()},
               "ms_all": ms,
               "colsum_max_abs_difference": float((colsum(A) - A.sum(0, dtype=torch.float64)).abs().max()),
               "float32_sum_max_error_relative_to_sum_abs": float(
                   ((colsum(A, exact=False) - colsum(A)).abs() / A.abs().sum(0, dtype=torch.float64)).max())}
        m = row["ms_median"]
        row["colsum_speedup"] = m["sum(0, dtype=float64)"] / m["colsum"]
        row["float32_sum_speedup"] = m["colsum"] / m["colsum(exact=False)"]
        row["kept_array_speedup"] = m["sigmoid into a new array"] / m["sigmoid into a kept array"]
        out["shapes"].append(row)
        print(f"{n} x {C}: float64 column sums {m['sum(0, dtype=float64)']:.2f} ms -> colsum {m['colsum']:.2f} ms "
              f"({row['colsum_speedup']:.1f}x, max difference {row['colsum_max_abs_difference']:.1e}), float32 "
              f"{m['colsum(exact=False)']:.2f} ms ({row['float32_sum_speedup']:.1f}x faster than colsum, error "
              f"{row['float32_sum_max_error_relative_to_sum_abs']:.0e} of sum |A|); sigmoid "
              f"into a new array {m['sigmoid into a new array']:.2f} ms, into a kept one "
              f"{m['sigmoid into a kept array']:.2f} ms ({row['kept_array_speedup']:.1f}x)", flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=1))
    print(f"-> {a.out}")


if __name__ == "__main__":
    main()
