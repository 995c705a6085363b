"""The adversarial trials (issues 11 and 28), re-runnable: bad inputs, damaged model folders and caches, kill -9 at
random moments, concurrent writers, output paths, manifests, the Python API, and the server's budgets (chunked
bodies, pixel bombs, memory after near-cap requests). Counts tracebacks, files outside the model and cache folders
touched, models lost, and silently wrong answers (an answer that changed after damage to the cache).

    python benchmarks/adversarial.py --out benchmarks/results/adversarial.json [--kills 12 --seed 0]

Every run is a real `python -m ovr ...` process on tiny generated data (tiny_cnn backbone), so the figures are
about the tool's behaviour, not speed. A "traceback" is any stderr containing "Traceback"; a "lost model" is a
model path that `ovr info --verify` cannot open after the run (where it could before); "outside" is any change
to a sentinel folder beside the models (sha256 of every file, before vs after).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from conftest import make_folder  # noqa: E402  the tests' generated images
from serving import start_server  # noqa: E402
from ovr.runtime import machine_name  # noqa: E402

TINY = ["--backbone", "tiny_cnn", "--device", "cpu", "--workers", "0"]


def ovr(*args, env=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ovr", *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=timeout)


def tree_hash(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()}


def _retensor(path: Path, **shapes) -> None:
    """Replace tensors of a head file with zeros of other shapes, and put the new sha256 in the manifest (so only
    the shape check can catch it)."""
    import torch
    from safetensors.torch import load_file, save_file

    t = load_file(str(path))
    for k, shape in shapes.items():
        t[k] = torch.zeros(shape)
    save_file(t, str(path))
    _rehash(path)


def _examples(d: Path, change) -> None:
    path = next(d.glob("examples-*.json"))
    ex = json.loads(path.read_text())
    for e in ex:
        change(e)
    path.write_text(json.dumps(ex))
    _rehash(path)


def _rehash(path: Path) -> None:
    """The manifest's sha256 for a file rewritten in place (its name stays: the damage is inside)."""
    d = path.parent if path.parent.name != "heads" else path.parent.parent
    m = json.loads((d / "manifest.json").read_text())
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    rel = str(path.relative_to(d))
    for entry in [*m["heads"].values(), m["examples"]]:
        if entry.get("file") == rel:
            entry["sha256"] = digest
    (d / "manifest.json").write_text(json.dumps(m))


