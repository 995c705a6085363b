"""What storing embeddings as float16 (`--dtype float16`, the default on CUDA) costs in accuracy: ovr heads trained
and tested on float32 embeddings vs the same embeddings rounded to float16, over resplits of digits and photos.

    python benchmarks/fp16.py [--resplits 5] [--out benchmarks/results/fp16.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from datasets import digits, photos  # noqa: E402
from ovr.runtime import machine_name  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resplits", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/fp16.json"))
    a = ap.parse_args()
    from ovr.learn.estimators import OvRClassifier

    out = {"machine": machine_name(), "resplits": a.resplits}
    for name, load in (("digits", digits), ("photos", photos)):
        (X, y, Xv, yv, Xt, yt), _ = load()
        Xa, ya = np.concatenate([X, Xv, Xt]), np.concatenate([y, yv, yt])
        rows = {"float32": [], "float16": []}
        for s in range(a.resplits):
            order = np.random.default_rng(s).permutation(len(Xa))
            n_tr, n_va = int(0.7 * len(order)), int(0.15 * len(order))
            tr, va, te = order[:n_tr], order[n_tr:n_tr + n_va], order[n_tr + n_va:]
            for kind, A in (("float32", Xa), ("float16", Xa.astype(np.float16).astype(np.float32))):
                m = OvRClassifier(device="cpu").fit(A[tr], ya[tr], eval_set=(A[va], ya[va]))
                rows[kind].append(float((m.predict(A[te]) == ya[te]).mean()))
        diff = np.array(rows["float16"]) - np.array(rows["float32"])
        out[name] = {k: {"mean": float(np.mean(v)), "std": float(np.std(v)), "values": v} for k, v in rows.items()}
        out[name]["float16_minus_float32"] = {"mean": float(diff.mean()), "std": float(diff.std())}
        print(name, json.dumps(out[name]["float16_minus_float32"]), {k: round(np.mean(v), 4) for k, v in rows.items()})
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
