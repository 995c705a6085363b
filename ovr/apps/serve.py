"""`ovr serve`: the model behind an HTTP API (FastAPI) and one static web page.

POST /predict takes one or more images (multipart field `files`) and answers one JSON object per image. One forward
pass runs at a time, and it takes the images of every request waiting for it (up to `max_batch` images), so
concurrent clients share batches; a request that finds the backbone idle runs at once. A corrupt image is a 422
naming it, a body over the limit a 413; the server keeps serving. POST /reload swaps in the model folder's current state (after `ovr add-class`) without
a restart: requests in flight finish on the old model, the next ones see the new one.
"""
# No `from __future__ import annotations`: FastAPI reads the endpoint annotations at run time, and the types
# are imported inside create_app (the serve extra is optional).
import threading
from pathlib import Path

import numpy as np

from ..version import __version__
from ..config import AnswerOptions
from ..errors import OvrError

MAX_BATCH = 64  # images per forward pass, gathered across the requests waiting for it
# Pixel budgets, read from each file's header before anything is decoded (a small file can hold an image that
# takes gigabytes decoded). Per image (larger JPEGs are decoded at a reduced scale, other formats refused) and per
# request (the images past it are refused, each with its own error).
MAX_IMAGE_PIXELS = 16_000_000
MAX_REQUEST_PIXELS = 64_000_000
INSTALL_HINT = 'serving needs the serve extra: pip install "ovr[serve]" (fastapi, uvicorn, python-multipart)'
PAGE = Path(__file__).with_name("page.html")


def release_memory() -> None:
    """Hand the freed heap back to the OS after a request (glibc keeps it otherwise: a server's RSS stayed at its
    peak after a few large uploads). A no-op where there is no glibc."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class Batcher:
    """One backbone forward pass at a time, shared by the requests waiting for it. A request that finds the backbone
    idle runs its own images at once (no added wait); requests that arrive meanwhile queue, and the next pass takes
    them together, oldest first, up to `max_batch` images (a request is never split; max_batch=1: one request per
    pass). Requests holding another Predictor (a /reload came between them) never share a pass."""

    def __init__(self, max_batch: int = MAX_BATCH):
        self.max_batch = max_batch
        self.cv = threading.Condition(threading.Lock())
        self.queue: list[dict] = []
        self.busy = False
        self.passes = 0  # forward passes run, and the images they embedded (GET /health)
        self.images = 0

    def embed(self, pred, images: list):
        """The embeddings of `images` (PIL) with `pred`'s backbone, one row per image, in order."""
        job = {"pred": pred, "images": images, "done": False, "X": None, "error": None}
        with self.cv:
            self.queue.append(job)
            while not job["done"]:
                if self.busy:
                    self.cv.wait()
                    continue
                self.busy, batch = True, self._take()
                self.cv.release()
                try:
                    self._run(batch)
                finally:
                    self.cv.acquire()
                    self.busy = False
                    self.cv.notify_all()
        if job["error"] is not None:
            raise job["error"]
        return job["X"]

    def _take(self) -> list[dict]:
        head, n, batch = self.queue[0]["pred"], 0, []
        for job in list(self.queue):
            if job["pred"] is not head or (batch and n + len(job["images"]) > self.max_batch):
                continue
            batch.append(job)
            n += len(job["images"])
            self.queue.remove(job)
        return batch

    def _run(self, batch: list[dict]) -> None:
        pred = batch[0]["pred"]
        try:
            X = pred.embed([im for job in batch for im in job["images"]])[0]
            self.passes, self.images = self.passes + 1, self.images + len(X)
            start = 0
            for job in batch:
                job["X"], start = X[start:start + len(job["images"])], start + len(job["images"])
        except Exception as e:
            if len(batch) > 1:  # only the request that caused it should fail: run each alone
                for job in batch:
                    self._run([job])
                return
            batch[0]["error"] = e
        finally:
            for job in batch:
                job["done"] = True


