"""Augmented views and test-time augmentation on frozen features: test accuracy with K = 0, 2, 5, 10 training views
per image, with and without TTA (5 test views), for ovr and the softmax baseline, on the digits and the real-photo
set, over resplits; plus the embedding time the views cost.

    python benchmarks/views.py [--resplits 3] [--out benchmarks/results/views.json]

Every image's views 1..10 are embedded once (cached; a rerun embeds nothing) and every K uses views 1..K, so the
K values differ only in how many views train the heads. Splits are reseeded per resplit (split_seed), so the spread
covers which images land in train/val/test.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from datasets import cache_dir, write_photos_folder  # noqa: E402
from ovr.runtime import machine_name  # noqa: E402

KS = (0, 2, 5, 10)
TTA = 5


def run(name: str, root: Path, resplits: int, out: dict) -> None:
    from ovr.apps.bench import with_views
    from ovr.embedding.cache import EmbeddingCache
    from ovr.config import load_config
    from ovr.learn.estimators import OvRClassifier, SoftmaxClassifier
    from ovr.embedding.features import embed_views
    from ovr.apps.pipeline import embed_data

    res: dict = {"resplits": resplits, "runs": []}
    for s in range(resplits):
        cfg = load_config(None, {"cache_dir": cache_dir(), "device": "cpu", "split_seed": s})
        t0 = time.perf_counter()
        emb = embed_data(root, cfg)
        plain_s = time.perf_counter() - t0
        cache = EmbeddingCache(cache_dir(), emb.backbone.key)
        V = {}
        t0 = time.perf_counter()
        for split in ("train", "val", "test"):
            rows = np.flatnonzero(emb.splits == split)
            _, v = embed_views([emb.result.paths[i] for i in rows], [emb.result.keys[i] for i in rows], max(KS),
                               0, emb.backbone, cache, torch.device("cpu"))
            V[split] = v.view(len(rows), max(KS), -1)
        views_s = time.perf_counter() - t0
        X, y, _ = emb.split("train")
        Xv, yv, _ = emb.split("val")
        Xt, yt, _ = emb.split("test")
        yt = yt.numpy()
        for K in KS:
            Xa, ya = with_views(X, y, V["train"][:, :K])
            for method, Est in (("ovr", OvRClassifier), ("softmax", SoftmaxClassifier)):
                t0 = time.perf_counter()
                m = Est(device="cpu").fit(Xa.numpy(), ya.numpy(), eval_set=(Xv.numpy(), yv.numpy()))
                train_s = time.perf_counter() - t0
                z = m._logits(Xt)
                zt = np.mean([z] + [m._logits(V["test"][:, k]) for k in range(TTA)], axis=0)
                r = {"resplit": s, "K": K, "method": method, "accuracy": float((z.argmax(1) == yt).mean()),
                     "accuracy_tta": float((zt.argmax(1) == yt).mean()), "train_seconds": train_s,
                     "train_rows": int(len(Xa))}
                res["runs"].append(r)
                print(name, json.dumps(r), flush=True)
        res.setdefault("embed_seconds", []).append({"plain": plain_s, "views_1_to_10": views_s,
                                                    "images": len(emb.result.keys)})
    table = {}
    for method in ("ovr", "softmax"):
        for K in KS:
            rs = [r for r in res["runs"] if r["method"] == method and r["K"] == K]
            table[f"{method} K={K}"] = {k: {"mean": float(np.mean([r[k] for r in rs])),
                                            "std": float(np.std([r[k] for r in rs]))}
                                        for k in ("accuracy", "accuracy_tta", "train_seconds")}
    res["table"] = table
    out[name] = res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resplits", type=int, default=3)
    ap.add_argument("--datasets", default="digits,photos")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/views.json"))
    a = ap.parse_args()
    from ovr.embedding.data import write_digits_folder

    out: dict = {"machine": machine_name(),
                 "torch_threads": torch.get_num_threads(), "K": KS, "tta_views": TTA}
    for name in a.datasets.split(","):
        root = (write_digits_folder(Path(cache_dir()) / "digits-images") if name == "digits"
                else write_photos_folder(Path(cache_dir()) / "photos3-images"))
        run(name, root, a.resplits, out)
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(out, indent=1))
    for name in a.datasets.split(","):
        print(f"\n{name}: mean ± std over {a.resplits} resplits")
        for k, v in out[name]["table"].items():
            print(f"  {k:14s} acc {v['accuracy']['mean']:.3f} ±{v['accuracy']['std']:.3f}   "
                  f"TTA {v['accuracy_tta']['mean']:.3f} ±{v['accuracy_tta']['std']:.3f}   "
                  f"train {v['train_seconds']['mean']:.1f} s")


if __name__ == "__main__":
    main()
