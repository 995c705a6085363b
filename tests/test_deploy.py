"""`ovr export` (ONNX parity with `ovr predict`) and `ovr serve` (the HTTP API, and its page in a real browser)."""
import io
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import LiveServer, cli, served_model

pytest.importorskip("onnxruntime", reason='the export extra is not installed (pip install "ovr[export]")')


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    base = tmp_path_factory.mktemp("deploy")
    data, extra = served_model(base)
    return base, data, extra


def _parity(model: Path, onnx_path: Path, paths: list[Path]):
    from ovr.embedding.data import load_image
    from ovr.apps.export import onnx_session, split_transform
    from ovr.apps.pipeline import Predictor

    pred = Predictor(model, "cpu")
    X, idx, _ = pred.embed(paths)
    ans = pred.model.answer(X)
    prep = split_transform(pred.backbone.transform, pred.backbone.decode)
    sess, meta = onnx_session(onnx_path)
    z, conf, cal, k = sess.run(None, {"images": np.stack([prep(load_image(p)) for p in paths])})
    assert json.loads(meta["ovr.classes"]) == pred.classes  # same label order
    assert np.abs(cal - pred.model.answer(X, calibrated=True).confidences).max() < 1e-5
    return np.abs(z - ans.logits).max(), np.abs(conf - ans.confidences).max(), k, ans


def test_export_matches_predict_and_a_grown_model_reexports(trained, tmp_path):
    base, data, extra = trained
    model = tmp_path / "m"
    shutil.copytree(base / "m", model)
    r = cli("export", model, tmp_path / "m.onnx")
    assert r.exit_code == 0 and "input images uint8" in r.output, r.output
    paths = sorted(data.rglob("*.png"))
    dz, dc, k, ans = _parity(model, tmp_path / "m.onnx", paths)
    assert dz < 1e-4 and dc < 1e-5 and (k == ans.index).all()  # measured: 1.5e-5 on logits
    # grown by add-class: the gate is in the graph too
    for c in ("c3", "c4"):
        assert cli("add-class", model, c, extra / c, "--device", "cpu").exit_code == 0
    assert cli("export", model, tmp_path / "g.onnx").exit_code == 0
    paths += sorted(extra.rglob("*.png"))
    dz, dc, k, ans = _parity(model, tmp_path / "g.onnx", paths)
    assert dz < 1e-4 and dc < 1e-5 and (k == ans.index).all()
    # the gate is in the graph: the reported confidences are the sigmoids times the gate (which moved some of
    # them), and the graph's agreed to 1e-5 above
    raw = 1 / (1 + np.exp(-ans.logits.astype(np.float64)))
    assert np.abs(ans.confidences - raw).max() > 1e-3


def test_heads_only_export_on_embeddings(trained, tmp_path):
    base, data, _ = trained
    from ovr.apps.export import onnx_session
    from ovr.apps.pipeline import Predictor

    r = cli("export", base / "m", tmp_path / "h.onnx", "--heads-only", "--json")
    assert r.exit_code == 0 and json.loads(r.output)["input"]["name"] == "embeddings"
    pred = Predictor(base / "m", "cpu")
    X, _, _ = pred.embed(sorted(data.rglob("*.png")))
    sess, meta = onnx_session(tmp_path / "h.onnx")
    z, _, _, k = sess.run(None, {"embeddings": X.numpy().astype(np.float32)})
    ans = pred.model.answer(X)
    assert np.abs(z - ans.logits).max() < 1e-4 and (k == ans.index).all()
    assert len(json.loads(meta["ovr.thresholds"])) == 3


@pytest.mark.parametrize("command,module,extra", [("export", "onnxscript", "export"), ("serve", "fastapi", "serve")])
def test_missing_extra_is_one_line(trained, tmp_path, command, module, extra):
    base, _, _ = trained
    code = (f"import sys\nsys.modules[{module!r}] = None\nfrom typer.testing import CliRunner\nfrom ovr.cli import app\n"
            f"r = CliRunner().invoke(app, sys.argv[1:])\nprint(r.exit_code)\nprint(r.output)")
    args = [command, str(base / "m")] + ([str(tmp_path / "x.onnx")] if command == "export" else [])
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
    rc, out = r.stdout.split("\n", 1)
    assert rc == "2" and f'pip install "ovr[{extra}]"' in out and out.strip().count("\n") == 0, r.stdout + r.stderr


