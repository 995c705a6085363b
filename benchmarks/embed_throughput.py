"""Embedding throughput, both decode paths (ovr.embedding.pixels: pil, tensor) in one run, same images:
(a) stage by stage in one process: decode, preprocessing (resize, crop, normalise), model forward;
(b) the file pipeline (read + hash + decode + preprocess in workers + forward + cache write) against the raw forward
    pass on pre-decoded tensors;
(c) how far the tensor path's embeddings are from the PIL path's;
(d) cold vs warm-cache `ovr embed`;
(e) --only-engines: torch eager against onnxruntime, raw and through the file pipeline;
(f) --only-decode-threads: a batch decoded on one thread against two, by image size.

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


def stages(blobs: list[bytes], bb, dev) -> dict:
    """Decode and preprocessing, one process, img/s, for each path; TorchCodec's CPU decode too when installed."""
    import warnings

    from ovr.embedding.data import decode_image
    from ovr.embedding.pixels import _decode_jpegs

    t = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
    out: dict[str, float] = {}

    def rate(fn, items) -> float:
        fn(items[0])
        t0 = time.perf_counter()
        for x in items:
            fn(x)
        return len(items) / (time.perf_counter() - t0)

    out["decode: PIL"] = rate(decode_image, blobs)
    out["decode: torchvision.io (libjpeg-turbo)"] = rate(lambda x: _decode_jpegs([x], exif=True), t)
    try:
        from torchcodec.decoders import decode_jpeg as tc_decode

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out["decode: TorchCodec"] = rate(lambda x: tc_decode(x, mode="RGB"), t)
    except ImportError:
        pass
    ims = [decode_image(b) for b in blobs]
    pil = bb.pixels(dev)
    out["preprocess: PIL resize + ToTensor + normalise"] = rate(lambda im: bb.transform(im), ims)
    ten = load_tensor_twin(bb).pixels(dev)
    arrs = [_decode_jpegs([x])[0] for x in t]
    out["preprocess: tensor resize + crop (+ normalise per batch)"] = rate(ten._geometry, arrs)
    # what a decode worker does on the CUDA path (check the header, pass the bytes on): its ceiling per worker
    gpu_route = load_tensor_twin(bb).pixels(dev, batch_decode=True)
    out["CUDA path, worker side: header check + bytes to tensor"] = rate(gpu_route.item, blobs)
    if dev.type == "cuda":
        for n in (1, 64):
            batch = t[:n]
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(max(1, len(t) // n)):
                _decode_jpegs(batch, dev)
            torch.cuda.synchronize()
            out[f"decode: nvJPEG, batches of {n}"] = max(1, len(t) // n) * n / (time.perf_counter() - t0)
        g = [a.to(dev) for a in arrs]
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for a in g:
            ten._geometry(a)
        torch.cuda.synchronize()
        out["preprocess: tensor resize + crop on the GPU"] = len(g) / (time.perf_counter() - t0)
    del pil
    return out


def load_tensor_twin(bb):
    from ovr.embedding.backbones import load_backbone

    return load_backbone(bb.name, bb.weights, decode="tensor")


def engines(paths: list, a, dev, tmp: Path, repeats: int = 5) -> dict:
    """(e) torch eager against onnxruntime (ovr.embedding.engine), same weights: the raw forward on one pre-decoded
    batch and the file pipeline (`embed_paths`, what `ovr embed` runs) on a cold cache, every one of them in each of
    `repeats` rounds; the best of the rounds, and the ratios within a round (median); and how far the engines'
    embeddings are apart."""
    from ovr.embedding.backbones import load_backbone
    from ovr.embedding.cache import EmbeddingCache
    from ovr.config import FeatureConfig
    from ovr.embedding.data import load_image
    from ovr.embedding.engine import attach
    from ovr.embedding.features import embed_paths, forward

    decode = FeatureConfig().decode_path
    bbs = {}
    for eng in ("torch", "onnxruntime"):
        bbs[eng] = load_backbone(a.backbone, a.weights, decode=decode)
        attach(bbs[eng], eng, dev, tmp / "engine-cache")
    xs = torch.stack([bbs["torch"].pixels("cpu").image(load_image(p)) for p in paths[:a.batch_size]])
    if xs.dtype == torch.uint8:  # the tensor path's items are uint8 crops: normalise as Pixels.batch does
        xs, _ = bbs["torch"].pixels("cpu").batch(list(xs))
    out = {eng: forward(bb, xs, dev).cpu() for eng, bb in bbs.items()}  # warm-up (and the graph's export)
    # the same graph in one session with the batch left free, as the engine ran it before (OrtForward's docstring)
    free = bbs["onnxruntime"]._ort._session(None)  # the engine's options, the batch left free
    runs = {eng: (lambda bb=bb: forward(bb, xs, dev)) for eng, bb in bbs.items()}
    runs["onnxruntime, batch left free"] = lambda: free.run(None, {"pixels": xs.numpy()})
    runs["onnxruntime, batch left free"]()
    # Rounds: each times every raw forward and then each engine's file pipeline on a cold cache, so a ratio can be
    # taken within one round (this shared machine's speed drifts by +-40% between minutes).
    rounds: list[dict] = []
    for rnd in range(repeats):
        r: dict = {"raw": {}, "pipeline": {}}
        for eng, run in runs.items():
            t0 = time.perf_counter()
            run()
            r["raw"][eng] = len(xs) / (time.perf_counter() - t0)
        for eng, bb in bbs.items():
            cache = EmbeddingCache(tmp / f"engine-pipeline-{eng}-{rnd}", bb.key)
            t0 = time.perf_counter()
            embed_paths(paths, bb, cache, dev, batch_size=a.batch_size, workers=a.workers)
            r["pipeline"][eng] = len(paths) / (time.perf_counter() - t0)
        rounds.append(r)
    raw = {eng: max(r["raw"][eng] for r in rounds) for eng in runs}
    A, B = out["torch"], out["onnxruntime"]
    med = lambda v: float(np.median(v))  # noqa: E731
    pipeline = {eng: {"images_per_s": max(r["pipeline"][eng] for r in rounds),
                      "over_torch_raw": max(r["pipeline"][eng] for r in rounds) / raw["torch"],
                      "over_own_raw": max(r["pipeline"][eng] for r in rounds) / raw[eng],
                      "over_torch_raw_median_of_rounds": med([r["pipeline"][eng] / r["raw"]["torch"] for r in rounds]),
                      "over_own_raw_median_of_rounds": med([r["pipeline"][eng] / r["raw"][eng] for r in rounds]),
                      "rounds_images_per_s": [r["pipeline"][eng] for r in rounds]} for eng in bbs}
    res = {"raw_forward_images_per_s": raw, "rounds": rounds, "onnxruntime_over_torch_raw": raw["onnxruntime"] / raw["torch"],
           "pipeline": pipeline, "batch": len(xs), "decode": decode, "threads": torch.get_num_threads(),
           "embeddings_max_abs_diff_over_max_abs": float((A - B).abs().max() / A.abs().max()),
           "embeddings_cosine_min": float(torch.nn.functional.cosine_similarity(A, B, dim=1).min()),
           "targets": {"default_engine_pipeline_over_torch_raw": 2.5, "pipeline_over_own_raw": 0.8}}
    print(f"engines, {len(xs)}-image batch, best of {repeats} rounds: torch eager {raw['torch']:.1f} img/s, onnxruntime "
          f"{raw['onnxruntime']:.1f} img/s ({res['onnxruntime_over_torch_raw']:.2f}x)")
    for eng, v in pipeline.items():
        print(f"  file pipeline with {eng:12s} {v['images_per_s']:7.1f} img/s = {v['over_torch_raw']:.2f}x torch raw, "
              f"{v['over_own_raw']:.2f} of its own raw (within a round, median: "
              f"{v['over_torch_raw_median_of_rounds']:.2f}x, {v['over_own_raw_median_of_rounds']:.2f})")
    print(f"  embeddings: max |diff| / max |x| = {res['embeddings_max_abs_diff_over_max_abs']:.2e}")
    return res


def decode_threads(tmp: Path, a, repeats: int = 3) -> list[dict]:
    """(f) A batch of 64 files decoded (read, decode, resize, crop: `_Decode`, the loop without workers) on one
    thread against two, by image size and format, interleaved, best of `repeats` rounds: where threads start to pay
    (features.THREADED_DECODE_BYTES; this times the forced choice, not that rule)."""
    from skimage import data as skdata

    from ovr.embedding.backbones import load_backbone
    from ovr.embedding.data import map_decoding
    from ovr.embedding.features import _Decode

    px = load_backbone(a.backbone, a.weights, decode="tensor").pixels("cpu")
    src = Image.fromarray(skdata.astronaut())
    out = []
    for fmt in ("JPEG", "PNG"):
        for w, h in ((24, 24), (64, 48), (128, 96), (256, 192), (341, 256), (640, 480)):
            paths = []
            for i in range(64):
                p = tmp / f"threads-{fmt}-{w}-{i}.{fmt.lower()}"
                im = src.resize((w, h))
                im.putpixel((0, 0), (i, i, i))  # distinct files
                im.save(p, fmt)
                paths.append(p)
            best = {1: float("inf"), 2: float("inf")}
            for _ in range(repeats):
                for th in best:
                    d = _Decode(paths, px)
                    t0 = time.perf_counter()
                    map_decoding(d.__getitem__, list(range(len(paths))), th)
                    best[th] = min(best[th], (time.perf_counter() - t0) / len(paths) * 1e3)
            row = {"format": fmt, "size": f"{w}x{h}", "mean_file_bytes": int(np.mean([p.stat().st_size for p in paths])),
                   "ms_per_image_1_thread": best[1], "ms_per_image_2_threads": best[2],
                   "threads_speedup": best[1] / best[2]}
            print(f"  {fmt} {w}x{h} ({row['mean_file_bytes'] / 1e3:.0f} KB): 1 thread {best[1]:.3f} ms/img, "
                  f"2 threads {best[2]:.3f} ms/img ({row['threads_speedup']:.2f}x)", flush=True)
            out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--weights", default="default", help="none: random init (throughput does not depend on it)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=-1, help="DataLoader decode workers (-1: ovr's default)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "embed_throughput.json"))
    ap.add_argument("--only-engines", action="store_true", help="only (e): torch vs onnxruntime")
    ap.add_argument("--only-decode-threads", action="store_true", help="only (f): decoding on 1 vs 2 threads by size")
    a = ap.parse_args()

    from ovr.embedding.data import load_image, scan_folder
    from ovr.embedding.backbones import load_backbone
    from ovr.embedding.cache import EmbeddingCache
    from ovr.embedding.features import default_workers, embed_paths, forward
    from ovr.runtime import resolve_device

    dev = resolve_device(a.device)
    tmp = Path(tempfile.mkdtemp(prefix="ovr-bench-"))
    if a.only_decode_threads:
        res = {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "backbone": a.backbone,
               "decode_threads": decode_threads(tmp, a)}
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=2))
        return
    data = make_photos(tmp / "photos", a.images)
    paths = scan_folder(data).paths
    if a.only_engines:
        res = {"images": len(paths), "image_size": "640x480 JPEG", "backbone": a.backbone, "device": str(dev),
               "cpu_count": os.cpu_count(), "engines": engines(paths, a, dev, tmp)}
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=2))
        return
    bb = load_backbone(a.backbone, a.weights, decode="pil")
    st = stages([Path(p).read_bytes() for p in paths[:128]], bb, dev)
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
    st["model forward (pre-decoded batches)"] = raw

    # the whole pipeline from files, cold cache, each path
    paths_res, emb = {}, {}
    for decode in ("pil", "tensor"):
        b = bb if decode == "pil" else load_tensor_twin(bb)
        cache = EmbeddingCache(tmp / f"cache-{decode}", b.key)
        t0 = time.perf_counter()
        r = embed_paths(paths, b, cache, dev, batch_size=a.batch_size, workers=a.workers)
        secs = time.perf_counter() - t0
        assert r.n_new == len(paths)
        emb[decode] = r.embeddings.float().cpu()
        paths_res[decode] = {"images_per_s": len(paths) / secs, "over_raw": len(paths) / secs / raw, "seconds": secs}

    # how far apart the two paths' embeddings are
    A, B = emb["pil"], emb["tensor"]
    rel = ((A - B).norm(dim=1) / A.norm(dim=1))
    cos = torch.nn.functional.cosine_similarity(A, B, dim=1)
    equivalence = {"relative_l2_mean": float(rel.mean()), "relative_l2_max": float(rel.max()),
                   "cosine_min": float(cos.min()), "max_abs": float((A - B).abs().max()),
                   "embedding_abs_max": float(A.abs().max())}

    # cold vs warm `ovr embed` as a user runs it (a process each: includes start-up and model load)
    env = {**os.environ, "OVR_CACHE_DIR": str(tmp / "cache2")}
    cmd = [sys.executable, "-m", "ovr", "embed", str(data), "--backbone", a.backbone, "--weights", a.weights,
           "--device", a.device, "--workers", str(a.workers), "--batch-size", str(a.batch_size)]
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        subprocess.run(cmd, env=env, check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    # the embedding step alone, warm (what the cache saves inside a run)
    from ovr.config import FeatureConfig

    auto = load_backbone(a.backbone, a.weights, decode=FeatureConfig().decode_path)  # what the CLI run used
    t0 = time.perf_counter()
    w = embed_paths(paths, auto, EmbeddingCache(tmp / "cache2", auto.key), dev)
    warm_inner = time.perf_counter() - t0
    assert w.n_new == 0

    res = {
        "images": len(paths), "image_size": "640x480 JPEG", "backbone": a.backbone, "device": str(dev),
        "gpu": torch.cuda.get_device_name(0) if dev.type == "cuda" else None,
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "batch_size": a.batch_size,
        "workers": default_workers(a.workers, dev),
        "raw_forward_images_per_s": raw, "pipeline": paths_res,
        "stages_images_per_s_one_process": st, "tensor_vs_pil_embeddings": equivalence,
        "cold_embed_cli_s": times[0], "warm_embed_cli_s": times[1], "cold_over_warm_cli": times[0] / times[1],
        "cold_embed_step_s": paths_res[FeatureConfig().decode_path]["seconds"], "warm_embed_step_s": warm_inner, "cold_over_warm_step": paths_res[FeatureConfig().decode_path]["seconds"] / warm_inner,
        "targets": {"pipeline_over_raw": 0.8, "cold_over_warm": 50, "cuda_images_per_s": 5000},
        "python": platform.python_version(), "torch": torch.__version__,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2))
    print(f"{a.backbone} on {dev} ({torch.get_num_threads()} threads, {res['workers']} decode workers), {len(paths)} 640x480 JPEGs")
    for k, v in st.items():
        print(f"  {k:58s} {v:8.1f} img/s")
    for k, v in paths_res.items():
        print(f"file pipeline, {k:6s} decode  {v['images_per_s']:8.1f} img/s   {v['over_raw']:.2f} of raw (target >= 0.8)")
    print(f"tensor vs pil embeddings: relative L2 mean {equivalence['relative_l2_mean']:.4f} max "
          f"{equivalence['relative_l2_max']:.4f}, cosine min {equivalence['cosine_min']:.5f}")
    print(f"ovr embed (CLI)  cold {times[0]:.2f} s, warm {times[1]:.2f} s: {times[0] / times[1]:.1f}x (target >= 50x)")
    cold_step = paths_res[FeatureConfig().decode_path]["seconds"]
    print(f"embed step only  cold {cold_step:.2f} s, warm {warm_inner:.3f} s: {cold_step / warm_inner:.0f}x")
    print(f"-> {a.out}")


if __name__ == "__main__":
    main()