def verify(model: Path, env) -> bool:
    return ovr("info", model, "--verify", env=env).returncode == 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/adversarial.json"))
    ap.add_argument("--kills", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only-server", action="store_true", help="only (9): the server's budgets and memory")
    a = ap.parse_args()
    rng = random.Random(a.seed)
    base = Path(tempfile.mkdtemp(prefix="ovr-adv-"))
    env = {**os.environ, "OVR_CACHE_DIR": str(base / "cache"), "OVR_LOCK_TIMEOUT": "120"}
    data = make_folder(base / "data", n_classes=4, per_class=10)
    if a.only_server:
        assert ovr("train", data, "--out", base / "model", *TINY, env=env).returncode == 0
        print(json.dumps(server(base / "model", env, base), indent=1))
        return
    extra = make_folder(base / "extra", n_classes=6, per_class=8, prefix="x")
    sentinel = base / "sentinel"
    make_folder(sentinel, n_classes=2, per_class=3, prefix="keep")
    (sentinel / "notes.txt").write_text("must never change")
    before = tree_hash(sentinel)
    counts = {"runs": 0, "tracebacks": 0, "nonzero_without_message": 0, "models_lost": 0, "kills": 0,
              "silently_wrong_answers": 0}
    cases: list[dict] = []

    def record(kind: str, name: str, r: subprocess.CompletedProcess | None, extra_fields=None) -> None:
        counts["runs"] += 1
        row = {"kind": kind, "case": name, **(extra_fields or {})}
        if r is not None:
            tb = "Traceback" in r.stderr or "Traceback" in r.stdout
            silent = r.returncode not in (0, -9) and "error:" not in r.stderr and "error:" not in r.stdout
            counts["tracebacks"] += tb
            counts["nonzero_without_message"] += silent
            row.update(rc=r.returncode, traceback=tb, last_line=(r.stderr.strip().splitlines() or [""])[-1][:160])
        cases.append(row)

    model = base / "model"
    assert ovr("train", data, "--out", model, *TINY, env=env).returncode == 0

    # 1. bad inputs
    (base / "bad").mkdir()
    (base / "bad" / "text.png").write_text("not an image")
    (base / "bad" / "empty.jpg").write_bytes(b"")
    (base / "emptydata" / "a").mkdir(parents=True)
    (base / "cfg.toml").write_text("[train]\nepochs = 'many'\n")
    (base / "cfg2.toml").write_text("[nope]\nx = 1\n")
    (base / "afile").write_text("x")
    bad = {
        "missing data": ["train", base / "nope", "--out", base / "m1", *TINY],
        "data is a file": ["train", base / "afile", "--out", base / "m1", *TINY],
        "empty class folder": ["train", base / "emptydata", "--out", base / "m1", *TINY],
        "one class": ["train", extra / "x0", "--out", base / "m1", *TINY],
        "out is a file": ["train", data, "--out", base / "afile", *TINY],
        "out exists": ["train", data, "--out", model, *TINY],
        "bad config type": ["train", data, "--out", base / "m1", *TINY, "--config", base / "cfg.toml"],
        "unknown config section": ["train", data, "--out", base / "m1", *TINY, "--config", base / "cfg2.toml"],
        "unknown backbone": ["embed", data, "--backbone", "nope"],
        "bad device": ["embed", data, *TINY[:2], "--device", "tpu"],
        "missing weights file": ["embed", data, "--backbone", "tiny_cnn", "--weights", base / "w.pth"],
        "garbage weights file": ["embed", data, "--backbone", "tiny_cnn", "--weights", base / "afile"],
        "predict corrupt images": ["predict", model, base / "bad" / "text.png", base / "bad" / "empty.jpg", "--device", "cpu"],
        "predict missing file": ["predict", model, base / "nope.png", "--device", "cpu"],
        "predict top-k 0": ["predict", model, data / "c0", "--top-k", "0", "--device", "cpu"],
        "predict not a model": ["predict", data, data / "c0", "--device", "cpu"],
        "evaluate bad split": ["evaluate", model, data, "--split", "tset", "--device", "cpu"],
        "add-class no images": ["add-class", model, "new", base / "bad", "--device", "cpu"],
        "add-class blank name": ["add-class", model, "  ", extra / "x0", "--device", "cpu"],
        "add-class existing": ["add-class", model, "c0", extra / "x0", "--device", "cpu"],
        "remove unknown class": ["remove-class", model, "ghost"],
        "refresh unknown class": ["refresh", model, "ghost", "--device", "cpu"],
        "bad l2 grid": ["train", data, "--out", base / "m1", *TINY, "--l2-grid", "a,b"],
        "negative threads": ["--threads", "-1", "info", model],
    }
    for name, args in bad.items():
        record("bad input", name, ovr(*args, env=env))
    shutil.rmtree(base / "m1", ignore_errors=True)

    # 2. damaged model folders: each damage x each reading/writing command
    def damaged(fn) -> Path:
        d = base / "damaged"
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(model, d)
        fn(d)
        return d

    def edit(fn):
        def do(d: Path) -> None:
            m = json.loads((d / "manifest.json").read_text())
            (d / "manifest.json").write_text(json.dumps(fn(m)))
        return do

    def head_file(d: Path) -> Path:
        m = json.loads((d / "manifest.json").read_text())
        return d / m["heads"]["c0"]["file"]

    damages = {
        "manifest is a list": edit(lambda m: [m]),
        "schema_version alone": edit(lambda m: {"schema_version": 1}),
        "class without head": edit(lambda m: {**m, "classes": m["classes"] + ["ghost"]}),
        "no sha256": edit(lambda m: (m["heads"]["c0"].pop("sha256"), m)[1]),
        "threshold null": edit(lambda m: (m["heads"]["c0"].update(threshold=None), m)[1]),
        "absolute head path": edit(lambda m: (m["heads"]["c0"].update(file="/etc/hostname"), m)[1]),
        "escaping head path": edit(lambda m: (m["heads"]["c0"].update(file="../sentinel/notes.txt"), m)[1]),
        "stored cache_dir": edit(lambda m: (m.setdefault("config", {}).setdefault("features", {}).update(
            cache_dir=str(sentinel)), m)[1]),
        "truncated head file": lambda d: head_file(d).write_bytes(head_file(d).read_bytes()[:40]),
        "head file missing": lambda d: head_file(d).unlink(),
        "manifest not JSON": lambda d: (d / "manifest.json").write_text("{"),
        "manifest missing": lambda d: (d / "manifest.json").unlink(),
        "corrupt examples": lambda d: [p.write_text("{") for p in d.glob("examples-*.json")],
        "heads is a symlink out": lambda d: (shutil.rmtree(d / "heads"), (d / "heads").symlink_to(sentinel)),
        # issue 28's: damages that `info --verify` passed and other commands crashed on
        "backbone preprocess missing": edit(lambda m: (m["backbone"].pop("preprocess"), m)[1]),
        "backbone weights an int": edit(lambda m: (m["backbone"].update(weights=7), m)[1]),
        "backbone fingerprint missing": edit(lambda m: (m["backbone"].pop("fingerprint"), m)[1]),
        "calibration a string": edit(lambda m: (m["heads"]["c0"].update(calibration={"a": "x"}), m)[1]),
        "head created yesterday": edit(lambda m: (m["heads"]["c0"].update(created="yesterday"), m)[1]),
        "head weight [64, 2]": lambda d: _retensor(head_file(d), weight=(64, 2)),
        "head bias [3]": lambda d: _retensor(head_file(d), bias=(3,)),
        "examples without split": lambda d: _examples(d, lambda e: e.pop("split", None)),
        "examples integer label": lambda d: _examples(d, lambda e: e.update(label=3)),
    }
    commands = {
        "info --verify": lambda d: ["info", d, "--verify"],
        "predict": lambda d: ["predict", d, data / "c0" / "img000.png", "--device", "cpu"],
        "evaluate": lambda d: ["evaluate", d, data, "--device", "cpu"],
        "add-class": lambda d: ["add-class", d, "x1", extra / "x1", "--device", "cpu"],
        "refresh": lambda d: ["refresh", d, "--device", "cpu"],
        "remove-class": lambda d: ["remove-class", d, "c1"],
    }
    for dname, fn in damages.items():
        for cname, cmd in commands.items():
            d = damaged(fn)
            r = ovr(*cmd(d), env=env)
            record("damaged folder", f"{dname} / {cname}", r, {"refused": r.returncode == 2})

    # 3. kill -9 at a random moment of a writer; the model must stay openable, and whole
    for k in range(a.kills):
        args = (["train", extra, "--out", model, "--force", *TINY] if k % 2 == 0 else
                ["add-class", model, f"k{k}", extra / f"x{k % 6}", "--device", "cpu"])
        p = subprocess.Popen([sys.executable, "-m", "ovr", *map(str, args)], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        time.sleep(rng.uniform(1.0, 6.0))
        killed = p.poll() is None
        if killed:
            p.send_signal(signal.SIGKILL)
            counts["kills"] += 1
        out, errs = p.communicate()
        ok = verify(model, env)
        counts["models_lost"] += not ok
        r = subprocess.CompletedProcess(args, p.returncode, out, errs)
        record("kill -9", " ".join(map(str, args[:2])), r if not killed else None,
               {"killed": killed, "model_ok_after": ok})

    # 4. concurrent writers
    for k in range(3):
        procs = [subprocess.Popen([sys.executable, "-m", "ovr", *map(str, args)], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for args in (
            ["add-class", model, f"p{k}", extra / "x2", "--device", "cpu"],
            ["add-class", model, f"q{k}", extra / "x3", "--device", "cpu"],
            ["train", data, "--out", model, "--force", *TINY] if k == 1 else ["embed", extra, *TINY])]
        for pr in procs:
            out, errs = pr.communicate(timeout=600)
            record("concurrent", f"round {k}", subprocess.CompletedProcess([], pr.returncode, out, errs))
        ok = verify(model, env)
        counts["models_lost"] += not ok
        cases.append({"kind": "concurrent", "case": f"round {k} model", "model_ok_after": ok})

    # 5. the embedding cache, damaged under a model: answers must not change silently
    fresh = base / "fresh"
    assert ovr("train", data, "--out", fresh, *TINY, env=env).returncode == 0
    probe = [data / f"c{k}" / "img009.png" for k in range(4)]
    answer = lambda: ovr("predict", fresh, *probe, "--json", "--device", "cpu", env=env)  # noqa: E731
    want = answer().stdout
    shard_dir = next(p for p in (base / "cache").iterdir() if p.is_dir() and list(p.glob("shard-*")))

    def shards():
        return sorted(shard_dir.glob("shard-*.safetensors"))

    def rows_random(p: Path) -> None:
        import torch
        from safetensors import safe_open
        from safetensors.torch import load_file, save_file

        with safe_open(str(p), "pt") as f:
            meta = f.metadata()
        t = load_file(str(p))
        t["embeddings"] = torch.randn_like(t["embeddings"])
        save_file(t, str(p), metadata=meta)

    cache_damages = {
        "shard rows random": lambda: [rows_random(p) for p in shards()],
        "shard truncated": lambda: [p.write_bytes(p.read_bytes()[:100]) for p in shards()],
        "index out of range": lambda: _bad_index(shard_dir),
    }
    for name, fn in cache_damages.items():
        fn()
        r = answer()
        record("damaged cache", name, r)
        wrong = r.returncode == 0 and r.stdout != want
        counts["silently_wrong_answers"] += wrong
        cases[-1]["same_answers"] = r.stdout == want
    (base / "cachefile").write_text("x")
    record("damaged cache", "cache root is a file",
           ovr("embed", data, *TINY, "--cache-dir", base / "cachefile", env=env))

    # 6. output paths: never replaced if not a regular file, never inside a model folder, no folders created
    os.mkfifo(base / "fifo")
    outs = {
        "export to a FIFO": ["export", model, base / "fifo", "--heads-only"],
        "export into the model": ["export", model, model / "manifest.json", "--heads-only"],
        "export to a missing folder": ["export", model, base / "no" / "deep" / "x.onnx", "--heads-only"],
        "json-out into the model": ["evaluate", model, data, "--json-out", model / "manifest.json", "--device", "cpu"],
        "report into the model": ["evaluate", model, data, "--report", model / "rep", "--device", "cpu"],
    }
    for name, args in outs.items():
        r = ovr(*args, env=env)
        record("output path", name, r, {"refused": r.returncode == 2})
    counts["outputs_replaced_or_created"] = int(not (base / "fifo").is_fifo()) + int((base / "no").exists()) + \
        int((model / "rep").exists()) + int(not verify(model, env))

    # 7. manifests: aliases, conflicts, odd files
    (base / "img").mkdir()
    for i in range(4):
        shutil.copy(data / "c0" / f"img00{i}.png", base / "img" / f"{i}.png")
    manifests = {
        "alias in two splits": "path,labels,split\nimg/0.png,a,train\nimg/../img/0.png,a,test\nimg/1.png,b,train\n",
        "two label sets": "path,labels\nimg/0.png,a\nimg/./0.png,b\nimg/1.png,b\n",
        "header only": "path,labels\n",
        "a huge field": "path,labels\nimg/0.png," + "x" * 200_000 + "\nimg/1.png,b\n",
    }
    for name, text in manifests.items():
        (base / "m.csv").write_text(text)
        record("manifest", name, ovr("embed", base / "m.csv", *TINY, env=env))

    # 8. the Python API: every bad input an OvrError
    code = (
        "import numpy as np, ovr, sys\nfrom PIL import Image\n"
        "bad = [lambda: ovr.load(None), lambda: ovr.load(123)]\n"
        f"p = ovr.load({str(model)!r}, device='cpu')\n"
        "bad += [lambda x=x: p.predict(x) for x in (None, 42, b'..', '', np.zeros((8, 8, 5), np.uint8),"
        " np.zeros((0, 0, 3), np.uint8), Image.new('RGB', (0, 3)))]\n"
        f"bad += [lambda: p.predict([{str(data / 'c0' / 'img000.png')!r}], tta='3'),"
        f" lambda: p.predict([{str(data / 'c0' / 'img000.png')!r}], reject_below=2.0)]\n"
        "raw = 0\nfor f in bad:\n    try:\n        f()\n    except ovr.OvrError:\n        pass\n"
        "    except Exception as e:\n        raw += 1\n        print(type(e).__name__, e, file=sys.stderr)\n"
        "print(raw, len(bad))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    raw, total = map(int, r.stdout.split()[-2:])
    counts["python_api_raw_exceptions"] = raw
    record("python api", f"{total} bad inputs", r)

    # 9. the server: a chunked body over the limit, a pixel bomb, memory after near-cap requests
    counts.update(server(model, env, base))

    counts["files_outside_changed"] = sum(1 for k in set(before) | set(tree_hash(sentinel))
                                          if before.get(k) != tree_hash(sentinel).get(k))
    counts["damaged_refused_with_one_line"] = sum(1 for c in cases if c.get("refused"))
    counts["damaged_runs"] = sum(1 for c in cases if c["kind"] == "damaged folder")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"counts": counts, "cases": cases, "machine": machine_name()}, indent=1))
    print(json.dumps(counts, indent=1))
    shutil.rmtree(base, ignore_errors=True)


def _bad_index(shard_dir: Path) -> None:
    """An index whose rows point past their shard."""
    import io

    import numpy as np

    p = shard_dir / "index.npz"
    if not p.exists():
        from ovr.embedding.cache import EmbeddingCache

        EmbeddingCache(shard_dir.parent, shard_dir.name)._compact()
    with np.load(p) as z:
        keys, loc, names = z["keys"], z["loc"].copy(), z["shards"]
    loc[:, 1] += 10_000
    buf = io.BytesIO()
    np.savez(buf, keys=keys, loc=loc, shards=names)
    p.write_bytes(buf.getvalue())


def chunked(port: int, limit_mb: float = 5.0) -> dict:
    """A well-formed multipart upload whose file never ends, sent with Transfer-Encoding: chunked over a raw socket,
    256 KB at a time, until the server answers: how much was sent by then (the server read at most that) and the
    status it gave. Up to 2 GB."""
    import select
    import socket

    part = (b'--b\r\nContent-Disposition: form-data; name="files"; filename="big.png"\r\n'
            b"Content-Type: image/png\r\n\r\n")
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
                 b"Content-Type: multipart/form-data; boundary=b\r\n\r\n")
    sent, status = 0, None
    chunk = b"%x\r\n" % (1 << 18) + b"x" * (1 << 18) + b"\r\n"
    sock.sendall(b"%x\r\n" % len(part) + part + b"\r\n")
    try:
        while sent < 2000 * (1 << 20):
            if select.select([sock], [], [], 0)[0]:
                break
            sock.sendall(chunk)
            sent += 1 << 18
        reply = sock.recv(200).decode(errors="replace")
        status = reply.split(" ")[1] if reply.startswith("HTTP/") else reply[:40]
    except OSError as e:  # the server closed the connection after answering
        status = f"closed ({type(e).__name__})"
    finally:
        sock.close()
    return {"chunked_status": status, "chunked_mb_sent_before_refusal": sent / (1 << 20),
            "chunked_limit_mb": limit_mb}


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def server(model: Path, env, base: Path) -> dict:
    """`ovr serve` in a subprocess: bytes sent of a chunked 2 GB body before its 413 (--max-upload-mb 5), a 9000 x
    9000 PNG of a few KB, and RSS before, at peak and after 20 requests of 8 near-cap images (15.2 megapixels
    each: the request's pixel budget takes four of them, the others get their own error)."""
    import io

    import httpx
    import numpy as np
    from PIL import Image

    proc, url = start_server(model, "--device", "cpu", "--max-upload-mb", "5", env=env)
    port = int(url.rsplit(":", 1)[1])
    out: dict = {}
    try:
        out.update(chunked(port))
        buf = io.BytesIO()
        Image.new("1", (9000, 9000)).save(buf, "PNG")
        r = httpx.post(url + "/predict", files=[("files", ("bomb.png", buf.getvalue(), "image/png"))], timeout=60)
        out["pixel_bomb"] = r.json()["results"][0].get("error", "answered")[:80]
        out["pixel_bomb_kb"] = len(buf.getvalue()) / 1e3
        near = io.BytesIO()  # just under the per-image budget: 3,900 x 3,900 (15.2 megapixels), a smooth PNG
        ramp = np.linspace(0, 255, 3900, dtype=np.float32)
        Image.fromarray(np.stack([np.add.outer(ramp, ramp) / 2] * 3, -1).astype(np.uint8)).save(near, "PNG")
        files = [("files", (f"n{i}.png", near.getvalue(), "image/png")) for i in range(8)]
        base_rss = _rss_mb(proc.pid)
        peak = base_rss
        for _ in range(20):
            httpx.post(url + "/predict", files=files, timeout=120)
            peak = max(peak, _rss_mb(proc.pid))
        time.sleep(1)
        out.update(rss_baseline_mb=base_rss, rss_peak_mb=peak, rss_after_mb=_rss_mb(proc.pid),
                   near_cap_request_mb=8 * len(near.getvalue()) / 1e6)
    finally:
        proc.terminate()
        errs = proc.communicate(timeout=30)[1].decode(errors="replace")
        out["server_tracebacks"] = errs.count("Traceback")
    return out


if __name__ == "__main__":
    main()
