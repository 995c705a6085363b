import json

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from ovr.cli import app
from ovr.errors import OvrError
from ovr.embedding.backbones import load_backbone
from ovr.embedding.cache import EmbeddingCache
from ovr.embedding.features import embed_paths
from ovr.apps.pipeline import embed_data, open_cache

from conftest import make_image

runner = CliRunner()
TINY = ["--backbone", "tiny_cnn", "--device", "cpu", "--workers", "0"]


def test_second_run_embeds_nothing_and_matches(folder, tiny_cfg):
    a = embed_data(folder, tiny_cfg)
    assert a.result.n_new == 24 and a.result.n_cached == 0
    b = embed_data(folder, tiny_cfg)
    assert b.result.n_new == 0 and b.result.n_cached == 24
    assert torch.equal(a.result.embeddings, b.result.embeddings)
    # the cache holds exactly what a fresh forward gives
    bb = load_backbone("tiny_cnn")
    x = torch.stack([bb.transform(__import__("ovr.embedding.data", fromlist=["x"]).load_image(p)) for p in a.result.paths[:3]])
    with torch.inference_mode():
        assert torch.allclose(bb.model(x), a.result.embeddings[:3], atol=1e-5)


def test_rename_is_hit_edit_is_miss(folder, tiny_cfg):
    embed_data(folder, tiny_cfg)
    src = folder / "c0" / "img000.png"
    src.rename(folder / "c0" / "renamed.png")
    make_image(folder / "c1" / "img000.png", 1, 999)  # new content at an old path
    r = embed_data(folder, tiny_cfg)
    assert r.result.n_new == 1 and r.result.n_cached == 23


def test_weights_change_the_cache_namespace(folder, tiny_cfg, tmp_path):
    bb = load_backbone("tiny_cnn")
    sd = {k: v + 0.01 for k, v in bb.model.state_dict().items()}
    save_file(sd, str(tmp_path / "w.safetensors"))
    torch.save(sd, tmp_path / "w.pth")
    other = load_backbone("tiny_cnn", str(tmp_path / "w.safetensors"))
    assert other.key != bb.key and other.fingerprint == load_backbone("tiny_cnn", str(tmp_path / "w.pth")).fingerprint
    embed_data(folder, tiny_cfg)
    r = embed_data(folder, tiny_cfg, backbone=other)
    assert r.result.n_new == 24


