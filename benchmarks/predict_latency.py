"""One-image latency of `ovr predict MODEL one.png` in a fresh process, as a user runs it: each engine, cold (the
image is not in the cache) and cached, median and range over --repeats runs, phases interleaved. The model is
EfficientNet-Lite0 on 5 classes of the real-photo set; the backbone's ONNX graph is made once before timing
(first use of the onnxruntime engine), so "cold" means a new image, not a new machine.

With the onnxruntime engine, predict is torch-free once the model's answer graph for those options is cached
(ovr/apps/quick.py); "onnxruntime new options" is the first predict with options not used before (the torch path,
then the answer graph traced into the cache), on a new image.

    python benchmarks/predict_latency.py [--repeats 5] [--out benchmarks/results/predict_latency.json]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from datasets import write_photos_folder  # noqa: E402
from ovr.runtime import machine_name  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "predict_latency.json")
    a = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="ovr-latency-"))
    env = {**os.environ, "OVR_CACHE_DIR": str(base / "cache")}
    allp = write_photos_folder(base / "all", per_class=20)
    data = base / "photos"
    for n in sorted(p.name for p in allp.iterdir() if p.is_dir())[:5]:
        shutil.copytree(allp / n, data / n)
    ovr = [sys.executable, "-m", "ovr"]
    subprocess.run([*ovr, "train", str(data), "--out", str(base / "m")], env=env, check=True, capture_output=True)
    probe = sorted(data.rglob("*.png"))[0]
    for engine in ("torch", "onnxruntime"):  # first use: the graph is exported, weights read once
        subprocess.run([*ovr, "predict", str(base / "m"), str(probe), "--engine", engine], env=env, check=True,
                       capture_output=True)
    rng = np.random.default_rng(0)
    from PIL import Image

    times: dict[str, list[float]] = {}
    answers: dict[str, list[str]] = {}
    for r in range(a.repeats):
        for engine in ("torch", "onnxruntime"):
            img = base / f"new-{engine}-{r}.png"  # a new image each time: cold
            Image.open(probe).rotate(float(rng.uniform(1, 359))).save(img)
            phases = [("cold", img, []), ("cached", img, [])]  # the second run finds it in the cache
            if engine == "onnxruntime":
                fresh = base / f"new-options-{r}.png"
                Image.open(probe).rotate(float(rng.uniform(1, 359))).save(fresh)
                phases.append(("new options", fresh, ["--top-k", str(3 + r)]))
            for phase, path, flags in phases:
                t0 = time.perf_counter()
                out = subprocess.run([*ovr, "predict", str(base / "m"), str(path), "--engine", engine, "--json",
                                      *flags], env=env, check=True, capture_output=True, text=True).stdout
                times.setdefault(f"{engine} {phase}", []).append(time.perf_counter() - t0)
                answers.setdefault(f"{engine} {phase}", []).append(json.loads(out.splitlines()[0])["class"])
    res = {"machine": machine_name(), "backbone": "efficientnet_lite0", "repeats": a.repeats,
           "seconds": {k: {"median": float(np.median(v)), "min": min(v), "max": max(v)} for k, v in times.items()},
           "same_answers_across_engines": answers["torch cold"] == answers["onnxruntime cold"],
           "import_torch_s": _import_time("torch"),
           "import_onnxruntime_pil_numpy_s": _import_time("onnxruntime, PIL.Image, numpy")}
    for k, v in res["seconds"].items():
        print(f"{k:22s} median {v['median']:.2f} s  (range {v['min']:.2f}-{v['max']:.2f})")
    print(f"same answers across engines: {res['same_answers_across_engines']}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=1))


def _import_time(modules: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", f"import {modules}"], check=True)
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
