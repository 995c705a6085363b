"""scikit-learn's default OvR logistic regression on the digits and photos embeddings, timed in a process that never
imports torch, three ways: as a user gets it (`OneVsRestClassifier(LogisticRegression())`, the BLAS threads the
environment gives), with one BLAS thread (OPENBLAS_NUM_THREADS=1), and with `n_jobs=-1` (what
`heads_vs_sklearn.py` compares against); each in a fresh process after one warm-up fit. On small problems a multi-threaded BLAS can cost more in synchronisation
than it saves; this says how much on this machine, so the comparison in heads_vs_sklearn.py can be read.

    python benchmarks/sklearn_threads.py [--rounds 5] [--out benchmarks/results/sklearn_threads.json]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys, time
import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.multiclass import OneVsRestClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
d = np.load(sys.argv[1])
fit = lambda X, y: make_pipeline(StandardScaler(), OneVsRestClassifier(  # noqa: E731
    LogisticRegression(), n_jobs=json.loads(sys.argv[3]))).fit(X, y)
fit(d["X"][:300], d["y"][:300])  # warm-up: imports, and n_jobs=-1's worker processes
times = []
for _ in range(int(sys.argv[2])):
    t0 = time.perf_counter()
    fit(d["X"], d["y"])
    times.append(time.perf_counter() - t0)
print(json.dumps({"times": times, "torch_imported": "torch" in sys.modules}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "sklearn_threads.json"))
    a = ap.parse_args()
    import numpy as np

    import datasets

    ways = {"default": ({}, "null"), "one BLAS thread": ({"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}, "null"),
            "n_jobs=-1": ({}, "-1")}
    out = {"cpu_count": os.cpu_count(), "rounds": a.rounds, "datasets": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("digits", "photos"):
            (X, y, Xv, yv, _Xt, _yt), _ = getattr(datasets, name)("cpu")
            path = Path(tmp) / f"{name}.npz"
            np.savez(path, X=np.concatenate([X, Xv]), y=np.concatenate([y, yv]))
            row = {"rows": int(len(X) + len(Xv)), "dim": int(X.shape[1])}
            for _ in range(a.rounds):  # interleaved: one fit of each way per round
                for way, (env, jobs) in ways.items():
                    r = subprocess.run([sys.executable, "-c", CHILD, str(path), "1", jobs], capture_output=True,
                                       text=True, check=True, env={**os.environ, **env})
                    res = json.loads(r.stdout)
                    assert not res["torch_imported"]
                    row.setdefault(way, []).extend(res["times"])
            for way in ways:
                t = sorted(row[way])
                row[way] = {"seconds_median": t[len(t) // 2], "seconds": row[way]}
            out["datasets"][name] = row
            print(name, {w: round(row[w]["seconds_median"], 3) for w in ways}, flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
