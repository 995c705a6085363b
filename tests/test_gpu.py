"""The CUDA path, where there is a GPU (skipped on CPU-only machines; every other test runs on the CPU)."""
import numpy as np
import pytest
import torch

from conftest import make_folder

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]


def test_cuda_embeddings_and_heads_match_cpu(tmp_path, cache_dir):
    from ovr.config import load_config
    from ovr.heads import OvRClassifier
    from ovr.pipeline import embed_data

    data = make_folder(tmp_path / "d", n_classes=3, per_class=10)
    cpu = embed_data(data, load_config(None, {"backbone": "tiny_cnn", "device": "cpu", "workers": 0,
                                              "cache_dir": str(tmp_path / "c1")}))
    gpu = embed_data(data, load_config(None, {"backbone": "tiny_cnn", "device": "cuda", "workers": 0,
                                              "cache_dir": str(tmp_path / "c2")}))
    assert gpu.result.embeddings.device.type == "cuda"
    # fp16 autocast on CUDA: close, not equal
    assert torch.allclose(gpu.result.embeddings.cpu(), cpu.result.embeddings, atol=5e-2, rtol=5e-2)
    X, y, _ = gpu.split("train")
    m = OvRClassifier(device="cuda", epochs=10).fit(X, y.numpy())
    assert (m.predict(X) == y.numpy()).mean() > 0.8
    assert np.isfinite(m.decision_function(X)).all()
