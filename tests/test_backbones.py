"""Any backbone a user already has: timm:NAME and torchvision:NAME with weights from a local file (no network),
through train, predict, export and serve; the cache key follows the weights and the preprocessing."""
import json
import os

import numpy as np
import pytest
import torch

from conftest import cli, make_folder

pytest.importorskip("timm")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    import timm
    import torchvision
    from safetensors.torch import save_file

    base = tmp_path_factory.mktemp("backbones")
    os.environ["OVR_CACHE_DIR"] = str(base / "cache")
    torch.manual_seed(0)
    m = timm.create_model("test_resnet", pretrained=False)  # saved with its classifier, as users' files are
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(base / "test_resnet.safetensors"))
    torch.manual_seed(1)
    m2 = timm.create_model("test_resnet", pretrained=False)
    save_file({k: v.contiguous() for k, v in m2.state_dict().items()}, str(base / "other.safetensors"))
    torch.manual_seed(0)
    torch.save(torchvision.models.mobilenet_v3_small(weights=None).state_dict(), base / "mnv3s.pth")
    return base, make_folder(base / "data", n_classes=3, per_class=10)


def test_timm_model_trains_predicts_exports_and_serves_offline(files, tmp_path):
    base, data = files
    flags = ["--backbone", "timm:test_resnet", "--weights", str(base / "test_resnet.safetensors"), "--device", "cpu",
             "--workers", "0"]
    r = cli("train", data, "--out", tmp_path / "m", *flags)
    assert r.exit_code == 0, r.output
    spec = json.loads((tmp_path / "m" / "manifest.json").read_text())["backbone"]
    assert spec["name"] == "timm:test_resnet" and spec["dim"] == 96  # measured, not typed
    assert "Resize" in spec["preprocess"] and "Normalize" in spec["preprocess"]  # from timm's pretrained config
    images = [data / f"c{k}" / "img009.png" for k in range(3)]
    r = cli("predict", tmp_path / "m", *images, "--json", "--device", "cpu")
    assert r.exit_code == 0, r.output
    classes = [json.loads(line)["class"] for line in r.stdout.splitlines()]
    assert classes == ["c0", "c1", "c2"]
    pytest.importorskip("onnxscript", reason='the export extra is not installed (pip install "ovr[export]")')
    from ovr.embedding.data import load_image
    from ovr.apps.export import onnx_session
    from ovr.apps.pipeline import Predictor

    assert cli("export", tmp_path / "m", tmp_path / "m.onnx").exit_code == 0
    sess, meta = onnx_session(tmp_path / "m.onnx")
    pred = Predictor(tmp_path / "m", "cpu")
    crops = np.stack([pred.crop(load_image(p)) for p in images])
    assert [json.loads(meta["ovr.classes"])[i] for i in sess.run(None, {"images": crops})[3]] == classes
    pytest.importorskip("fastapi", reason='the serve extra is not installed (pip install "ovr[serve]")')
    from fastapi.testclient import TestClient

    from ovr.apps.serve import create_app

    client = TestClient(create_app(tmp_path / "m", device="cpu"))
    res = client.post("/predict", files=[("files", (p.name, p.read_bytes(), "image/png")) for p in images]).json()
    assert [x["class"] for x in res["results"]] == classes


def test_torchvision_model_by_name_with_a_local_file(files, tmp_path):
    base, data = files
    r = cli("train", data, "--out", tmp_path / "m", "--backbone", "torchvision:mobilenet_v3_small", "--weights",
            str(base / "mnv3s.pth"), "--device", "cpu", "--workers", "0")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "m" / "manifest.json").read_text())["backbone"]["dim"] == 1024


def test_cache_key_follows_weights_and_preprocessing(files):
    from ovr.embedding.backbones import load_backbone

    base, _ = files
    a = load_backbone("timm:test_resnet", str(base / "test_resnet.safetensors"), None, "tensor")
    b = load_backbone("timm:test_resnet", str(base / "other.safetensors"), None, "tensor")
    c = load_backbone("timm:test_resnet", str(base / "test_resnet.safetensors"), None, "pil")
    assert len({a.key, b.key, c.key}) == 3 and a.fingerprint != b.fingerprint


