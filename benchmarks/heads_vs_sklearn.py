"""Training speed of the stacked OvR heads, measured side by side in one run on the same features:
(1) `ovr` vs scikit-learn's OneVsRestClassifier(LogisticRegression()) (n_jobs = all cores), with accuracy;
(2) the N heads stacked vs the same N heads trained one after another in a Python loop.
Datasets: (a) synthetic 20,000 x 512 features, 100 classes; (b) real EfficientNet-Lite0 embeddings of
scikit-learn's digits (1,797 images, 10 classes; embedded once through the cache).

    python benchmarks/heads_vs_sklearn.py [--loop-heads 10] [--skip-real] [--device cpu|cuda|auto]

scikit-learn always runs on the CPU; `--device cuda` moves only the ovr side (features and heads) to the GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import make_classification
from sklearn.linear_model import LogisticRegression
from sklearn.multiclass import OneVsRestClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from ovr.heads import Normalizer, OvRClassifier, fit_ovr_heads
from ovr.runtime import resolve_device

# "fast": one L2 value (as scikit-learn's fixed C) instead of the default grid of four, big batches, a higher
# learning rate and at most 10 epochs: what a user passes for large data (same flags on the CLI / in a config).
CONFIGS = {"default": {}, "fast": dict(l2_grid=(1e-3,), batch_size=2048, lr=2e-2, epochs=10, patience=3)}


def synthetic():
    X, y = make_classification(n_samples=24000, n_features=512, n_informative=128, n_redundant=0, n_classes=100,
                               n_clusters_per_class=1, class_sep=2.5, random_state=0)
    X = X.astype(np.float32)
    return X[:20000], y[:20000], X[20000:22000], y[20000:22000], X[22000:], y[22000:]


def digits(cache_dir: str | None, device: str):
    from ovr.config import load_config
    from ovr.data import write_digits_folder
    from ovr.pipeline import embed_data

    root = Path(cache_dir or ".") / "digits-images"
    write_digits_folder(root)
    cfg = load_config(None, {"cache_dir": cache_dir or "", "device": device})
    emb = embed_data(root, cfg)
    parts = [emb.split(s) for s in ("train", "val", "test")]
    return tuple(v for X, y, _ in parts for v in (X.cpu().numpy(), y.numpy()))


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def bench(name, Xtr, ytr, Xv, yv, Xte, yte, loop_heads: int, device: str = "cpu") -> dict:
    dev = resolve_device(device)
    res: dict = {"dataset": name, "train": Xtr.shape, "classes": int(ytr.max() + 1), "device": str(dev)}
    # Order: the loop and ovr first, scikit-learn last: OpenBLAS threads that scikit-learn leaves spinning
    # slowed torch's threads measured right after it (a single head looked 10x slower).
    # stacked vs loop: the same heads, same config (fast), same data
    kw = dict(CONFIGS["fast"])
    X, Xvt = torch.from_numpy(Xtr).to(dev), torch.from_numpy(Xv).to(dev)
    norm = Normalizer.fit("standardize", X)
    X, Xvt = norm(X), norm(Xvt)
    y, yvt = torch.from_numpy(ytr), torch.from_numpy(yv)
    K = int(ytr.max() + 1)
    names = [str(k) for k in range(K)]
    fit_ovr_heads(X, y, Xvt, yvt, [0], names[:1], **{**kw, "epochs": 1})  # warm-up (CUDA context, kernels)
    _, t_stack = timed(lambda: fit_ovr_heads(X, y, Xvt, yvt, list(range(K)), names, **kw))
    n_loop = min(loop_heads, K)
    _, t_loop = timed(lambda: [fit_ovr_heads(X, y, Xvt, yvt, [k], [names[k]], **kw) for k in range(n_loop)])
    t_loop_all = t_loop * K / n_loop
    res["stacked_vs_loop"] = {"heads": K, "stacked_seconds": t_stack, "loop_heads_measured": n_loop,
                              "loop_seconds_measured": t_loop, "loop_seconds_for_all": t_loop_all,
                              "loop_extrapolated": n_loop < K, "speedup": t_loop_all / t_stack,
                              "speedup_over_N": t_loop_all / t_stack / K}
    note = f" (loop of {n_loop} measured, x{K / n_loop:.0f})" if n_loop < K else ""
    print(f"[{name}] {K} heads stacked {t_stack:.2f} s vs loop {t_loop_all:.2f} s{note}: "
          f"{t_loop_all / t_stack:.1f}x = {t_loop_all / t_stack / K:.2f} x N (target >= 0.8 x N)")
    for cname, kw in CONFIGS.items():
        m, t = timed(lambda kw=kw: OvRClassifier(device=str(dev), **kw).fit(Xtr, ytr, Xv, yv))
        acc = float((m.predict(Xte) == yte).mean())
        res[f"ovr_{cname}"] = {"seconds": t, "accuracy": acc,
                               "config": {k: list(v) if isinstance(v, tuple) else v for k, v in kw.items()}}

    sk, t_sk = timed(lambda: make_pipeline(StandardScaler(), OneVsRestClassifier(
        LogisticRegression(max_iter=1000), n_jobs=-1)).fit(Xtr, ytr))
    res["sklearn_ovr"] = {"seconds": t_sk, "accuracy": float((sk.predict(Xte) == yte).mean())}
    print(f"[{name}] sklearn OneVsRest(LogisticRegression) n_jobs=-1: {t_sk:7.2f} s  acc {res['sklearn_ovr']['accuracy']:.4f}")
    for cname in CONFIGS:
        r = res[f"ovr_{cname}"]
        r["speedup_vs_sklearn"] = t_sk / r["seconds"]
        r["accuracy_minus_sklearn_points"] = 100 * (r["accuracy"] - res["sklearn_ovr"]["accuracy"])
        print(f"[{name}] ovr ({cname:7s})                       : {r['seconds']:7.2f} s  acc {r['accuracy']:.4f}  "
              f"-> {t_sk / r['seconds']:5.1f}x faster than sklearn, {r['accuracy_minus_sklearn_points']:+.2f} points")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--loop-heads", type=int, default=10, help="heads timed in the loop on the synthetic set")
    ap.add_argument("--skip-real", action="store_true")
    ap.add_argument("--device", default="cpu", help="where the ovr heads train: cpu | cuda | auto")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "heads_vs_sklearn.json"))
    a = ap.parse_args()
    out = {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "results": []}
    out["results"].append(bench("synthetic 20000x512, 100 classes", *synthetic(), loop_heads=a.loop_heads, device=a.device))
    if not a.skip_real:
        out["results"].append(bench("digits, EfficientNet-Lite0 embeddings", *digits(os.environ.get("OVR_CACHE_DIR"), a.device),
                                    loop_heads=100, device=a.device))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2, default=lambda o: list(o)))
    print(f"-> {a.out}")


if __name__ == "__main__":
    main()
