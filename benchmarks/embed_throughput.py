"""Embedding throughput: (a) the file pipeline (read + hash + decode + preprocess in workers + forward + cache
write) vs the raw forward pass on pre-decoded tensors, (b) cold vs warm-cache `ovr embed`. Same images, one run.

    python benchmarks/embed_throughput.py [--images 256] [--backbone efficientnet_lite0] [--device auto]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def make_photos(root: Path, n: int) -> Path:
    """n JPEG photos of realistic size (640x480 crops of scikit-image's sample photos), 4 classes."""
    from skimage import data as skdata

    srcs = [skdata.astronaut(), skdata.coffee(), skdata.chelsea(), skdata.rocket()]
    rng = np.random.default_rng(0)
    for i in range(n):
        c = i % 4
        img = Image.fromarray(srcs[c]).resize((800, 600))
        x, y = rng.integers(0, 160), rng.integers(0, 120)
        crop = img.crop((x, y, x + 640, y + 480))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        # the same crop can come up twice, and the cache embeds equal bytes once: mark each image as its own
        for b in range(16):
            crop.putpixel((b, 0), (255, 255, 255) if (i >> b) & 1 else (0, 0, 0))
        d = root / f"class{c}"
        d.mkdir(parents=True, exist_ok=True)
        crop.save(d / f"{i:05d}.jpg", quality=90)
    return root


def decode_paths(paths: list[Path], bb) -> dict:
    """CPU decode + the backbone's preprocessing, one process, img/s: PIL (what ovr uses) vs torchvision.io's
    libjpeg decode to a tensor + transforms.v2 on tensors. Both end in the same normalised [3, 224, 224] input."""
    import torchvision
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.transforms import v2

    from ovr.data import decode_image
    from ovr.export import split_transform

    blobs = [Path(p).read_bytes() for p in paths]
    prep = split_transform(bb.transform)
    size = prep.size
    rs = next(t for t in prep.geometry if type(t).__name__ == "Resize")  # the same size and kernel as PIL's
    tv = v2.Compose([v2.Resize(rs.size, interpolation=rs.interpolation, antialias=True), v2.CenterCrop(size),
                     v2.ToDtype(torch.float32, scale=True), v2.Normalize(prep.mean, prep.std)])
    out = {}
    t0 = time.perf_counter()
    for b in blobs:
        bb.transform(decode_image(b))
    out["PIL (ovr's path)"] = len(blobs) / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for b in blobs:
        tv(decode_jpeg(torch.frombuffer(bytearray(b), dtype=torch.uint8), mode=ImageReadMode.RGB))
    out[f"torchvision.io {torchvision.__version__}"] = len(blobs) / (time.perf_counter() - t0)
    a = bb.transform(decode_image(blobs[0]))
    b = tv(decode_jpeg(torch.frombuffer(bytearray(blobs[0]), dtype=torch.uint8), mode=ImageReadMode.RGB))
    return {"images_per_s": out, "max_abs_input_difference": float((a - b).abs().max())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=-1, help="DataLoader decode workers (-1: one per core, max 8)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "embed_throughput.json"))
    a = ap.parse_args()

    from ovr.data import load_image, scan_folder
    from ovr.backbones import load_backbone
    from ovr.cache import EmbeddingCache
    from ovr.features import default_workers, embed_paths, forward
    from ovr.runtime import resolve_device

    dev = resolve_device(a.device)
    tmp = Path(tempfile.mkdtemp(prefix="ovr-bench-"))
    data = make_photos(tmp / "photos", a.images)
    paths = scan_folder(data).paths
    bb = load_backbone(a.backbone)
    decode = decode_paths(paths[:128], bb)
    bb.model.to(dev).to(memory_format=torch.channels_last)

    # raw forward on tensors decoded beforehand (the ceiling the pipeline can reach)
    xs = torch.stack([bb.transform(load_image(p)) for p in paths])
    forward(bb, xs[: a.batch_size], dev)  # warm-up
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(0, len(xs), a.batch_size):
        forward(bb, xs[i:i + a.batch_size], dev)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    raw = len(xs) / (time.perf_counter() - t0)

    # the whole pipeline from files, cold cache
    cache = EmbeddingCache(tmp / "cache1", bb.key)
    t0 = time.perf_counter()
    r = embed_paths(paths, bb, cache, dev, batch_size=a.batch_size, workers=a.workers)
    pipe_s = time.perf_counter() - t0
    assert r.n_new == len(paths)
    pipe = len(paths) / pipe_s

    # cold vs warm `ovr embed` as a user runs it (a process each: includes start-up and model load)
    env = {**os.environ, "OVR_CACHE_DIR": str(tmp / "cache2")}
    cmd = [sys.executable, "-m", "ovr", "embed", str(data), "--backbone", a.backbone, "--device", a.device,
           "--workers", str(a.workers), "--batch-size", str(a.batch_size)]
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        subprocess.run(cmd, env=env, check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    # the embedding step alone, warm (what the cache saves inside a run)
    t0 = time.perf_counter()
    w = embed_paths(paths, bb, EmbeddingCache(tmp / "cache2", bb.key), dev)
    warm_inner = time.perf_counter() - t0
    assert w.n_new == 0

    res = {
        "images": len(paths), "image_size": "640x480 JPEG", "backbone": a.backbone, "device": str(dev),
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "batch_size": a.batch_size,
        "workers": default_workers(a.workers, dev),
        "raw_forward_images_per_s": raw, "pipeline_images_per_s": pipe, "pipeline_over_raw": pipe / raw,
        "cold_embed_cli_s": times[0], "warm_embed_cli_s": times[1], "cold_over_warm_cli": times[0] / times[1],
        "cold_embed_step_s": pipe_s, "warm_embed_step_s": warm_inner, "cold_over_warm_step": pipe_s / warm_inner,
        "targets": {"pipeline_over_raw": 0.8, "cold_over_warm": 50},
        "python": platform.python_version(), "torch": torch.__version__, "decode_one_process": decode,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2))
    print(f"raw forward      {raw:8.1f} img/s   (pre-decoded tensors, {a.backbone}, {dev}, {torch.get_num_threads()} threads)")
    print(f"file pipeline    {pipe:8.1f} img/s   ratio {pipe / raw:.2f} (target >= 0.8)")
    print(f"ovr embed (CLI)  cold {times[0]:.2f} s, warm {times[1]:.2f} s: {times[0] / times[1]:.1f}x (target >= 50x)")
    print(f"embed step only  cold {pipe_s:.2f} s, warm {warm_inner:.3f} s: {pipe_s / warm_inner:.0f}x")
    for k, v in decode["images_per_s"].items():
        print(f"decode+preprocess {k:28s} {v:7.1f} img/s (one process)")
    print(f"  max |difference| of the two normalised inputs: {decode['max_abs_input_difference']:.3f}")
    print(f"-> {a.out}")


if __name__ == "__main__":
    main()
