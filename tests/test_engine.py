"""The backbone's engines (ovr.embedding.engine): torch and onnxruntime give the same embeddings and answers, share the
cache, export the graph once per backbone identity, and say in one line what is wrong."""
import json

import pytest
import torch

from conftest import TINY, cli, make_folder

pytest.importorskip("onnxruntime", reason='the onnxruntime engine needs the export extra (pip install "ovr[export]")')


def _cfg(cache, engine):
    from ovr.config import load_config

    return load_config(None, {"backbone": "tiny_cnn", "device": "cpu", "workers": 0, "cache_dir": str(cache),
                              "engine": engine})


def test_engines_agree_and_share_the_cache(tmp_path):
    from ovr.embedding.engine import TOLERANCE, graph_path
    from ovr.apps.pipeline import embed_data

    data = make_folder(tmp_path / "data", n_classes=3, per_class=6)
    apart = {}
    for engine in ("torch", "onnxruntime"):  # each on its own cache: both really embed
        emb = embed_data(data, _cfg(tmp_path / f"cache-{engine}", engine))
        assert emb.backbone.engine == engine and emb.result.n_new == 18
        apart[engine] = emb.result.embeddings
    A, B = apart["torch"], apart["onnxruntime"]
    assert (A - B).abs().max() / A.abs().max() < TOLERANCE
    # the onnxruntime engine on the torch engine's cache: every row is reused, nothing embedded again
    shared = embed_data(data, _cfg(tmp_path / "cache-torch", "onnxruntime"))
    assert shared.result.n_new == 0 and torch.equal(shared.result.embeddings, A)
    # the graph is exported once per backbone identity, into the cache folder
    path = graph_path(tmp_path / "cache-onnxruntime", shared.backbone)
    stamp = path.stat().st_mtime_ns
    (data / "c0" / "new.png").write_bytes((data / "c1" / "img000.png").read_bytes()[:-1] + b"\x00")
    again = embed_data(data, _cfg(tmp_path / "cache-onnxruntime", "onnxruntime"))
    assert again.result.n_new == 1 and path.stat().st_mtime_ns == stamp


def test_both_engines_answer_alike_through_the_cli_and_the_engine_is_recorded(tmp_path, monkeypatch):
    data = make_folder(tmp_path / "data", n_classes=3, per_class=10)
    monkeypatch.setenv("OVR_CACHE_DIR", str(tmp_path / "cache"))
    assert cli("train", data, "--out", tmp_path / "m", *TINY, "--engine", "onnxruntime").exit_code == 0
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert manifest["backbone"]["engine"] == "onnxruntime"
    images = [data / f"c{k}" / "img009.png" for k in range(3)]
    answers = {}
    for engine in ("torch", "onnxruntime"):
        monkeypatch.setenv("OVR_CACHE_DIR", str(tmp_path / f"fresh-{engine}"))  # no cached rows: each embeds
        r = cli("predict", tmp_path / "m", *images, "--json", "--device", "cpu", "--engine", engine)
        assert r.exit_code == 0, r.output
        answers[engine] = [json.loads(line) for line in r.stdout.splitlines()]
    assert [a["class"] for a in answers["torch"]] == [a["class"] for a in answers["onnxruntime"]] == ["c0", "c1", "c2"]
    for a, b in zip(answers["torch"], answers["onnxruntime"]):
        assert abs(a["confidence"] - b["confidence"]) < 1e-4


def test_engine_mistakes_are_one_line_errors(tmp_path):
    from ovr.embedding.engine import resolve_engine
    from ovr.errors import OvrError

    with pytest.raises(OvrError, match="engine must be one of"):
        resolve_engine("tensorrt", torch.device("cpu"))
    with pytest.raises(OvrError, match="runs on the CPU"):
        resolve_engine("onnxruntime", torch.device("cuda"))
    assert resolve_engine("auto", torch.device("cuda")) == "torch"
    assert resolve_engine("auto", torch.device("cpu")) == "onnxruntime"  # installed here
    r = cli("embed", make_folder(tmp_path / "d", 2, 2), "--backbone", "tiny_cnn", "--engine", "tvm")
    assert r.exit_code == 2 and "engine must be one of" in r.output and "Traceback" not in r.output


def test_onnxruntime_engine_never_builds_the_network_once_its_graph_exists(tmp_path):
    """The preprocessing is saved beside the graph: a later process embeds new images without building the torch
    network (most of a one-image predict's time), with the same embeddings."""
    from ovr.embedding.backbones import load_backbone
    from ovr.embedding.cache import EmbeddingCache
    from ovr.embedding.engine import attach
    from ovr.embedding.features import embed_paths

    data = make_folder(tmp_path / "data", n_classes=2, per_class=3)
    paths = sorted(data.rglob("*.png"))
    first = load_backbone("tiny_cnn", "default", tmp_path / "cache", "tensor")
    attach(first, "torch", torch.device("cpu"), tmp_path / "cache")
    ref = embed_paths(paths, first, EmbeddingCache(tmp_path / "ref", first.key), torch.device("cpu"), workers=0)
    warm = load_backbone("tiny_cnn", "default", tmp_path / "cache", "tensor")
    attach(warm, "onnxruntime", torch.device("cpu"), tmp_path / "cache")
    embed_paths(paths[:1], warm, EmbeddingCache(tmp_path / "c1", warm.key), torch.device("cpu"), workers=0)  # exports
    later = load_backbone("tiny_cnn", "default", tmp_path / "cache", "tensor")  # a new process, as it were
    attach(later, "onnxruntime", torch.device("cpu"), tmp_path / "cache")
    r = embed_paths(paths, later, EmbeddingCache(tmp_path / "c2", later.key), torch.device("cpu"), workers=0)
    assert later._built is None and r.n_new == len(paths)
    assert (r.embeddings - ref.embeddings).abs().max() < 1e-4 * ref.embeddings.abs().max()


