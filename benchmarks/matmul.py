"""One column over many rows on the CPU (what a new class's head costs at add-class, over every remembered row): the
logits X @ w + b of a single head as torch's matrix-vector product against `solver.affine` (two equal columns, a
matrix-matrix product); the gradient's product R^T X as a matrix-vector product against `solver.back` (two halves of
the rows in one batched product); and the whole one-column logistic solve with the plain products and with the
split ones; interleaved rounds, best of each.

    python benchmarks/matmul.py [--rows 20000 100000] [--dim 512] [--out benchmarks/results/matmul.json]
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

import ovr.learn.solver as solver


def plain(X, W, b):
    return torch.addmm(b, X, W.T)


def plain_back(R, X):
    return R.T @ X


def best(fns: dict, rounds: int) -> dict:
    times = {k: float("inf") for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k] = min(times[k], time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[20000, 100000])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "matmul.json"))
    a = ap.parse_args()
    from ovr.runtime import configure_threads

    configure_threads()
    out = {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "dim": a.dim, "points": []}
    for n in a.rows:
        g = torch.Generator().manual_seed(n)
        X = torch.randn(n, a.dim, generator=g)
        W, b = torch.randn(1, a.dim, generator=g), torch.zeros(1)
        assert torch.allclose(solver.affine(X, W, b), plain(X, W, b), rtol=1e-4, atol=1e-3)
        prod = best({"matrix-vector": lambda: plain(X, W, b), "two columns": lambda: solver.affine(X, W, b)},
                    a.rounds * 3)
        R = torch.randn(n, 1, generator=g)
        assert torch.allclose(solver.back(R, X), plain_back(R, X), rtol=1e-4, atol=1e-2)
        grad = best({"matrix-vector": lambda: plain_back(R, X), "two halves": lambda: solver.back(R, X)},
                    a.rounds * 3)
        T = (torch.rand(n, generator=g) < 0.01).float()[:, None]
        X[T[:, 0] > 0] += 0.3  # a class a little apart from the rest
        pw = ((1 - T).sum() / T.sum()).view(1)
        default = solver.affine, solver.back
        iters = {}

        def solve(fns, name):
            solver.affine, solver.back = fns
            try:
                iters[name] = int(solver.logistic_lbfgs(X, T, pw, torch.tensor([1e-2])).iterations[0])
            finally:
                solver.affine, solver.back = default
        solve_t = best({"matrix-vector": lambda: solve((plain, plain_back), "matrix-vector"),
                        "split": lambda: solve(default, "split")}, a.rounds)
        row = {"rows": n, "logits_ms": {k: v * 1e3 for k, v in prod.items()},
               "logits_speedup": prod["matrix-vector"] / prod["two columns"],
               "gradient_ms": {k: v * 1e3 for k, v in grad.items()},
               "gradient_speedup": grad["matrix-vector"] / grad["two halves"],
               "solve_s": solve_t, "solve_speedup": solve_t["matrix-vector"] / solve_t["split"],
               "iterations": iters}
        print(f"{n} x {a.dim}: logits {prod['matrix-vector'] * 1e3:.1f} ms as a matrix-vector product, "
              f"{prod['two columns'] * 1e3:.1f} ms as two columns ({row['logits_speedup']:.2f}x); gradient "
              f"{grad['matrix-vector'] * 1e3:.1f} ms vs {grad['two halves'] * 1e3:.1f} ms as two halves "
              f"({row['gradient_speedup']:.2f}x); one-column solve {solve_t['matrix-vector']:.3f} s vs "
              f"{solve_t['split']:.3f} s ({row['solve_speedup']:.2f}x, iterations {iters})", flush=True)
        out["points"].append(row)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
