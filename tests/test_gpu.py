"""The CUDA path, where there is a GPU (skipped on CPU-only machines; every other test runs on the CPU)."""
import numpy as np
import pytest
import torch

from conftest import make_folder, make_image

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]


def test_cuda_embeddings_and_heads_match_cpu(tmp_path, cache_dir):
    from ovr.config import load_config
    from ovr.learn.estimators import OvRClassifier
    from ovr.apps.pipeline import embed_data

    data = make_folder(tmp_path / "d", n_classes=3, per_class=10)
    cpu = embed_data(data, load_config(None, {"backbone": "tiny_cnn", "device": "cpu", "workers": 0,
                                              "cache_dir": str(tmp_path / "c1")}))
    gpu = embed_data(data, load_config(None, {"backbone": "tiny_cnn", "device": "cuda", "workers": 0,
                                              "cache_dir": str(tmp_path / "c2")}))
    assert gpu.result.embeddings.device.type == "cuda"
    # fp16 autocast on CUDA: close, not equal
    assert torch.allclose(gpu.result.embeddings.cpu(), cpu.result.embeddings, atol=5e-2, rtol=5e-2)
    X, y, _ = gpu.split("train")
    m = OvRClassifier(device="cuda").fit(X.cpu().numpy(), y.numpy())
    ref = OvRClassifier(device="cpu").fit(X.cpu().numpy(), y.numpy())
    assert m.model_.heads["0"]["weight"].device.type == "cpu"  # stored heads always come back to the CPU
    assert (m.predict(X.cpu().numpy()) == ref.predict(X.cpu().numpy())).mean() >= 0.95
    assert (m.predict(X.cpu().numpy()) == y.numpy()).mean() > 0.8
    assert np.isfinite(m.decision_function(X.cpu().numpy())).all()


def test_cuda_train_add_class_refresh_predict(tmp_path):
    """The model path on CUDA (standardisation statistics on the GPU, heads folded and saved from it) answers as
    well as the CPU path (not bit for bit: CUDA embeds in fp16)."""
    from ovr.config import load_config
    from ovr.apps.pipeline import Predictor, add_class, model_config, refresh, train_model

    data = make_folder(tmp_path / "d", n_classes=3, per_class=10)
    new = make_folder(tmp_path / "n", n_classes=4, per_class=10) / "c3"
    probe = sorted((tmp_path / "n").rglob("*.png"))

    def grow(device: str) -> list[str]:
        cache = str(tmp_path / f"cache-{device}")
        cfg = load_config(None, {"backbone": "tiny_cnn", "device": device, "workers": 0, "cache_dir": cache})
        train_model(data, tmp_path / device, cfg)
        mcfg = model_config(tmp_path / device, device=device, cache_dir=cache)
        add_class(tmp_path / device, "c3", [str(new)], mcfg)
        refresh(tmp_path / device, ["c0"], mcfg)
        rows = Predictor(tmp_path / device, device, cache).predict(probe)
        assert all(np.isfinite(r["confidence"]) for r in rows)
        return [r["class"] for r in rows]

    truth = [p.parent.name for p in probe]
    for answers in (grow("cuda"), grow("cpu")):
        assert np.mean([a == t for a, t in zip(answers, truth)]) >= 0.8


def test_cuda_tensor_decode_matches_the_cpu_paths(tmp_path):
    """nvJPEG in batches plus resize on the GPU: the inputs are within a few gray levels of the CPU tensor path
    (nvJPEG's IDCT and the GPU resize round differently), and a file nvJPEG refuses is reported, not fatal."""
    import io

    from PIL import Image

    from ovr.embedding.backbones import load_backbone

    bb = load_backbone("tiny_cnn", decode="tensor")
    gpu, cpu = bb.pixels("cuda"), bb.pixels("cpu")
    files = []
    for i in range(6):
        p = tmp_path / f"{i}.png"
        make_image(p, i % 3, i, size=64)
        b = io.BytesIO()
        Image.open(p).convert("RGB").save(b, "JPEG", quality=92)
        files.append(b.getvalue())
    broken = files[0][: len(files[0]) // 2] + b"\xff\xd8\xff\xd8" + files[0][len(files[0]) // 2 + 4:]
    items = [gpu.item(f) for f in files] + [gpu.item(broken)]
    assert all(x.ndim == 1 for x in items)  # plain JPEGs leave the workers as bytes
    x, bad = gpu.batch(items)
    ref, _ = cpu.batch([cpu.item(f) for f in files])
    assert x.device.type == "cuda" and [i for i, _ in bad] == [6]
    assert float((x.cpu() - ref).abs().max()) * 0.5 * 255 <= 4.01
