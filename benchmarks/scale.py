"""How ovr's costs grow with images and classes: index load, gather, head training, predict; time and peak memory.

    python benchmarks/scale.py [--images 12500,25000,50000] [--classes 10,100,1000] [--dim 512]
                               [--index-sizes 10000,100000,1000000] [--out benchmarks/results/scale.json]

Synthetic embeddings (Gaussian class centres + noise) stored through the real cache (shards of 1,024 rows), so
index load and gather are the real code paths. Heads use one L2 strength (`--l2-grid` with one value: the grid
would multiply the solve by 11). Each (images, classes) point runs in a fresh process, so its peak RSS
(ru_maxrss) is its own. The issue's full scale (1,000,000 x 1,280, 10,000 classes) is for a GPU machine; on 2 CPU
cores the default is scaled down. Writes JSON and a log-log plot beside it.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from ovr.runtime import machine_name


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one(n: int, C: int, dim: int, root: Path, settings: str = "default") -> dict:
    import torch

    from ovr.embedding.cache import EmbeddingCache
    from ovr.config import TrainConfig
    from ovr.learn.model import Model

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    key = f"{n:08d}x{dim:05d}x{C:06d}".ljust(64, "0")  # the rows depend on the classes' centres
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1, (C, dim)).astype(np.float32)
    y = rng.integers(0, C, n)
    keys = [f"{i:064x}" for i in range(n)]
    cache = EmbeddingCache(root, key)
    if len(cache) < n:
        for s in range(0, n, 1024):
            X = centres[y[s:s + 1024]] + rng.normal(0, 2.0, (len(y[s:s + 1024]), dim)).astype(np.float32)
            cache.put(keys[s:s + 1024], torch.from_numpy(X))
    out = {"images": n, "classes": C, "dim": dim}
    t = time.perf_counter()
    cache = EmbeddingCache(root, key)
    out["index_load_s"] = time.perf_counter() - t
    t = time.perf_counter()
    X = cache.get(keys)
    out["gather_s"] = time.perf_counter() - t
    out["rss_after_gather_mb"] = rss_mb()
    yt = torch.from_numpy(y)
    nv = n // 10
    m = Model({"name": "synthetic", "dim": dim}, "standardize", "linear", [str(c) for c in range(C)])
    t = time.perf_counter()
    # "default": TrainConfig() as a user gets it (11 strengths searched by the L2 path on at most search_rows
    # rows, then each head solved on all rows); "all-rows": the path on every row; "one": a single strength
    cfg = {"default": TrainConfig(), "all-rows": TrainConfig(search_rows=0),
           "one": TrainConfig(l2_grid=(1e-3,))}[settings]
    hold = nv // 2  # rows 0..hold-1 never train: the held-out accuracy
    m.fit_heads(m.classes, X[nv:], yt[nv:], X[hold:nv], yt[hold:nv], cfg)
    out["settings"] = settings
    out["train_s"] = time.perf_counter() - t
    out["rss_after_train_mb"] = rss_mb()
    t = time.perf_counter()
    ans = m.answer(X[:hold])
    out["predict_s"] = time.perf_counter() - t
    out["predict_rows"] = hold
    out["accuracy_held_out"] = float((ans.index == y[:hold]).mean())
    out["l2_chosen"] = sorted({r.l2 for r in m.records.values()})
    out["rss_peak_mb"] = rss_mb()
    return out


def index_only(N: int, root: Path) -> dict:
    """Opening a cache of N keys in N/1,000 real shards (1-dim embeddings: only the index matters here). The index
    is compacted once after the writes (timed apart; an opener does it when over 64 shards are uncovered); later
    opens are what every run pays."""
    import hashlib

    import torch

    from ovr.embedding.cache import EmbeddingCache

    key = f"index{N:010d}".ljust(64, "0")
    c = EmbeddingCache(root, key)
    if len(c) < N:
        for s in range(max(1, N // 1000)):
            keys = [hashlib.sha256(f"{s}-{i}".encode()).hexdigest() for i in range(min(N, 1000))]
            c.put(keys, torch.zeros(len(keys), 1))
    t = time.perf_counter()
    EmbeddingCache(root, key)._compact()
    first = time.perf_counter() - t
    times = []
    for _ in range(3):
        t = time.perf_counter()
        c = EmbeddingCache(root, key)
        times.append(time.perf_counter() - t)
    probe = [hashlib.sha256(f"{s}-7".encode()).hexdigest() for s in range(max(1, N // 1000))] * 10
    t = time.perf_counter()
    assert all(c.contains(probe))
    lookup = (time.perf_counter() - t) / len(probe)
    return {"keys": len(c), "compaction_s": first, "index_load_s": min(times),
            "lookup_us_per_key": lookup * 1e6, "index_mb": (c.dir / "index.npz").stat().st_size / 1e6,
            "rss_mb": rss_mb()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", default="12500,25000,50000")
    ap.add_argument("--classes", default="10,100,1000")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--index-sizes", default="10000,100000,1000000")
    ap.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "ovr-scale")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/scale.json"))
    ap.add_argument("--settings", default=["default"], nargs="+", choices=("default", "all-rows", "one"),
                    help="default: the default L2 search over 11 strengths (the path on at most search_rows rows); "
                         "all-rows: the path on every row; one: a single strength (1e-3). Several: each point "
                         "runs each, in turn")
    ap.add_argument("--one", nargs=2, type=int, help=argparse.SUPPRESS)
    ap.add_argument("--index-one", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one(a.one[0], a.one[1], a.dim, a.root, a.settings[0])))
        return
    if a.index_one:
        print(json.dumps(index_only(a.index_one, a.root)))
        return
    res = {"machine": machine_name(), "dim": a.dim, "points": [], "index": []}
    for N in map(int, a.index_sizes.split(",")):
        r = subprocess.run([sys.executable, __file__, "--index-one", str(N), "--root", str(a.root)],
                           capture_output=True, text=True, check=True)
        res["index"].append(json.loads(r.stdout))
        print("index", res["index"][-1], flush=True)
    for n in map(int, a.images.split(",")):
        for C in map(int, a.classes.split(",")):
            for settings in a.settings:
                r = subprocess.run([sys.executable, __file__, "--one", str(n), str(C), "--dim", str(a.dim), "--root",
                                    str(a.root), "--settings", settings], capture_output=True, text=True)
                if r.returncode:
                    print(r.stderr[-2000:])
                    continue
                res["points"].append(json.loads(r.stdout))
                print(res["points"][-1], flush=True)
                a.out.parent.mkdir(parents=True, exist_ok=True)
                a.out.write_text(json.dumps(res, indent=1))
    plot(res, a.out.with_suffix(".png"))


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    pts = res["points"]
    for C, settings in sorted({(p["classes"], p.get("settings", "default")) for p in pts}):
        row = sorted((p for p in pts if p["classes"] == C and p.get("settings", "default") == settings),
                     key=lambda p: p["images"])
        for stage, style in (("train_s", "o-"), ("predict_s", "s--"), ("gather_s", "^:")):
            axes[0].loglog([p["images"] for p in row], [p[stage] for p in row], style,
                           label=f"{stage[:-2]}, {C} classes, {settings}")
    axes[0].set_xlabel("images"), axes[0].set_ylabel("seconds"), axes[0].legend(fontsize=6)
    axes[0].set_title("time vs images (log-log)")
    n_max = max(p["images"] for p in pts)
    first = pts[0].get("settings", "default")
    row = sorted((p for p in pts if p["images"] == n_max and p.get("settings", "default") == first),
                 key=lambda p: p["classes"])
    axes[1].loglog([p["classes"] for p in row], [p["train_s"] for p in row], "o-", label="train")
    axes[1].loglog([p["classes"] for p in row], [p["predict_s"] for p in row], "s--", label="predict")
    axes[1].set_xlabel("classes"), axes[1].set_ylabel("seconds"), axes[1].legend(fontsize=7)
    axes[1].set_title(f"time vs classes at {n_max:,} images")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