class Guard:
    """The ASGI wrapper in front of the app (plain ASGI, so a refusal raised while the body streams in reaches the
    app's handlers instead of a middleware's task group):
    - a request body over `limit` bytes is a 413, counted as it arrives (chunked or not), never stored whole;
    - with a token, every request but the page and the health checks needs `Authorization: Bearer TOKEN`
      (compared in constant time), else 401;
    - POST /reload, the one request that changes state, is refused (403) from another origin or with a content
      type a cross-site form can send (CSRF)."""

    def __init__(self, app, limit: int, limit_mb: float, token: str | None = None):
        self.app, self.limit, self.limit_mb, self.token = app, limit, limit_mb, token

    def _too_large(self, size: float):
        from fastapi import HTTPException  # FastAPI's own: its body parsing re-raises it (others become a 400)

        return HTTPException(413, f"request body of {size / 1e6:.1f} MB is over the {self.limit_mb:g} MB limit")

    async def _refuse(self, scope, receive, send, status: int, message: str, **headers):
        from starlette.responses import JSONResponse

        key = "error" if scope["path"].startswith("/v2") else "detail"
        await JSONResponse({key: message}, status, headers=headers or None)(scope, receive, send)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        import hmac

        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers") or []}
        path = scope["path"]
        if self.token and path not in OPEN_PATHS and not hmac.compare_digest(
                headers.get("authorization", "").encode(), f"Bearer {self.token}".encode()):
            return await self._refuse(scope, receive, send, 401, "missing or wrong token",
                                      **{"WWW-Authenticate": "Bearer"})
        if path == "/reload" and scope["method"] == "POST":
            origin = headers.get("origin")
            ctype = headers.get("content-type", "").split(";")[0].strip().lower()
            if origin is not None and origin.split("://", 1)[-1] != headers.get("host", ""):
                return await self._refuse(scope, receive, send, 403, f"cross-origin /reload from {origin} refused")
            if ctype in SIMPLE_TYPES:
                return await self._refuse(scope, receive, send, 403,
                                          f"/reload takes no {ctype} body (a cross-site form could send it)")
        size = headers.get("content-length", "")
        if size.isdigit() and int(size) > self.limit:
            return await self._refuse(scope, receive, send, 413, str(self._too_large(int(size)).detail))
        seen = 0

        async def counted():
            nonlocal seen
            msg = await receive()
            seen += len(msg.get("body", b""))
            if seen > self.limit:
                raise self._too_large(seen)
            return msg

        await self.app(scope, counted, send)


SIMPLE_TYPES = ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data")  # CORS needs no preflight
OPEN_PATHS = ("/", "/health", "/v2/health/live", "/v2/health/ready")  # answered without the token