def test_bad_weights_file_is_an_error(tmp_path):
    (tmp_path / "bad.pth").write_bytes(b"garbage")
    with pytest.raises(OvrError, match="cannot read weights"):
        load_backbone("tiny_cnn", str(tmp_path / "bad.pth"))
    save_file({"x": torch.zeros(2)}, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(OvrError, match="do not fit"):
        load_backbone("tiny_cnn", str(tmp_path / "wrong.safetensors"))
    with pytest.raises(OvrError, match="unknown backbone"):
        load_backbone("nope")


def test_interrupted_run_keeps_shards_and_resumes(folder, tiny_cfg):
    bb = load_backbone("tiny_cnn")
    cache = open_cache(tiny_cfg, bb)
    paths = sorted(folder.rglob("*.png"))
    seen = []

    def boom(stage, done, total, **kw):
        seen.append(done)
        if stage == "embed" and done >= 8:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        embed_paths(paths, bb, cache, torch.device("cpu"), batch_size=4, workers=0, progress=boom, shard_size=4)
    fresh = EmbeddingCache(tiny_cfg.features.cache_dir, bb.key)
    assert len(fresh) == 8  # both finished batches are on disk
    r = embed_paths(paths, bb, fresh, torch.device("cpu"), batch_size=4, workers=0)
    assert r.n_new == 16 and r.n_cached == 8


def test_shard_missing_from_index_is_found(folder, tiny_cfg):
    r = embed_data(folder, tiny_cfg)
    cache = open_cache(tiny_cfg, r.backbone)
    cache._compact()
    assert (cache.dir / "index.npz").is_file()
    import numpy as np

    buf = __import__("io").BytesIO()  # an index that covers no shard, as a crash or an old writer could leave
    np.savez(buf, keys=np.empty(0, dtype="S64"), loc=np.empty((0, 2), dtype=np.uint32), shards=np.array([], dtype=str))
    (cache.dir / "index.npz").write_bytes(buf.getvalue())
    again = embed_data(folder, tiny_cfg)
    assert again.result.n_new == 0
    (cache.dir / "index.npz").write_bytes(b"garbage")  # a damaged index is a lost shortcut, not lost embeddings
    assert embed_data(folder, tiny_cfg).result.n_new == 0


def test_bad_files_skipped_with_warning_and_strict_errors(folder, cache_dir):
    (folder / "c0" / "notes.txt").write_text("not an image")
    good = (folder / "c1" / "img000.png").read_bytes()
    (folder / "c1" / "cut.png").write_bytes(good[: len(good) // 2])
    r = runner.invoke(app, ["embed", str(folder), *TINY, "--json-out", str(folder.parent / "s.json")])
    assert r.exit_code == 0, r.output
    # a non-image name is not decoded, only counted (it used to be decoded and warned about with an object repr)
    assert "notes.txt" not in r.output and "ignored 1 non-image file (.txt)" in r.output
    assert "cut.png" in r.output and "1 skipped" in r.output
    s = json.loads((folder.parent / "s.json").read_text())
    assert len(s["skipped"]) == 1 and s["usable"] == 24 and s["ignored_non_images"] == {".txt": 1}
    (folder / "c0" / "fake.png").write_text("not an image")  # an image name with other bytes is tried, and skipped
    r = runner.invoke(app, ["embed", str(folder), *TINY])
    assert "fake.png: not an image file (format not recognised)" in " ".join(r.output.split())
    assert "object at 0x" not in r.output
    r = runner.invoke(app, ["embed", str(folder), *TINY, "--strict"])
    assert r.exit_code == 2 and "cannot read image" in r.output


def test_empty_files_are_said_and_refused_contents_are_not_decoded_again(folder, cache_dir, monkeypatch):
    """A zero-byte image is "empty file" everywhere (it was torch.frombuffer's "both buffer length (0) and count
    (-1) must not be 0"), and a file that could not be decoded is remembered by content: a warm run skips it
    with the same reason without decoding it again (it was retried on every run)."""
    import ovr.embedding.pixels

    (folder / "c0" / "empty.png").write_bytes(b"")
    good = (folder / "c1" / "img000.png").read_bytes()
    (folder / "c1" / "cut.png").write_bytes(good[: len(good) // 2])
    r = runner.invoke(app, ["embed", str(folder), *TINY, "--decode", "tensor"])
    assert r.exit_code == 0, r.output
    out = " ".join(r.output.split())
    assert "empty.png: empty file" in out and "buffer length" not in out and "cut.png" in out and "2 skipped" in out
    from ovr.embedding.data import decode_image

    calls = []
    monkeypatch.setattr(ovr.embedding.pixels, "decode_image", lambda data: calls.append(len(data)) or decode_image(data))
    r2 = runner.invoke(app, ["embed", str(folder), *TINY, "--decode", "tensor"])
    assert r2.exit_code == 0 and "2 skipped" in r2.output and "24 from cache, 0 newly embedded" in r2.output
    assert calls == []  # nothing decoded: the cut file's refusal was remembered
    why = [line for line in r.output.splitlines() if "cut.png" in line]
    assert why and why[0].split("cut.png")[-1] in r2.output  # the same reason


def test_cli_embed_and_backbones(folder, cache_dir):
    r = runner.invoke(app, ["embed", str(folder), *TINY])
    assert r.exit_code == 0 and "24 newly embedded" in r.output
    r = runner.invoke(app, ["embed", str(folder), *TINY])
    assert "24 from cache, 0 newly embedded" in r.output
    r = runner.invoke(app, ["backbones"])
    assert r.exit_code == 0
    for name in ["efficientnet_lite0", "resnet18", "resnet50", "mobilenet_v3_large", "efficientnet_b0",
                 "convnext_tiny", "vit_b_16", "tiny_cnn"]:
        assert name in r.output
    # --json: the same rows for scripts (the table was the only way to ask which weights are here)
    import json

    from ovr.embedding.backbones import REGISTRY

    r = runner.invoke(app, ["backbones", "--json"])
    rows = {b["name"]: b for b in json.loads(r.stdout)["backbones"]}
    assert r.exit_code == 0 and list(rows) == list(REGISTRY)
    assert all(rows[n]["weights_available"] == REGISTRY[n].available() and rows[n]["dim"] == REGISTRY[n].dim
               for n in rows)


def test_config_file_and_flag_override(folder, cache_dir, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[features]\nbackbone = "tiny_cnn"\ndevice = "cpu"\nworkers = 0\nbatch_size = 3\n')
    r = runner.invoke(app, ["embed", str(folder), "--config", str(cfg)])
    assert r.exit_code == 0 and "tiny_cnn" in r.output
    r = runner.invoke(app, ["embed", str(folder), "--config", str(cfg), "--backbone", "nope"])
    assert r.exit_code == 2 and "unknown backbone" in r.output
    cfg.write_text("[features]\nbogus = 1\n")
    r = runner.invoke(app, ["embed", str(folder), "--config", str(cfg)])
    assert r.exit_code == 2 and "unknown key" in r.output


@pytest.mark.parametrize("flags,message", [
    (["--head", "foo"], "head must be one of linear, mlp"),
    (["--normalize", "bar"], "normalize must be one of standardize, l2"),
    (["--calibration", "x"], "calibration must be one of platt, temperature, none"),
    (["--epochs", "0"], "epochs must be at least 1"),
    (["--lr", "-1"], "lr must be positive"),
    (["--batch-size", "0"], "batch_size must be at least 1"),
])
def test_bad_settings_are_one_line_errors_before_any_work(flags, message, folder, cache_dir, tmp_path):
    r = runner.invoke(app, ["train", str(folder), "--out", str(tmp_path / "m"), "--backbone", "tiny_cnn", *flags])
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "m").exists() and not cache_dir.exists()  # refused before embedding or writing
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nl2_grid = []\n")
    r = runner.invoke(app, ["train", str(folder), "--out", str(tmp_path / "m"), "--config", str(bad)])
    assert r.exit_code == 2 and "l2_grid must hold one or more values" in r.output


@pytest.mark.parametrize("arch,dim", [("resnet18", 512), ("mobilenet_v3_large", 960)])
def test_torchvision_backbones_random_init(arch, dim, tmp_path):
    bb = load_backbone(arch, "none")
    make_image(tmp_path / "a.png", 0, 0)
    from ovr.embedding.data import load_image
    with torch.inference_mode():
        out = bb.model(bb.transform(load_image(tmp_path / "a.png"))[None])
    assert out.shape == (1, dim)


def test_torchvision_download_failure_says_how_to_pass_a_file(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # empty hub cache: forces the (offline) download path
    import socket

    def no_net(*a, **k):
        raise OSError("network is unreachable")
    monkeypatch.setattr(socket, "create_connection", no_net)
    with pytest.raises(OvrError, match="--weights FILE"):
        load_backbone("resnet18", "default")
