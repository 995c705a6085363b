"""`ovr serve`: the model behind an HTTP API (FastAPI) and one static web page.

POST /predict takes one or more images (multipart field `files`) and answers one JSON object per image; all images
of a request go through the backbone as one batch. A corrupt image is a 422 naming it, a body over the limit a 413;
the server keeps serving. POST /reload swaps in the model folder's current state (after `ovr add-class`) without
a restart: requests in flight finish on the old model, the next ones see the new one.
"""
# No `from __future__ import annotations`: FastAPI reads the endpoint annotations at run time, and the types
# are imported inside create_app (the serve extra is optional).
import threading
from pathlib import Path

from . import __version__
from .errors import OvrError

INSTALL_HINT = 'serving needs the serve extra: pip install "ovr[serve]" (fastapi, uvicorn, python-multipart)'
PAGE = Path(__file__).with_name("page.html")


def create_app(model_root, *, device: str = "auto", cache_dir=None,
               max_upload_mb: float = 20.0, max_files: int = 64):
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
    run_lock = threading.Lock()  # one forward pass at a time on the device; requests queue here

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
        return {"status": "ok", "model": str(model_root), "classes": len(pred.classes), "device": str(pred.device)}

    @app.get("/classes")
    def classes() -> list[dict]:
        m = state["pred"].model
        return [{"name": c, "threshold": m.records[c].threshold, "positives": m.records[c].positives}
                for c in m.classes]

    @app.post("/predict")
    def predict(files: list[UploadFile] = File(..., description="one or more images"),
                top_k: int = Query(3, ge=1, description="classes listed per image"),
                reject_below: float | None = Query(None, ge=0, le=1, description="'unknown' below this confidence"),
                thresholds: bool = Query(False, description="'unknown' when no head passes its threshold"),
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
        with run_lock:
            rows = pred.predict(images, top_k=top_k, reject_below=reject_below, thresholds=thresholds,
                                multilabel=True, calibrated=calibrated)
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