def _predict_in_a_fresh_process(*args, env):
    """`ovr predict ... --json` in a new interpreter: (rows, whether torch was imported)."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "ovr", "predict", *map(str, args), "--json"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time")}
    return [json.loads(line) for line in r.stdout.splitlines()], "torch" in imported


def test_predict_without_torch_gives_the_torch_paths_answers_and_never_a_stale_model(tmp_path):
    """Once the backbone's graph and the model's answer graph (per options) are in the cache, a fresh `ovr predict`
    imports no torch and answers as the torch path did; after add-class the old answer graph is not used."""
    import os

    data = make_folder(tmp_path / "data", n_classes=3, per_class=10)
    env = {**os.environ, "OVR_CACHE_DIR": str(tmp_path / "cache")}
    os.environ["OVR_CACHE_DIR"] = env["OVR_CACHE_DIR"]
    try:
        assert cli("train", data, "--out", tmp_path / "m", *TINY).exit_code == 0
        images = [data / f"c{k}" / "img009.png" for k in range(3)] + [tmp_path / "bad.png"]
        (tmp_path / "bad.png").write_bytes(b"not an image")
        for flags in ([], ["--top-k", "3", "--thresholds", "--calibrated", "--multilabel"]):
            slow, torch_used = _predict_in_a_fresh_process(tmp_path / "m", *images, *flags, env=env)
            assert torch_used  # the first time: the torch path, which leaves the answer graph behind
            fast, torch_used = _predict_in_a_fresh_process(tmp_path / "m", *images, *flags, env=env)
            assert not torch_used
            assert [r.get("class") for r in fast] == [r.get("class") for r in slow] == ["c0", "c1", "c2", None]
            assert fast[3]["error"] == slow[3]["error"]
            for a, b in zip(slow[:3], fast[:3]):
                assert a.keys() == b.keys() and [t["class"] for t in a["top"]] == [t["class"] for t in b["top"]]
                assert abs(a["confidence"] - b["confidence"]) < 1e-4 and a.get("labels") == b.get("labels")
        new = make_folder(tmp_path / "new", n_classes=4, per_class=10)
        assert cli("add-class", tmp_path / "m", "c3", new / "c3", "--device", "cpu").exit_code == 0
        rows, torch_used = _predict_in_a_fresh_process(tmp_path / "m", new / "c3" / "img009.png", "--top-k", "4",
                                                       env=env)
        assert torch_used and "c3" in [t["class"] for t in rows[0]["top"]]
    finally:
        os.environ.pop("OVR_CACHE_DIR", None)


def test_answer_graphs_are_pruned_to_the_newest(tmp_path):
    import os

    from ovr.apps.quick import prune_answer_graphs

    for i in range(7):
        (tmp_path / f"{i}.onnx").write_bytes(b"x")
        os.utime(tmp_path / f"{i}.onnx", (1000 + i, 1000 + i))
    (tmp_path / "other.json").write_text("{}")
    prune_answer_graphs(tmp_path, keep=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["4.onnx", "5.onnx", "6.onnx", "other.json"]


def test_frequent_batch_sizes_run_on_sessions_with_that_size_fixed(tmp_path):
    """onnxruntime folds a graph's shape arithmetic only where every dimension is known: a batch size met twice
    gets a session with the batch fixed, at most FIXED of them (a server's varying sizes share the free-batch
    session); every session gives the free graph's embeddings."""
    import numpy as np
    import onnxruntime as ort

    from ovr.embedding.backbones import load_backbone
    from ovr.embedding.engine import BATCH_DIM, OrtForward, attach, session

    bb = load_backbone("tiny_cnn", "default", tmp_path / "cache", "tensor")
    attach(bb, "onnxruntime", torch.device("cpu"), tmp_path / "cache")
    fwd = session(bb)
    dynamic = ort.InferenceSession(str(fwd.path), providers=["CPUExecutionProvider"])
    assert dynamic.get_inputs()[0].shape[0] == BATCH_DIM  # the free dimension the sessions fix
    x = torch.randn(9, *dynamic.get_inputs()[0].shape[1:])
    ref = dynamic.run(None, {"pixels": x.numpy()})[0]
    assert fwd.session_for(7) is fwd.free and fwd.free.get_inputs()[0].shape[0] == BATCH_DIM  # met once
    fixed = fwd.session_for(7)  # met twice
    assert fixed is not fwd.free and fixed.get_inputs()[0].shape[0] == 7 and fwd.session_for(7) is fixed
    for b in range(1, 10):  # every size twice: only FIXED sizes in all get their own session
        for _ in range(2):
            assert np.allclose(fwd(x[:b]).numpy(), ref[:b], atol=1e-5)
    assert len(fwd.fixed) == OrtForward.FIXED and 7 in fwd.fixed
    assert all(fwd.fixed[b].get_inputs()[0].shape[0] == b for b in fwd.fixed)
