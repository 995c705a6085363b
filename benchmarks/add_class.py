"""Cost and accuracy of growing a model one class at a time, in one run:
(1) scaling: time to add one class (one new head) vs a full retrain of all N heads, N = 10, 100, 1000,
    on synthetic embeddings (20 images per class, 512 dims);
(2) accuracy on real EfficientNet-Lite0 embeddings of scikit-learn's digits: train on N-1 classes then
    `add-class` the last, vs train on all N; then `refresh` of the heads the new class confuses. Each of the
    10 digits takes a turn as the added class. Also the end-to-end `add_class` call on a saved model.

    python benchmarks/add_class.py [--sizes 10 100 1000] [--device cpu|cuda|auto]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ovr.heads import Normalizer, fit_ovr_heads, stack_heads, stacked_logits
from ovr.runtime import resolve_device

# Scaling runs use one L2 value and at most 20 epochs so N = 1000 (1000 columns x 20,000 rows) fits the budget.
SCALE_KW = dict(l2_grid=(1e-2,), epochs=20, batch_size=512, patience=5, lr=3e-3)


def scaling(sizes: list[int], per_class: int = 20, dim: int = 512, device: str = "cpu") -> list[dict]:
    dev = resolve_device(device)
    out = []
    for N in sizes:
        g = torch.Generator().manual_seed(N)
        centers = torch.randn(N, dim, generator=g) * 0.5
        y = torch.arange(N).repeat_interleave(per_class)
        X = centers[y] + torch.randn(len(y), dim, generator=g)
        yv = torch.arange(N).repeat_interleave(4)
        Xv = centers[yv] + torch.randn(len(yv), dim, generator=g)
        norm = Normalizer.fit("standardize", X)
        X, Xv = norm(X).to(dev), norm(Xv).to(dev)
        names = [f"c{k}" for k in range(N)]
        fit_ovr_heads(X, y, Xv, yv, [0], names[:1], **{**SCALE_KW, "epochs": 1})  # warm-up
        t0 = time.perf_counter()
        fit_ovr_heads(X, y, Xv, yv, list(range(N)), names, **SCALE_KW)
        full = time.perf_counter() - t0
        t0 = time.perf_counter()
        fit_ovr_heads(X, y, Xv, yv, [N - 1], [names[-1]], **SCALE_KW)
        add = time.perf_counter() - t0
        r = {"classes": N, "rows": len(y), "full_retrain_s": full, "add_one_s": add, "speedup": full / add,
             "target_speedup": N / 2, "reached": full / add >= N / 2}
        print(f"N={N:5d}: full retrain {full:8.2f} s, add one head {add:6.3f} s -> {full / add:7.1f}x "
              f"(target >= N/2 = {N / 2:.0f}x: {'reached' if r['reached'] else 'NOT reached'})")
        out.append(r)
    return out


def real_accuracy(cache_dir: str, device: str = "cpu") -> dict:
    from ovr.config import load_config
    from ovr.data import write_digits_folder
    from ovr.pipeline import embed_data

    root = Path(cache_dir) / "digits-images"
    write_digits_folder(root)
    cfg = load_config(None, {"cache_dir": cache_dir, "device": device})
    emb = embed_data(root, cfg)
    X, y, _ = emb.split("train")
    Xv, yv, _ = emb.split("val")
    Xt, yt, _ = emb.split("test")
    K = len(emb.folder.classes)
    names = emb.folder.classes
    t = cfg.train
    kw = dict(epochs=t.epochs, lr=t.lr, batch_size=t.head_batch_size, patience=t.patience, l2_grid=t.l2_grid,
              pos_weight=t.pos_weight, seed=t.seed)

    def fit(Xtr, ytr, Xva, yva, targets) -> dict:
        """As ovr trains heads: standardise with the statistics of these data, fold that into the heads."""
        norm = Normalizer.fit("standardize", Xtr)
        heads, _ = fit_ovr_heads(norm(Xtr), ytr, norm(Xva), yva, targets, [names[k] for k in targets], **kw)
        return dict(zip(targets, (norm.fold(h) for h in heads)))

    def acc(heads_by_class):
        z = stacked_logits(stack_heads([heads_by_class[k] for k in range(K)], Xt.device), Xt)
        return float((z.argmax(1).cpu() == yt).float().mean())

    acc_full = acc(fit(X, y, Xv, yv, list(range(K))))
    rows = []
    for new in range(K):
        old = [k for k in range(K) if k != new]
        m, mv = y != new, yv != new
        heads = fit(X[m], y[m], Xv[mv], yv[mv], old)
        heads.update(fit(X, y, Xv, yv, [new]))  # add-class: all the data the model remembers, the new class too
        a_add = acc(heads)
        # refresh: old heads that fire on >10% of the new class's val images get retrained with it as a negative
        zv = stacked_logits(stack_heads([heads[k] for k in old], Xv.device), Xv[yv == new])
        confused = [k for k, rate in zip(old, (torch.sigmoid(zv) > 0.5).float().mean(0).tolist()) if rate > 0.10]
        if confused:
            heads.update(fit(X, y, Xv, yv, confused))
        a_ref = acc(heads)
        rows.append({"added": names[new], "acc_add": a_add, "confused": [names[k] for k in confused], "acc_refresh": a_ref})
        print(f"  add {names[new]}: acc {a_add:.4f} ({100 * (a_add - acc_full):+.2f} pts), refresh of "
              f"{len(confused)} heads -> {a_ref:.4f} ({100 * (a_ref - acc_full):+.2f} pts)")
    mean_add = float(np.mean([r["acc_add"] for r in rows]))
    mean_ref = float(np.mean([r["acc_refresh"] for r in rows]))
    print(f"digits: train-on-N {acc_full:.4f}; train-on-N-1-then-add {mean_add:.4f} ({100 * (mean_add - acc_full):+.2f} "
          f"pts, target within 1); after refresh {mean_ref:.4f} ({100 * (mean_ref - acc_full):+.2f} pts)")
    return {"train_on_n": acc_full, "add_mean": mean_add, "refresh_mean": mean_ref, "per_class": rows,
            "add_within_1_point": abs(mean_add - acc_full) <= 0.01}


def end_to_end(cache_dir: str, device: str = "cpu") -> dict:
    """The library call behind `ovr add-class` on a saved 9-class model: lock, load, embed (cached), train, save."""
    from ovr.config import load_config
    from ovr.pipeline import add_class, model_config, train_model

    tmp = Path(tempfile.mkdtemp())
    src = Path(cache_dir) / "digits-images"
    nine = tmp / "nine"
    shutil.copytree(src, nine, ignore=lambda d, n: ["digit_9"] if Path(d) == src else [])
    cfg = load_config(None, {"cache_dir": cache_dir, "device": device})
    t0 = time.perf_counter()
    train_model(nine, tmp / "model", cfg)
    t_train = time.perf_counter() - t0
    r = add_class(tmp / "model", "digit_9", [str(src / "digit_9")], model_config(tmp / "model", cache_dir=cache_dir, device=device))
    print(f"end to end: train 9 classes {t_train:.2f} s (embeddings cached); add-class digit_9 {r.seconds:.2f} s "
          f"of which head training {r.train_seconds:.2f} s")
    return {"train_9_s": t_train, "add_class_s": r.seconds, "add_class_head_training_s": r.train_seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "add_class.json"))
    a = ap.parse_args()
    cache = os.environ.get("OVR_CACHE_DIR") or tempfile.mkdtemp()
    res = {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": a.device,
           "scaling_config": SCALE_KW, "scaling": scaling(a.sizes, device=a.device),
           "digits": real_accuracy(cache, a.device), "end_to_end": end_to_end(cache, a.device)}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2, default=list))
    print(f"-> {a.out}")


if __name__ == "__main__":
    main()