# --- serve ------------------------------------------------------------------------------------------------

def _png(path: Path) -> bytes:
    return path.read_bytes()


def test_serve_api(trained, tmp_path):
    pytest.importorskip("fastapi", reason='the serve extra is not installed (pip install "ovr[serve]")')
    from fastapi.testclient import TestClient

    from ovr.apps.serve import create_app

    base, data, extra = trained
    model = tmp_path / "m"
    shutil.copytree(base / "m", model)
    client = TestClient(create_app(model, device="cpu", max_upload_mb=0.05))
    assert client.get("/health").json()["classes"] == 3
    assert [c["name"] for c in client.get("/classes").json()] == ["c0", "c1", "c2"]
    assert "<input id=\"files\"" in client.get("/").text and client.get("/openapi.json").status_code == 200
    files = [("files", (f"c{k}.png", _png(data / f"c{k}" / "img009.png"), "image/png")) for k in range(3)]
    r = client.post("/predict?top_k=2", files=files)
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    assert [x["input"] for x in res] == ["c0.png", "c1.png", "c2.png"]
    assert [x["class"] for x in res] == ["c0", "c1", "c2"] and all(len(x["top"]) == 2 for x in res)
    assert all(set(x) >= {"class", "confidence", "top", "labels", "unknown"} for x in res)
    # a corrupt upload: its own error entry, and the server goes on serving
    r = client.post("/predict", files=[("files", ("bad.png", b"not an image", "image/png"))])
    assert r.status_code == 200 and r.json()["results"][0]["input"] == "bad.png"
    assert "cannot read image" in r.json()["results"][0]["error"]
    # over the size limit: 413
    big = io.BytesIO()
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8)).save(big, "PNG")
    r = client.post("/predict", files=[("files", ("big.png", big.getvalue(), "image/png"))])
    assert r.status_code == 413
    assert client.post("/predict", files=files[:1]).json()["results"][0]["class"] == "c0"
    health = client.get("/health").json()
    # the warm-up's pass, then two requests; the unreadable file and the 413 never reached the backbone
    assert health["ready"] and health["forward_passes"] == 3 and health["images_embedded"] == 5
    # grow the model on disk, reload: the new class is served, the old ones still answer
    assert cli("add-class", model, "c3", extra / "c3", "--device", "cpu").exit_code == 0
    assert client.post("/reload").json()["classes"] == ["c0", "c1", "c2", "c3"]
    r = client.post("/predict", files=[files[0], ("files", ("n.png", _png(extra / "c3" / "img009.png"), "image/png"))])
    assert [x["class"] for x in r.json()["results"]] == ["c0", "c3"]