def create_app(model_root, *, device: str = "auto", cache_dir=None, engine: str = "auto", max_upload_mb: float = 20.0,
               max_files: int = 64, max_batch: int = MAX_BATCH, model_name: str | None = None, warm: bool = True,
               token: str | None = None):
    """The app. `model_name`: the name the Open Inference Protocol serves the model under (default: the model
    folder's name). The backbone is built and run once on a blank image in the background: /v2/health/ready (and
    /health's "ready") say true once that is done, so the first request does not pay for it. `token`: every
    request but the page and the health checks must carry `Authorization: Bearer TOKEN` (compared in constant
    time). POST /reload, the one request that changes state, is refused from another origin and with a content
    type a cross-site form can send (CSRF)."""
    try:
        from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
        from fastapi.responses import HTMLResponse, JSONResponse, Response
        from starlette.exceptions import HTTPException as StarletteHTTPException
        import python_multipart  # noqa: F401  (FastAPI's form parser; without it uploads fail at run time)
    except ImportError:
        raise OvrError(INSTALL_HINT) from None
    from PIL import Image

    from . import protocol
    from ..embedding.data import decode_image, describe_error
    from .pipeline import Predictor

    limit = int(max_upload_mb * 1e6)

    def decode_uploads(blobs) -> list:
        """Each upload decoded, or why not (a string): within the per-image pixel budget and what is left of the
        request's, both read from the headers before anything is decoded. The one decode of /predict and v2."""
        from ..embedding.data import image_header

        out: list = []
        budget = MAX_REQUEST_PIXELS
        for data in blobs:
            try:
                w, h, _ = image_header(data)
                if min(w * h, MAX_IMAGE_PIXELS) > budget:  # a larger JPEG is decoded reduced; others are refused
                    raise ValueError(f"{w} x {h} pixels is over what is left of this request's "
                                     f"{MAX_REQUEST_PIXELS / 1e6:.0f} megapixel budget; send it in its own request")
                out.append(decode_image(data, MAX_IMAGE_PIXELS))
                budget -= out[-1].width * out[-1].height
            except Exception as e:  # PIL raises many types for bad bytes; the client gets one line
                out.append(f"cannot read image: {describe_error(e)}" if data else "empty file")
        return out
    state = {"pred": Predictor(model_root, device, cache_dir, engine)}
    name = model_name or Path(model_root).resolve().name
    ready = threading.Event()
    batcher = Batcher(max_batch)

    def warm_up() -> None:
        pred = state["pred"]
        try:
            batcher.embed(pred, [Image.new("RGB", (64, 64))])
        finally:
            ready.set()

    if warm:
        threading.Thread(target=warm_up, daemon=True, name="ovr-warm-up").start()
    else:
        ready.set()

    app = FastAPI(title="ovr", version=__version__,
                  description="One-vs-rest detectors on frozen pretrained features. POST images to /predict, or "
                              "use the Open Inference Protocol under /v2.")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return PAGE.read_text(encoding="utf-8")

    @app.get("/health")
    def health() -> dict:
        pred = state["pred"]
        return {"status": "ok", "ready": ready.is_set(), "model": str(model_root), "name": name,
                "classes": len(pred.classes), "device": str(pred.device),
                "forward_passes": batcher.passes, "images_embedded": batcher.images}

    @app.get("/classes")
    def classes() -> list[dict]:
        m = state["pred"].model
        return [{"name": c, "threshold": m.records[c].threshold, "positives": m.records[c].positives}
                for c in m.classes]

    @app.post("/predict")
    def predict(files: list[UploadFile] = File(..., description="one or more images"),
                top_k: int = Query(3, ge=1, description="classes listed per image"),
                reject_below: float | None = Query(None, ge=0, le=1, description="'unknown' below this confidence"),
                thresholds: bool = Query(False, description="'unknown' when the answer's head does not pass its threshold"),
                calibrated: bool = Query(False, description="calibrated confidences")) -> dict:
        """One result per file, in order: the answer, or {"input", "error"} for a file that is not a readable
        image (the other files are still answered)."""
        if len(files) > max_files:
            raise HTTPException(413, f"{len(files)} files in one request; at most {max_files}")
        names, blobs = [], []
        for i, f in enumerate(files):
            names.append(f.filename or f"image {i}")
            blobs.append(f.file.read(limit + 1))
            if len(blobs[-1]) > limit:
                raise HTTPException(413, f"{f.filename}: over the {max_upload_mb:g} MB limit")
        decoded = decode_uploads(blobs)
        errors = {i: d for i, d in enumerate(decoded) if isinstance(d, str)}
        images = [d for d in decoded if not isinstance(d, str)]
        pred = state["pred"]
        options = AnswerOptions(top_k=top_k, reject_below=reject_below, thresholds=thresholds, multilabel=True,
                                calibrated=calibrated)
        X = batcher.embed(pred, images) if images else None
        rows = iter(pred.rows(images, X, list(range(len(images))), [], options) if images else [])
        out = []
        for i, n in enumerate(names):
            if i in errors:
                out.append({"input": n, "error": errors[i]})
                continue
            r = next(rows)
            out.append({**r, "input": n, "unknown": r.get("class") == "unknown", "labels": r.get("labels", [])})
        del images, decoded, X
        release_memory()
        return {"model": str(model_root), "classes": len(pred.classes), "results": out}

    @app.post("/reload")
    def reload() -> dict:
        old = state["pred"]
        new = Predictor(model_root, device, cache_dir, engine)
        if new.model.backbone.get("fingerprint") == old.model.backbone.get("fingerprint"):
            new._backbone = old._backbone  # same network: keep the built one
        else:
            new.backbone  # noqa: B018  (build before swapping in)
        state["pred"] = new  # one assignment: a request sees the old model or the new one
        return {"status": "reloaded", "classes": new.classes}

    # --- the Open Inference Protocol (v2) ---------------------------------------------------------------------
    def v2_error(message: str, status: int = 400):
        return JSONResponse({"error": message}, status_code=status)

    def v2_model(model: str, version: str | None):
        if model != name or version not in (None, "1"):
            raise protocol.ProtocolError(f"unknown model '{model}'" + (f" version '{version}'" if version else "")
                                         + f"; this server serves '{name}' version 1", 404)
        return state["pred"]

    @app.get("/v2")
    def v2_server() -> dict:
        return {"name": "ovr", "version": __version__, "extensions": protocol.EXTENSIONS}

    @app.get("/v2/health/live")
    def v2_live() -> dict:
        return {"live": True}

    @app.get("/v2/health/ready")
    def v2_ready():
        return {"ready": True} if ready.is_set() else v2_error("warming up", 400)

    @app.get("/v2/models/{model}/ready")
    @app.get("/v2/models/{model}/versions/{version}/ready")
    def v2_model_ready(model: str, version: str | None = None):
        v2_model(model, version)
        return {"name": name, "ready": True} if ready.is_set() else v2_error("warming up", 400)

    @app.get("/v2/models/{model}")
    @app.get("/v2/models/{model}/versions/{version}")
    def v2_metadata(model: str, version: str | None = None) -> dict:
        pred = v2_model(model, version)
        N, S = len(pred.classes), pred.crop.size
        return {"name": name, "versions": ["1"], "platform": "ovr",
                "inputs": [{"name": "images", "datatype": "BYTES", "shape": [-1]},
                           {"name": "crops", "datatype": "UINT8", "shape": [-1, S, S, 3]}],
                "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, N]},
                            {"name": "confidences", "datatype": "FP32", "shape": [-1, N]},
                            {"name": "calibrated", "datatype": "FP32", "shape": [-1, N]},
                            {"name": "class_index", "datatype": "INT64", "shape": [-1]},
                            {"name": "class_name", "datatype": "BYTES", "shape": [-1]}],
                "parameters": {"classes": pred.classes}}

    @app.post("/v2/models/{model}/infer")
    @app.post("/v2/models/{model}/versions/{version}/infer")
    async def v2_infer(model: str, request: Request, version: str | None = None):
        from starlette.concurrency import run_in_threadpool

        pred = v2_model(model, version)
        req = protocol.parse_request(await request.body(), request.headers.get(protocol.HEADER))
        return await run_in_threadpool(v2_answer, pred, req)

    def v2_answer(pred, req: "protocol.Request"):
        if len(req.inputs) != 1:
            raise protocol.ProtocolError(f"one input, encoded images (BYTES) or crops (UINT8); got {len(req.inputs)}")
        t = req.inputs[0]
        if t.datatype == "BYTES":
            if t.data.ndim == 2 and t.data.shape[1] == 1:
                t.data = t.data[:, 0]
            if t.data.ndim != 1:
                raise protocol.ProtocolError(f"input '{t.name}': BYTES images must have shape [B] or [B, 1], "
                                             f"got {t.shape}")
            if len(t.data) > max_files:
                raise protocol.ProtocolError(f"{len(t.data)} images in one request; at most {max_files}", 413)
            images = decode_uploads(t.data)
            bad = next((i for i, d in enumerate(images) if isinstance(d, str)), None)
            if bad is not None:  # the protocol answers a batch or an error: the first bad image, named
                raise protocol.ProtocolError(f"input '{t.name}' element {bad}: not a readable image ({images[bad]})")
            X = batcher.embed(pred, images) if images else None
        elif t.datatype == "UINT8":
            try:
                X = pred.embed_crops(t.data)
            except OvrError as e:
                raise protocol.ProtocolError(f"input '{t.name}': {e}") from None
        else:
            raise protocol.ProtocolError(f"input '{t.name}': datatype {t.datatype}; send encoded images as BYTES "
                                         f"or crops as UINT8")
        if X is None:
            X = torch_empty(pred)
        ans = pred.model.answer(X)
        idx = ans.index.astype(np.int64)
        outputs = {"logits": ans.logits.astype(np.float32), "confidences": ans.confidences.astype(np.float32),
                   "calibrated": ans.calibrated.astype(np.float32), "class_index": idx,
                   "class_name": protocol.bytes_array([(pred.classes[i] if i >= 0 else "unknown").encode()
                                                    for i in idx])}
        body, header = protocol.build_response(name, "1", req, outputs, pred.classes,
                                               {"logits", "confidences", "calibrated"})
        del X, outputs
        release_memory()
        if header is None:
            return Response(body, media_type="application/json")
        return Response(body, media_type="application/octet-stream", headers={protocol.HEADER: str(header)})

    def torch_empty(pred):
        import torch

        return torch.empty(0, pred.model.backbone["dim"])

    @app.exception_handler(protocol.ProtocolError)
    async def protocol_error(request: Request, e: protocol.ProtocolError):
        return v2_error(str(e), e.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        if request.url.path.startswith("/v2"):
            return v2_error(str(e.detail), e.status_code)
        return JSONResponse({"detail": e.detail}, status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(OvrError)
    async def ovr_error(request: Request, e: OvrError):
        if request.url.path.startswith("/v2"):
            return v2_error(str(e))
        return JSONResponse({"detail": str(e)}, status_code=400)

    return Guard(app, limit, max_upload_mb, token)


def run(app, host: str = "127.0.0.1", port: int = 8000) -> None:
    try:
        import uvicorn
    except ImportError:
        raise OvrError(INSTALL_HINT) from None
    uvicorn.run(app, host=host, port=port, log_level="warning")
