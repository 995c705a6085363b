"""The README's Python examples run as written (in a folder holding the files they name; the served example's
address is the test server's)."""
import contextlib
import io
import os
import re
import shutil
from pathlib import Path

import pytest

from conftest import TINY, LiveServer, cli, make_folder

README = Path(__file__).parent.parent / "README.md"


def blocks(marker: str) -> list[str]:
    found = [b for b in re.findall(r"```python\n(.*?)```", README.read_text(), re.S) if marker in b]
    assert found, f"no python block with {marker!r} in the README"
    return found


def run_block(code: str, cwd: Path) -> str:
    out = io.StringIO()
    old = Path.cwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(code, "README.md", "exec"), {"__name__": "__readme__"})
    finally:
        os.chdir(old)
    return out.getvalue()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    base = tmp_path_factory.mktemp("readme")
    os.environ["OVR_CACHE_DIR"] = str(base / "cache")
    data = make_folder(base / "data", n_classes=3, per_class=10)
    (data / "c0").rename(data / "cat")
    assert cli("train", data, "--out", base / "m", *TINY).exit_code == 0
    return base, data


@pytest.mark.slow
def test_python_api_example(tmp_path, monkeypatch):
    monkeypatch.setenv("OVR_CACHE_DIR", str(tmp_path / "cache"))
    (code,) = blocks("ovr.embed(")
    out = run_block(code, tmp_path)
    name, *_, score = out.split()
    assert name in {"digit_0", "digit_1", "digit_2"} and float(score) > 0.9


def test_onnxruntime_example(model, tmp_path):
    pytest.importorskip("onnxscript", reason='the export extra is not installed (pip install "ovr[export]")')
    base, data = model
    assert cli("export", base / "m", tmp_path / "model.onnx").exit_code == 0
    shutil.copy(data / "c1" / "img009.png", tmp_path / "a.png")
    (code,) = blocks("onnxruntime")
    out = run_block(code, tmp_path).split()
    assert out[0] == "c1" and 0.5 < float(out[1]) <= 1


def test_tritonclient_example(model, tmp_path):
    pytest.importorskip("tritonclient.http", reason="tritonclient[http] is not installed")
    pytest.importorskip("fastapi", reason='the serve extra is not installed (pip install "ovr[serve]")')
    base, data = model
    shutil.copy(data / "cat" / "img009.png", tmp_path / "cat.jpg")
    (code,) = blocks("tritonclient")
    with LiveServer(base / "m", model_name="shapes") as live:
        import time

        import tritonclient.http as http

        client = http.InferenceServerClient(live.url)
        for _ in range(200):
            if client.is_server_ready():
                break
            time.sleep(0.05)
        out = run_block(code.replace("127.0.0.1:8000", live.url), tmp_path)
    assert out.strip() == "[b'cat']"