def test_concurrent_requests_share_a_forward_pass(trained):
    """Three requests queued while the backbone is busy go through it in one pass, each gets its own rows (the
    same as embedding its images alone), and a request held by an older Predictor (before a /reload) is kept
    apart. max_batch=1 gives one pass per request."""
    from ovr.embedding.data import load_image
    from ovr.apps.pipeline import Predictor
    from ovr.apps.serve import Batcher

    base, data, _ = trained
    pred, older = Predictor(base / "m", "cpu"), Predictor(base / "m", "cpu")
    older._backbone = pred.backbone
    requests = [[load_image(data / f"c{k}" / f"img00{i}.png") for i in range(k + 1)] for k in range(3)]
    alone = [pred.embed(ims)[0] for ims in requests]

    def queue_while_busy(b: Batcher, jobs):
        out = [None] * len(jobs)
        with b.cv:
            b.busy = True  # as if a pass were running: the requests below must wait for the next one
        threads = [threading.Thread(target=lambda i=i, p=p, ims=ims: out.__setitem__(i, b.embed(p, ims)))
                   for i, (p, ims) in enumerate(jobs)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while len(b.queue) < len(jobs) and time.monotonic() < deadline:
            time.sleep(0.01)
        with b.cv:
            b.busy = False
            b.cv.notify_all()
        for t in threads:
            t.join(30)
        return out

    b = Batcher()
    out = queue_while_busy(b, [(pred, ims) for ims in requests])
    assert b.passes == 1 and b.images == 6
    for X, ref in zip(out, alone):
        assert X.shape == ref.shape and np.allclose(X.numpy(), ref.numpy(), atol=1e-5)
    b = Batcher()
    queue_while_busy(b, [(pred, requests[0]), (older, requests[1]), (pred, requests[2])])
    assert b.passes == 2  # the two requests on `pred` together, the older Predictor's alone
    b = Batcher(max_batch=1)
    queue_while_busy(b, [(pred, ims) for ims in requests])
    assert b.passes == 3


def test_page_in_a_real_browser(trained, tmp_path):
    """Headless Chromium opens the page, chooses an image, and reads the answer the page shows."""
    pytest.importorskip("fastapi", reason='the serve extra is not installed (pip install "ovr[serve]")')
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_bin = shutil.which("chromedriver")
    if not (browser and driver_bin):
        pytest.skip("no Chromium + chromedriver on this machine (apt-get install chromium chromium-driver)")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    base, data, _ = trained
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        opts.add_argument(a)
    from selenium.webdriver.chrome.service import Service

    drv = None
    with LiveServer(base / "m") as live:
        try:
            drv = webdriver.Chrome(service=Service(driver_bin), options=opts)
            drv.get(f"http://{live.url}/")
            WebDriverWait(drv, 30).until(EC.text_to_be_present_in_element((By.ID, "meta"), "3 classes"))
            drv.find_element(By.ID, "files").send_keys(str(data / "c1" / "img009.png"))
            ans = WebDriverWait(drv, 60).until(EC.presence_of_element_located((By.CSS_SELECTOR, ".answer")))
            assert ans.get_attribute("data-class") == "c1" and ans.text.startswith("c1 (")
            assert len(drv.find_elements(By.CSS_SELECTOR, ".bar")) == 3  # a bar per class
            # a mixed upload (good, corrupt, empty, not an image): every good image answered, each bad one its error,
            # and nothing left over from the previous request
            bad = tmp_path / "bad"
            bad.mkdir()
            (bad / "corrupt.png").write_bytes((data / "c0" / "img009.png").read_bytes()[:60])
            (bad / "empty.png").write_bytes(b"")
            (bad / "notes.txt").write_text("not an image")
            picks = [data / "c2" / "img009.png", bad / "corrupt.png", bad / "empty.png", bad / "notes.txt",
                     data / "c0" / "img009.png"]
            chooser = drv.find_element(By.ID, "files")
            drv.execute_script("arguments[0].value = ''", chooser)  # chromedriver adds to a multiple input's files
            chooser.send_keys("\n".join(str(p) for p in picks))
            WebDriverWait(drv, 60).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".result")) == 5
                                         and d.find_elements(By.CSS_SELECTOR, ".answer")[0].text.startswith("c2"))
            answers = [a.text for a in drv.find_elements(By.CSS_SELECTOR, ".answer")]
            assert answers[0].startswith("c2 (") and answers[4].startswith("c0 (")
            assert answers[2] == "error: empty file" and all(a.startswith("error: ") for a in answers[1:4])
        finally:
            if drv is not None:
                drv.quit()


