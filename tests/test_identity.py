"""A warm `ovr embed` (every image cached) answers without importing torch, exactly as the full path would; any
doubt (a new image, other weights, another decode path, torchrun, a possible GPU) sends it down the full path."""
import json
import os
import subprocess
import sys

import pytest

from conftest import make_folder, make_image

PROBE = """
import sys
from ovr.cli import main
sys.argv = ["ovr"] + sys.argv[1:]
try:
    main()
except SystemExit:
    pass
print("TORCH_IMPORTED" if "torch" in sys.modules else "NO_TORCH")
"""


def _embed(data, cache, out, *extra):
    env = {**os.environ, "OVR_CACHE_DIR": str(cache)}
    r = subprocess.run([sys.executable, "-c", PROBE, "embed", str(data), "--backbone", "tiny_cnn", "--device", "cpu",
                        "--workers", "0", "--json-out", str(out), *extra], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(out.read_text()), r.stdout.strip().splitlines()[-1]


def test_warm_embed_imports_no_torch_and_reports_what_the_full_path_does(tmp_path):
    data = make_folder(tmp_path / "d", n_classes=3, per_class=4)
    (data / "c0" / "notes.txt").write_text("not an image")
    cold, imported = _embed(data, tmp_path / "c", tmp_path / "cold.json")
    assert imported == "TORCH_IMPORTED" and cold["embedded"] == 12
    warm, imported = _embed(data, tmp_path / "c", tmp_path / "warm.json")
    assert imported == "NO_TORCH" and warm["cached"] == 12 and warm["embedded"] == 0
    for k in ("cached", "embedded", "seconds"):
        cold.pop(k), warm.pop(k)
    assert warm == cold  # classes, splits, counts, ignored files, backbone spec, dim

    make_image(data / "c1" / "new.png", 1, 99)  # one new image: the full path, which embeds just it
    again, imported = _embed(data, tmp_path / "c", tmp_path / "again.json")
    assert imported == "TORCH_IMPORTED" and again["embedded"] == 1 and again["cached"] == 12
    pil, _ = _embed(data, tmp_path / "c", tmp_path / "p.json", "--decode", "pil")  # its own namespace
    assert pil["embedded"] == 13


def test_all_cached_steps_aside_when_unsure(tmp_path, monkeypatch):
    import torch

    from ovr.embedding.backbones import load_backbone
    from ovr.embedding.cache import EmbeddingCache
    from ovr.config import FeatureConfig
    from ovr.embedding.data import scan_folder
    from ovr.embedding.features import embed_paths
    from ovr.embedding.identity import all_cached

    data = make_folder(tmp_path / "d", n_classes=2, per_class=3)
    paths = scan_folder(data).paths
    weights = tmp_path / "w.safetensors"
    from safetensors.torch import save_file

    save_file(load_backbone("tiny_cnn").model.state_dict(), str(weights))
    bb = load_backbone("tiny_cnn", str(weights), tmp_path / "c")  # remembers its identity
    embed_paths(paths, bb, EmbeddingCache(tmp_path / "c", bb.key), torch.device("cpu"), workers=0)
    f = FeatureConfig(backbone="tiny_cnn", weights=str(weights), device="cpu", cache_dir=str(tmp_path / "c"))
    hit = all_cached(paths, f)
    assert hit is not None and hit.n_cached == 6 and hit.spec == bb.spec()
    assert all_cached(paths, FeatureConfig(**{**f.__dict__, "decode": "pil"})) is None  # not in that namespace
    assert all_cached(paths, FeatureConfig(**{**f.__dict__, "device": "auto"})) is not None  # same namespace
    assert all_cached(paths, FeatureConfig(**{**f.__dict__, "device": "cuda"})) is None  # torch must say
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert all_cached(paths, f) is None  # torchrun: every rank must reach the barrier
    monkeypatch.delenv("WORLD_SIZE")
    os.utime(weights, ns=(1, 1))  # the weights file changed: its identity is unknown until torch fingerprints it
    assert all_cached(paths, f) is None


@pytest.mark.parametrize("broken", ["not json", "[1, 2]", '{"x": {"dim": 1}}'])
def test_a_damaged_identity_memo_is_only_a_lost_shortcut(tmp_path, broken):
    from ovr.embedding.backbones import load_backbone

    (tmp_path / "backbones.json").write_text(broken)
    bb = load_backbone("tiny_cnn", memo_dir=tmp_path)
    assert bb.dim == 64 and json.loads((tmp_path / "backbones.json").read_text())  # rewritten, usable
    assert load_backbone("tiny_cnn", memo_dir=tmp_path).fingerprint == bb.fingerprint
