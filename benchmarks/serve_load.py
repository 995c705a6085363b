"""Load on `ovr serve`, on 127.0.0.1 only: requests/s and p50/p99 latency for single images and batches, then an
`ovr add-class` + POST /reload while clients keep sending, to show the new class served with no failed request.
Then concurrent clients on two servers of the same model, ovr's default (requests share forward passes) and
--max-batch 1 (one request per pass, as before), phases interleaved in pairs; each phase records the images per
forward pass the server ran.

    python benchmarks/serve_load.py [--backbone efficientnet_lite0] [--seconds 15] [--out benchmarks/results/serve_load.json]

Bounded: each phase stops after --seconds or --max-requests, whichever first. The server is a real
`python -m ovr serve` subprocess; the clients are threads with httpx in this process.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from datasets import write_photos_folder  # noqa: E402  the real-photo set of the other benchmarks
from serving import start_server  # noqa: E402
from ovr.runtime import machine_name  # noqa: E402


def load(url: str, files: list[Path], batch: int, clients: int, seconds: float, max_requests: int,
         api: str = "predict") -> dict:
    """Clients in threads for `seconds`; api "predict" (multipart) or "v2" (Open Inference Protocol infer, the
    images as one BYTES tensor in binary data, as tritonclient sends them; class_name asked as binary data)."""
    import httpx

    from ovr.apps.protocol import HEADER, serialize_bytes

    def send(c, part):
        if api == "predict":
            r = c.post(url + "/predict", files=[("files", (n, b, "image/png")) for n, b in part])
            return r.status_code == 200, ({x["class"] for x in r.json()["results"]} if r.status_code == 200 else set())
        raw = serialize_bytes([b for _, b in part])
        head = json.dumps({"inputs": [{"name": "images", "datatype": "BYTES", "shape": [len(part)],
                                       "parameters": {"binary_data_size": len(raw)}}],
                           "outputs": [{"name": "class_name", "parameters": {"binary_data": False}}]}).encode()
        r = c.post(url + "/v2/models/m/infer", content=head + raw, headers={HEADER: str(len(head))})
        return r.status_code == 200, (set(r.json()["outputs"][0]["data"]) if r.status_code == 200 else set())

    lat: list[float] = []
    errors = [0]
    seen: set[str] = set()
    stop = time.monotonic() + seconds
    lock = threading.Lock()
    blobs = [(p.name, p.read_bytes()) for p in files]

    def worker(k: int) -> None:
        with httpx.Client(timeout=60) as c:
            i = k
            while time.monotonic() < stop:
                with lock:
                    if len(lat) + errors[0] >= max_requests:
                        return
                part = [blobs[(i + j) % len(blobs)] for j in range(batch)]
                i += batch * clients
                t0 = time.perf_counter()
                try:
                    ok, classes = send(c, part)
                except httpx.HTTPError:
                    ok, classes = False, set()
                with lock:
                    if ok:
                        lat.append(time.perf_counter() - t0)
                        seen.update(classes)
                    else:
                        errors[0] += 1

    t0 = time.perf_counter()
    ts = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    wall = time.perf_counter() - t0
    lat_ms = np.array(lat) * 1000
    return {"batch": batch, "clients": clients, "requests": len(lat), "failed": errors[0],
            "requests_per_s": len(lat) / wall, "images_per_s": len(lat) * batch / wall,
            "p50_ms": float(np.percentile(lat_ms, 50)) if len(lat) else None,
            "p99_ms": float(np.percentile(lat_ms, 99)) if len(lat) else None, "classes_seen": sorted(seen)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--max-requests", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=2, help="paired rounds of the shared-pass comparison")
    ap.add_argument("--only-protocol", action="store_true",
                    help="only the Open Inference Protocol's infer beside /predict, phases interleaved in pairs")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    a.out = a.out or Path("benchmarks/results") / ("serve_protocol.json" if a.only_protocol else "serve_load.json")
    base = Path(tempfile.mkdtemp(prefix="ovr-serve-"))
    env = {**os.environ, "OVR_CACHE_DIR": os.environ.get("OVR_CACHE_DIR", str(base / "cache"))}
    allp = write_photos_folder(base / "all", per_class=30)
    data, later = base / "photos", base / "later"
    names = sorted(p.name for p in allp.iterdir() if p.is_dir())
    for n in names[:5]:
        os.renames(allp / n, data / n)
    os.renames(allp / names[5], later / "new")
    ovr = [sys.executable, "-m", "ovr"]
    subprocess.run([*ovr, "train", str(data), "--out", str(base / "m"), "--backbone", a.backbone], env=env, check=True,
                   capture_output=True)
    import httpx

    def start(*extra: str):
        return start_server(base / "m", "--name", "m", *extra, env=env)

    def phase(url: str, name: str, *args, **kw) -> dict:
        h0 = httpx.get(url + "/health").json()
        r = load(url, *args, **kw)
        h1 = httpx.get(url + "/health").json()
        passes = h1["forward_passes"] - h0["forward_passes"]
        r = {"phase": name, **r, "forward_passes": passes,
             "images_per_pass": (h1["images_embedded"] - h0["images_embedded"]) / max(passes, 1)}
        print(json.dumps(r), flush=True)
        return r

    files = sorted(data.rglob("*.png"))
    res = {"machine": machine_name(), "backbone": a.backbone, "image": "64x64 PNG crops of real photographs",
           "phases": []}
    if a.only_protocol:  # the same server, the same images: /predict and /v2 infer, interleaved in pairs
        server, url = start()
        try:
            for rnd in range(a.rounds):
                for batch, clients in ((1, 1), (1, 4), (8, 2)):
                    for api in ("predict", "v2"):
                        r = phase(url, f"api: {api}", files, batch, clients, a.seconds, a.max_requests, api=api)
                        res["phases"].append({**r, "api": api, "round": rnd})
        finally:
            server.terminate()
            server.wait(timeout=30)
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(res, indent=1))
        return
    server, url = start()
    try:
        for batch, clients in ((1, 1), (1, 4), (1, 8), (8, 2)):
            res["phases"].append(phase(url, "steady", files, batch, clients, a.seconds, a.max_requests))
        # grow the model on disk while clients keep sending, then reload: no request may fail
        holder: dict = {}
        t = threading.Thread(target=lambda: holder.update(load(url, files, 1, 2, a.seconds * 2, a.max_requests)))
        t.start()
        subprocess.run([*ovr, "add-class", str(base / "m"), "new", str(later / "new")], env=env, check=True,
                       capture_output=True)
        t0 = time.perf_counter()
        rr = httpx.post(url + "/reload", timeout=120).json()
        reload_s = time.perf_counter() - t0
        t.join()
        res["phases"].append({"phase": "during add-class + reload", **holder, "reload_s": reload_s,
                              "classes_after": rr["classes"]})
        print(json.dumps(res["phases"][-1]))
        res["phases"].append(phase(url, "new class images after reload", sorted(later.rglob("*.png")), 1, 1,
                                   a.seconds / 3, 200))
    finally:
        server.terminate()
        server.wait(timeout=30)
    # shared passes vs one request per pass, on the same (grown) model: both servers up, phases interleaved in
    # pairs so that both sides see the same machine (the 1-client rate drifted 22 -> 34 req/s within one run)
    servers = {"shared": start(), "one request per pass": start("--max-batch", "1")}
    try:
        for rnd in range(a.rounds):
            for clients in (4, 8):
                for name, (_, u) in servers.items():
                    r = phase(u, f"compare: {name}", files, 1, clients, a.seconds, a.max_requests)
                    res["phases"].append({**r, "round": rnd})
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(timeout=30)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
