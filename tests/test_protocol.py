"""`ovr serve` speaks the Open Inference Protocol (KServe v2 REST): the codec alone, then a live server called with
tritonclient's HTTP client (a client nobody here wrote) in binary and JSON modes, on a plain and a grown model;
mixed uploads on /predict; bodies over the limit, chunked or not."""
import json
import shutil
import struct
import time

import numpy as np
import pytest

from conftest import LiveServer, cli, served_model

pytest.importorskip("fastapi", reason='the serve extra is not installed (pip install "ovr[serve]")')


# --- the codec -------------------------------------------------------------------------------------------------

def test_binary_and_json_requests_parse_to_the_same_tensors():
    from ovr.apps.protocol import parse_request, serialize_bytes

    blobs = [b"\x89PNG\x00\xff", b"", b"jpeg bytes"]
    raw = serialize_bytes(blobs)
    head = json.dumps({"id": "r1", "inputs": [{"name": "images", "datatype": "BYTES", "shape": [3, 1],
                                               "parameters": {"binary_data_size": len(raw)}}],
                       "parameters": {"binary_data_output": True}}).encode()
    req = parse_request(head + raw, str(len(head)))
    assert req.id == "r1" and req.binary_output and req.outputs is None
    assert req.inputs[0].data.shape == (3, 1) and list(req.inputs[0].data[:, 0]) == blobs
    crops = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    as_json = json.dumps({"inputs": [{"name": "crops", "datatype": "UINT8", "shape": [2, 4, 4, 3],
                                      "data": crops.tolist()}]}).encode()
    assert np.array_equal(parse_request(as_json, None).inputs[0].data, crops)
    head = json.dumps({"inputs": [{"name": "crops", "datatype": "UINT8", "shape": [2, 4, 4, 3],
                                   "parameters": {"binary_data_size": crops.nbytes}}]}).encode()
    assert np.array_equal(parse_request(head + crops.tobytes(), str(len(head))).inputs[0].data, crops)


_HEAD = b'{"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 9}}]}'


@pytest.mark.parametrize("body,header,message", [
    (b"not json", None, "not JSON"),
    (b'{"inputs": []}', None, "inputs"),
    (b'{"inputs": [{"name": "x", "datatype": "UINT8", "shape": [2, 2], "data": [1, 2, 3]}]}', None, "3 elements"),
    (b'{"inputs": [{"name": "x", "datatype": "UINT8", "shape": [-1], "data": [1]}]}', None, "shape"),
    (b'{"inputs": [{"name": "x", "datatype": "BF17", "shape": [1], "data": [1]}]}', None, "unsupported datatype"),
    (_HEAD + struct.pack("<I", 100) + b"abcde", str(len(_HEAD)), "runs past"),
    (b"{}", "99", "does not fit"),
])
def test_malformed_requests_are_one_line_400s(body, header, message):
    from ovr.apps.protocol import ProtocolError, parse_request

    with pytest.raises(ProtocolError, match=message) as e:
        parse_request(body, header)
    assert e.value.status == 400 and "\n" not in str(e.value)


def test_classification_extension_orders_scores():
    from ovr.apps.protocol import classification

    out = classification(np.array([[0.1, 0.7, 0.2], [0.5, 0.1, 0.4]]), 2, ["a", "b", "c"])
    assert out.shape == (2, 2)
    assert [s.decode() for s in out[0]] == ["0.700000:1:b", "0.200000:2:c"]
    assert [s.decode().split(":")[2] for s in out[1]] == ["a", "c"]


# --- a live server -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def served(tmp_path_factory):
    base = tmp_path_factory.mktemp("oip")
    data, extra = served_model(base, "plain")
    shutil.copytree(base / "plain", base / "grown")
    assert cli("add-class", base / "grown", "c3", extra / "c3", "--device", "cpu").exit_code == 0
    images = [data / f"c{k}" / f"img00{i}.png" for k in range(3) for i in (7, 8)] + [extra / "c3" / "img008.png"]
    return base, images


def _predict_cli(model, images) -> list[str]:
    r = cli("predict", model, *images, "--json", "--device", "cpu")
    assert r.exit_code == 0, r.output
    return [json.loads(line)["class"] for line in r.stdout.splitlines() if line.strip()]


