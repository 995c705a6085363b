"""What the backbone should see of an image: its own centre crop, or the whole image (`--frame crop|full`), on
multi-label and single-label data, against an independent scikit-learn reference. Both frames in one run, over
seeded resplits (mean and spread).

- multi-label: canvases (320 x 240) holding one to three real photographs (scikit-image's and scikit-learn's,
  one class each) pasted at random places, often at the borders; a CSV manifest (360/90/150 train/val/test rows
  per resplit). ovr (`train_model` + `evaluate_model`, default heads) with each frame: mAP on the test rows; the
  reference: `OneVsRestClassifier(LogisticRegression(C=0.1))` on standardised embeddings of the whole image.
- single-label: the real-photo set of the other benchmarks (16 classes, 64 x 64 crops) and scikit-learn's digits:
  test accuracy per frame.

    python benchmarks/multilabel_frame.py [--resplits 3] [--out benchmarks/results/multilabel_frame.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from datasets import cache_dir, write_photos_folder  # noqa: E402
from ovr.runtime import machine_name  # noqa: E402

SOURCES = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "china.jpg", "flower.jpg")


def sources() -> dict:
    from PIL import Image
    from skimage import data as skd
    from sklearn.datasets import load_sample_images

    sample = dict(zip(("china.jpg", "flower.jpg"), load_sample_images().images))
    out = {}
    for name in SOURCES:
        arr = sample[name] if name in sample else getattr(skd, name)()
        out[name.split(".")[0]] = Image.fromarray(arr).convert("RGB")
    return out


def write_canvases(root: Path, n: int = 600, seed: int = 0) -> Path:
    """n canvases of 1-3 photos each at random places (half of them touching a border) -> root/manifest.csv."""
    from PIL import Image

    if (root / "manifest.csv").exists():
        return root / "manifest.csv"
    src = sources()
    names = list(src)
    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True, exist_ok=True)
    rows = ["path,labels"]
    for i in range(n):
        canvas = Image.new("RGB", (320, 240), tuple(int(v) for v in rng.integers(0, 256, 3)))
        labels = sorted(rng.choice(len(names), size=int(rng.integers(1, 4)), replace=False).tolist())
        for k in labels:
            im = src[names[k]]
            s = int(rng.integers(70, 130))
            x0, y0 = rng.integers(0, im.width - 64), rng.integers(0, im.height - 64)
            crop = im.crop((x0, y0, x0 + 64 + rng.integers(0, im.width - x0 - 64 + 1) // 2,
                            y0 + 64 + rng.integers(0, im.height - y0 - 64 + 1) // 2)).resize((s, s))
            if rng.random() < 0.5:  # at a border: partly outside the centre crop
                x = int(rng.choice([rng.integers(-s // 3, 10), rng.integers(320 - s - 10, 320 - 2 * s // 3)]))
                y = int(rng.integers(-s // 3, 240 - 2 * s // 3))
            else:
                x, y = int(rng.integers(0, 320 - s)), int(rng.integers(0, 240 - s))
            canvas.paste(crop, (x, y))
        canvas.save(root / "img" / f"{i:04d}.png")
        rows.append(f"img/{i:04d}.png,{';'.join(names[k] for k in labels)}")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    return root / "manifest.csv"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resplits", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "multilabel_frame.json")
    a = ap.parse_args()
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import average_precision_score
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from ovr.config import load_config
    from ovr.apps.pipeline import embed_data, evaluate_model, train_model

    base = Path(tempfile.mkdtemp(prefix="ovr-frame-"))
    manifest = write_canvases(Path(cache_dir()) / "canvases")
    from ovr.embedding.data import write_digits_folder

    single = {"photos": write_photos_folder(Path(cache_dir()) / "photos-images"),
              "digits": write_digits_folder(Path(cache_dir()) / "digits-images")}
    res: dict = {"machine": machine_name(), "backbone": "efficientnet_lite0", "resplits": a.resplits,
                 "multilabel": {"ovr crop": [], "ovr full": [], "sklearn OvR C=0.1, full": []},
                 "single_label": {f"{d} ovr {f}": [] for d in single for f in ("crop", "full")}}
    for seed in range(a.resplits):
        common = {"cache_dir": cache_dir(), "device": a.device, "split_seed": seed, "val_fraction": 0.15,
                  "test_fraction": 0.25}
        for frame in ("crop", "full"):
            cfg = load_config(None, {**common, "frame": frame})
            train_model(manifest, base / f"ml-{frame}-{seed}", cfg, force=True)
            m = evaluate_model(base / f"ml-{frame}-{seed}", manifest, "test", device=a.device)
            res["multilabel"][f"ovr {frame}"].append(m["mAP"])
            for name, folder in single.items():
                train_model(folder, base / f"sl-{name}-{frame}-{seed}", cfg, force=True)
                s = evaluate_model(base / f"sl-{name}-{frame}-{seed}", folder, "test", device=a.device)
                res["single_label"][f"{name} ovr {frame}"].append(s["accuracy"])
        emb = embed_data(manifest, load_config(None, {**common, "frame": "full"}))
        X, T = emb.result.embeddings.numpy(), emb.folder.targets[emb.result.input_index]
        tr, te = emb.splits == "train", emb.splits == "test"
        ref = make_pipeline(StandardScaler(), OneVsRestClassifier(LogisticRegression(C=0.1, max_iter=2000)))
        ref.fit(X[tr], T[tr].astype(int))
        score = ref.decision_function(X[te])
        res["multilabel"]["sklearn OvR C=0.1, full"].append(
            float(average_precision_score(T[te], score, average="macro")))
        print(json.dumps({k: v[-1] for k, v in res["multilabel"].items()}), json.dumps(
            {k: v[-1] for k, v in res["single_label"].items()}), flush=True)
    for task in ("multilabel", "single_label"):
        res[task] = {k: {"mean": float(np.mean(v)), "std": float(np.std(v)), "values": v} for k, v in res[task].items()}
    for task, rows in (("multi-label mAP", res["multilabel"]), ("single-label accuracy", res["single_label"])):
        print(task + ": " + ", ".join(f"{k} {v['mean']:.3f} +-{v['std']:.3f}" for k, v in rows.items()))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