@pytest.mark.parametrize("name,weights,message", [
    ("timm:no_such_model", "none", "timm has no model"),
    ("torchvision:no_such_model", "none", "torchvision has no classification model"),
    ("nope", "default", "timm:NAME or torchvision:NAME"),
])
def test_backbone_mistakes_are_one_line_errors(files, tmp_path, name, weights, message):
    _, data = files
    r = cli("embed", data, "--backbone", name, "--weights", weights, "--device", "cpu")
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output


def test_timm_default_weights_offline_say_how_to_get_them(files, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty Hugging Face cache
    _, data = files
    r = cli("embed", data, "--backbone", "timm:test_vit", "--device", "cpu")
    assert r.exit_code == 2 and "--weights FILE" in r.output and "Traceback" not in r.output


def test_bench_backbones_compares_and_recommends(files, tmp_path):
    _, data = files
    r = cli("bench", data, "--out", tmp_path / "rep", "--backbones", "tiny_cnn,timm:test_resnet", "--weights", "none",
            "--device", "cpu", "--seeds", "2")
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert [row["backbone"] for row in rep["rows"]] == ["tiny_cnn", "timm:test_resnet"]
    for row in rep["rows"]:
        assert len(row["ovr_accuracy"]["values"]) == 2 and row["images_per_s"] > 0 and row["params"] > 0
    assert rep["recommended"] in ("tiny_cnn", "timm:test_resnet") and "recommended:" in r.output
    assert (tmp_path / "rep" / "backbones.png").stat().st_size > 1000
    assert "Recommended" in (tmp_path / "rep" / "report.md").read_text()
    r = cli("bench", data, "--out", tmp_path / "rep2", "--backbones", "tiny_cnn", "--weights", "none",
            "--device", "cpu", "--seeds", "2", "--min-img-s", "1e12")
    assert r.exit_code == 0 and "none reaches" in r.output


def test_a_manifest_cannot_make_ovr_open_a_file(files, tmp_path, monkeypatch):
    """A model's manifest naming backbone weights at another path (weights=/etc/passwd was opened) is refused in
    one line until that file has been loaded with --weights on a command line; then the model works."""
    base, data = files
    monkeypatch.setenv("OVR_CACHE_DIR", str(tmp_path / "cache"))
    wfile = str(base / "test_resnet.safetensors")
    flags = ["--backbone", "timm:test_resnet", "--device", "cpu", "--workers", "0"]
    assert cli("train", data, "--out", tmp_path / "m", *flags, "--weights", wfile).exit_code == 0
    image = data / "c0" / "img009.png"
    assert cli("predict", tmp_path / "m", image, "--device", "cpu").exit_code == 0  # this cache loaded it
    m = json.loads((tmp_path / "m" / "manifest.json").read_text())
    m["backbone"]["weights"] = "/etc/hostname"
    (tmp_path / "m" / "manifest.json").write_text(json.dumps(m))
    r = cli("predict", tmp_path / "m", image, "--device", "cpu")
    assert r.exit_code == 2 and "has not loaded" in r.output and "Traceback" not in r.output
    m["backbone"]["weights"] = wfile
    (tmp_path / "m" / "manifest.json").write_text(json.dumps(m))
    monkeypatch.setenv("OVR_CACHE_DIR", str(tmp_path / "other-cache"))  # another machine's cache: not trusted yet
    r = cli("predict", tmp_path / "m", image, "--device", "cpu")
    assert r.exit_code == 2 and "ovr embed" in r.output
    assert cli("embed", data, *flags, "--weights", wfile).exit_code == 0
    assert cli("predict", tmp_path / "m", image, "--device", "cpu").exit_code == 0