def _wait_ready(client) -> None:
    for _ in range(200):
        if client.is_server_ready():
            return
        time.sleep(0.05)
    raise AssertionError("never ready")


@pytest.mark.parametrize("which", ["plain", "grown"])
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_tritonclient_gets_the_answers_of_ovr_predict(served, which, binary):
    httpclient = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is not installed")
    base, images = served
    model = base / which
    expected = _predict_cli(model, images)
    with LiveServer(model, model_name="shapes") as live:
        client = httpclient.InferenceServerClient(live.url)
        assert client.is_server_live()
        _wait_ready(client)
        assert client.is_model_ready("shapes") and not client.is_model_ready("nope")
        meta = client.get_model_metadata("shapes")
        classes = meta["parameters"]["classes"]
        assert meta["name"] == "shapes" and [o["name"] for o in meta["outputs"]][:4] == \
            ["logits", "confidences", "calibrated", "class_index"]
        assert {"binary_tensor_data", "classification"} <= set(client.get_server_metadata()["extensions"])
        if binary:  # encoded files as BYTES, sent and answered as binary data (tritonclient's default)
            inp = httpclient.InferInput("images", [len(images)], "BYTES")
            inp.set_data_from_numpy(np.array([p.read_bytes() for p in images], dtype=object), binary_data=True)
        else:  # the exported graph's input: uint8 crops, as JSON
            from ovr.embedding.data import load_image
            from ovr.apps.pipeline import Predictor

            prep = Predictor(model, "cpu").crop
            crops = np.stack([prep(load_image(p)) for p in images])
            inp = httpclient.InferInput("crops", list(crops.shape), "UINT8")
            inp.set_data_from_numpy(crops, binary_data=False)
        outs = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in ("class_index", "confidences", "class_name")]
        outs.append(httpclient.InferRequestedOutput("confidences", binary_data=binary, class_count=2))
        res = client.infer("shapes", [inp], outputs=outs[:3])
        idx = res.as_numpy("class_index")
        assert [classes[i] for i in idx] == expected
        assert [s.decode() if isinstance(s, bytes) else s for s in res.as_numpy("class_name")] == expected
        conf = res.as_numpy("confidences")
        assert conf.shape == (len(images), len(classes)) and np.array_equal(conf.argmax(1), idx)
        top = client.infer("shapes", [inp], outputs=outs[3:]).as_numpy("confidences")
        assert top.shape == (len(images), 2)
        first = [(s.decode() if isinstance(s, bytes) else s).split(":") for s in top[:, 0]]
        assert [lab for _, _, lab in first] == expected
        assert np.allclose([float(sc) for sc, _, _ in first], conf.max(1), atol=1e-5)
        # errors, as the protocol says: unknown model 404, wrong datatype 400, a bad image named
        from tritonclient.utils import InferenceServerException

        with pytest.raises(InferenceServerException, match="unknown model"):
            client.infer("nope", [inp])
        bad = httpclient.InferInput("images", [2], "BYTES")
        bad.set_data_from_numpy(np.array([images[0].read_bytes(), b"not an image"], dtype=object))
        with pytest.raises(InferenceServerException, match="element 1"):
            client.infer("shapes", [bad])
        floats = httpclient.InferInput("images", [1, 3], "FP32")
        floats.set_data_from_numpy(np.zeros((1, 3), np.float32))
        with pytest.raises(InferenceServerException, match="datatype FP32"):
            client.infer("shapes", [floats])


