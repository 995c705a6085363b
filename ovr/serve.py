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

from . import __version__
from .config import AnswerOptions
from .errors import OvrError

MAX_BATCH = 64  # images per forward pass, gathered across the requests waiting for it
INSTALL_HINT = 'serving needs the serve extra: pip install "ovr[serve]" (fastapi, uvicorn, python-multipart)'
PAGE = Path(__file__).with_name("page.html")


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


def create_app(model_root, *, device: str = "auto", cache_dir=None,
               max_upload_mb: float = 20.0, max_files: int = 64, max_batch: int = MAX_BATCH):
    try:
        from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
        from fastapi.responses import HTMLResponse, JSONResponse
        import python_multipart  # noqa: F401  (FastAPI's form parser; without it uploads fail at run time)
    except ImportError:
        raise OvrError(INSTALL_HINT) from None
    from .data import decode_image, describe_error
    from .pipeline import Predictor

    limit = int(max_upload_mb * 1e6)
    state = {"pred": Predictor(model_root, device, cache_dir)}
    state["pred"].backbone  # build it now: the first request should not pay for it
    batcher = Batcher(max_batch)

    app = FastAPI(title="ovr", version=__version__,
                  description="One-vs-rest detectors on frozen pretrained features. POST images to /predict.")

    @app.middleware("http")
    async def body_limit(request: Request, call_next):
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > limit:
            return JSONResponse({"detail": f"request body of {int(size) / 1e6:.1f} MB is over the "
                                           f"{max_upload_mb:g} MB limit"}, status_code=413)
        return await call_next(request)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return PAGE.read_text(encoding="utf-8")

    @app.get("/health")
    def health() -> dict:
        pred = state["pred"]
        return {"status": "ok", "model": str(model_root), "classes": len(pred.classes), "device": str(pred.device),
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
        if len(files) > max_files:
            raise HTTPException(413, f"{len(files)} files in one request; at most {max_files}")
        images, names = [], []
        for f in files:
            data = f.file.read(limit + 1)
            if len(data) > limit:
                raise HTTPException(413, f"{f.filename}: over the {max_upload_mb:g} MB limit")
            try:
                images.append(decode_image(data))
            except Exception as e:  # PIL raises many types for bad bytes; the client gets one line
                raise HTTPException(422, f"cannot read image {f.filename}: {describe_error(e)}") from None
            names.append(f.filename or f"image {len(names)}")
        pred = state["pred"]
        X = batcher.embed(pred, images)
        options = AnswerOptions(top_k=top_k, reject_below=reject_below, thresholds=thresholds, multilabel=True,
                                calibrated=calibrated)
        rows = pred.rows(images, X, list(range(len(images))), [], options)
        out = []
        for name, r in zip(names, rows):
            r = {**r, "input": name, "unknown": r.get("class") == "unknown"}
            r["labels"] = r.get("labels", [])
            out.append(r)
        return {"model": str(model_root), "classes": len(pred.classes), "results": out}

    @app.post("/reload")
    def reload() -> dict:
        old = state["pred"]
        new = Predictor(model_root, device, cache_dir)
        if new.model.backbone.get("fingerprint") == old.model.backbone.get("fingerprint"):
            new._backbone = old._backbone  # same network: keep the built one
        else:
            new.backbone  # noqa: B018  (build before swapping in)
        state["pred"] = new  # one assignment: a request sees the old model or the new one
        return {"status": "reloaded", "classes": new.classes}

    @app.exception_handler(OvrError)
    async def ovr_error(request: Request, e: OvrError):
        return JSONResponse({"detail": str(e)}, status_code=400)

    return app


def run(app, host: str = "127.0.0.1", port: int = 8000) -> None:
    try:
        import uvicorn
    except ImportError:
        raise OvrError(INSTALL_HINT) from None
    uvicorn.run(app, host=host, port=port, log_level="warning")
