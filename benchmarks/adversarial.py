"""The adversarial trial of issue 11, re-runnable: bad inputs, damaged model folders, kill -9 at random moments,
concurrent writers. Counts tracebacks, files outside the model folders touched, and models lost.

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

TINY = ["--backbone", "tiny_cnn", "--device", "cpu", "--workers", "0"]


def ovr(*args, env=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ovr", *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=timeout)


def tree_hash(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()}


def verify(model: Path, env) -> bool:
    return ovr("info", model, "--verify", env=env).returncode == 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/adversarial.json"))
    ap.add_argument("--kills", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    rng = random.Random(a.seed)
    base = Path(tempfile.mkdtemp(prefix="ovr-adv-"))
    env = {**os.environ, "OVR_CACHE_DIR": str(base / "cache"), "OVR_LOCK_TIMEOUT": "120"}
    data = make_folder(base / "data", n_classes=4, per_class=10)
    extra = make_folder(base / "extra", n_classes=6, per_class=8, prefix="x")
    sentinel = base / "sentinel"
    make_folder(sentinel, n_classes=2, per_class=3, prefix="keep")
    (sentinel / "notes.txt").write_text("must never change")
    before = tree_hash(sentinel)
    counts = {"runs": 0, "tracebacks": 0, "nonzero_without_message": 0, "models_lost": 0, "kills": 0}
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

    counts["files_outside_changed"] = sum(1 for k in set(before) | set(tree_hash(sentinel))
                                          if before.get(k) != tree_hash(sentinel).get(k))
    counts["damaged_refused_with_one_line"] = sum(1 for c in cases if c.get("refused"))
    counts["damaged_runs"] = sum(1 for c in cases if c["kind"] == "damaged folder")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"counts": counts, "cases": cases, "machine": f"{os.cpu_count()} cores"}, indent=1))
    print(json.dumps(counts, indent=1))
    shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