def test_mixed_uploads_answer_every_good_image_and_limits_count_chunked_bodies(served):
    import httpx

    base, images = served
    with LiveServer(base / "plain", max_upload_mb=0.2) as live, httpx.Client(base_url=f"http://{live.url}") as c:
        files = [("files", ("good0.png", images[0].read_bytes(), "image/png")),
                 ("files", ("corrupt.png", images[0].read_bytes()[:60], "image/png")),
                 ("files", ("empty.png", b"", "image/png")),
                 ("files", ("notes.txt", b"hello, not an image", "text/plain")),
                 ("files", ("good1.png", images[2].read_bytes(), "image/png"))]
        r = c.post("/predict", files=files)
        assert r.status_code == 200, r.text
        res = r.json()["results"]
        assert [x["input"] for x in res] == ["good0.png", "corrupt.png", "empty.png", "notes.txt", "good1.png"]
        assert [x.get("class") for x in res] == ["c0", None, None, None, "c1"]
        assert res[2]["error"] == "empty file" and all(res[i]["error"] for i in (1, 3))

        def chunks(head=b""):  # 0.5 MB sent with Transfer-Encoding: chunked (no Content-Length)
            yield head
            for _ in range(50):
                yield b"x" * 10_000

        r = c.post("/v2/models/plain/infer", content=chunks())
        assert r.status_code == 413 and "limit" in r.json()["error"]
        part = (b'--b\r\nContent-Disposition: form-data; name="files"; filename="big.png"\r\n'
                b"Content-Type: image/png\r\n\r\n")  # a well-formed upload whose file never ends
        r = c.post("/predict", content=chunks(part), headers={"content-type": "multipart/form-data; boundary=b"})
        assert r.status_code == 413
        assert c.post("/predict", files=files[:1]).json()["results"][0]["class"] == "c0"  # still serving


def test_token_and_cross_site_reload_are_refused(served):
    """--token: every request but the page and health checks needs the bearer token (tritonclient passes it as a
    header); POST /reload from another origin, or as a body a cross-site form can send, is refused (a cross-site
    `POST /reload` with Origin: http://evil.example and text/plain returned 200)."""
    import httpx

    base, images = served
    with LiveServer(base / "plain", token="s3cret") as live, httpx.Client(base_url=f"http://{live.url}") as c:
        assert c.get("/v2/health/live").status_code == 200 and c.get("/").status_code == 200
        assert c.get("/classes").status_code == 401 and c.get("/v2/models/plain").status_code == 401
        assert c.get("/classes", headers={"Authorization": "Bearer wrong"}).status_code == 401
        ok = {"Authorization": "Bearer s3cret"}
        assert c.get("/classes", headers=ok).status_code == 200
        httpclient = pytest.importorskip("tritonclient.http")
        client = httpclient.InferenceServerClient(live.url)
        assert client.get_model_metadata("plain", headers=ok)["name"] == "plain"
        evil = c.post("/reload", headers={**ok, "Origin": "http://evil.example", "Content-Type": "text/plain"},
                      content=b"x")
        assert evil.status_code == 403
        assert c.post("/reload", headers={**ok, "Content-Type": "text/plain"}, content=b"x").status_code == 403
        assert c.post("/reload", headers={**ok, "Origin": f"http://{live.url}"}).status_code == 200
        assert c.post("/reload", headers=ok).status_code == 200  # a plain client (curl, scripts)


def test_pixel_budgets_are_read_from_headers_before_decoding(served, monkeypatch):
    """A 9000 x 9000 PNG of a few KB is refused from its header (a 121 KB 8000 x 7999 PNG took the server to
    2.45 GB), and a request's images past its pixel budget get their own errors while the others are answered."""
    import io

    import httpx
    from PIL import Image

    import ovr.apps.serve

    def png(w, h):
        buf = io.BytesIO()
        Image.new("1", (w, h)).save(buf, "PNG")
        return buf.getvalue()

    base, images = served
    monkeypatch.setattr(ovr.apps.serve, "MAX_REQUEST_PIXELS", 20_000_000)
    with LiveServer(base / "plain") as live, httpx.Client(base_url=f"http://{live.url}", timeout=60) as c:
        huge = png(9000, 9000)
        assert len(huge) < 200_000
        files = [("files", ("huge.png", huge, "image/png")), ("files", ("ok.png", images[0].read_bytes(), "image/png"))]
        res = c.post("/predict", files=files).json()["results"]
        assert "too large" in res[0]["error"] and res[1]["class"] == "c0"
        big = png(3000, 3000)  # 9 megapixels each: the third is past a 20-megapixel request
        res = c.post("/predict", files=[("files", (f"b{i}.png", big, "image/png")) for i in range(3)]).json()["results"]
        assert [("error" in r) for r in res] == [False, False, True] and "budget" in res[2]["error"]