@pytest.mark.slow
def test_export_parity_on_the_pretrained_backbone(tmp_path):
    """EfficientNet-Lite0 (the default backbone) through torch.onnx: the same logits as `ovr predict`."""
    from sklearn.datasets import load_sample_images

    from PIL import Image

    rng = np.random.default_rng(0)
    for k, img in enumerate(load_sample_images().images):
        for i in range(8):
            y, x = rng.integers(0, 200, 2)
            Image.fromarray(img[y:y + 200, x:x + 200]).save((tmp_path / "d" / f"p{k}").mkdir(parents=True, exist_ok=True)
                                                            or tmp_path / "d" / f"p{k}" / f"{i}.jpg")
    assert cli("train", tmp_path / "d", "--out", tmp_path / "m", "--device", "cpu").exit_code == 0
    assert cli("export", tmp_path / "m", tmp_path / "m.onnx").exit_code == 0
    dz, dc, k, ans = _parity(tmp_path / "m", tmp_path / "m.onnx", sorted((tmp_path / "d").rglob("*.jpg")))
    print(f"lite0 max |logit difference| {dz:.2e}")
    assert dz < 1e-4 and (k == ans.index).all()


def _check_rules(row: dict, thresholds: dict[str, float] | None = None) -> None:
    """The issue's four rules on one answered row: the answer is the top class (or unknown), top is sorted, the
    runner-up is the second, and with thresholds the answered class passes its own threshold."""
    top = row["top"]
    conf = [t["confidence"] for t in top]
    assert conf == sorted(conf, reverse=True), row
    assert row["runner_up"]["class"] == top[1]["class"] and row["runner_up"]["confidence"] == conf[1], row
    assert row["confidence"] == conf[0], row
    assert row["class"] in (top[0]["class"], "unknown"), row
    if thresholds is not None and row["class"] != "unknown":
        assert row["confidence"] >= thresholds[row["class"]], row


@pytest.mark.parametrize("flags", [[], ["--calibrated"], ["--thresholds", "--calibrated"], ["--thresholds"]])
def test_answers_follow_the_confidences_on_a_grown_and_shrunk_model_everywhere(trained, tmp_path, flags):
    """A model grown by two add-class and shrunk by one remove-class (by the CLI), asked through the CLI, the Python
    API, `ovr serve` and the exported graph: the same answers, and each one the class with the top confidence."""
    base, data, extra = trained
    model = tmp_path / "m"
    shutil.copytree(base / "m", model)
    for c in ("c3", "c4"):
        assert cli("add-class", model, c, extra / c, "--device", "cpu").exit_code == 0
    assert cli("remove-class", model, "c1").exit_code == 0
    paths = sorted(data.rglob("*.png")) + sorted(extra.rglob("*.png"))
    r = cli("predict", model, *paths, "--top-k", "4", "--json", "--device", "cpu", *flags)
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in r.output.splitlines() if line.startswith("{")]
    from ovr.config import AnswerOptions
    from ovr.apps.pipeline import Predictor

    pred = Predictor(model, "cpu")
    opts = AnswerOptions(top_k=4, calibrated="--calibrated" in flags, thresholds="--thresholds" in flags)
    api = pred.predict(paths, opts)
    ans = pred.model.answer(pred.embed(paths)[0], opts)
    thr = dict(zip(pred.classes, ans.thresholds.tolist())) if opts.thresholds else None
    assert len(rows) == len(api) == len(paths)
    for cli_row, api_row in zip(rows, api):
        _check_rules(cli_row, thr)
        assert cli_row["class"] == api_row["class"] and abs(cli_row["confidence"] - api_row["confidence"]) < 1e-9
    from fastapi.testclient import TestClient

    from ovr.apps.serve import create_app

    client = TestClient(create_app(model, device="cpu"))
    files = [("files", (p.name, p.read_bytes(), "image/png")) for p in paths[:12]]
    params = {"top_k": 4, "calibrated": opts.calibrated, "thresholds": opts.thresholds}
    served = client.post("/predict", files=files, params=params).json()["results"]
    for s_row, api_row in zip(served, api):
        _check_rules(s_row, thr)
        assert s_row["class"] == api_row["class"]
    if not opts.thresholds:  # the graph answers without thresholds, raw (class_index) as ovr predict by default
        assert cli("export", model, tmp_path / "g.onnx").exit_code == 0
        _, _, k, plain = _parity(model, tmp_path / "g.onnx", paths)
        assert (k == plain.index).all() and (k == plain.confidences.argmax(1)).all()
