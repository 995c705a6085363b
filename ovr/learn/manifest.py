"""The model folder's manifest without torch: locate, recover, lock, read and check it. `ovr info` needs only this,
so it never pays for importing torch."""
from __future__ import annotations

import json
import math
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from ..atomic import check_writable
from ..config import HEADS
from ..errors import OvrError, read_parsed
from .records import HeadRecord

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


def recover(out: Path) -> None:
    """Finish or undo an interrupted `train --force` replace. It renames OUT to .OUT.old-* and then .OUT.tmp-* to
    OUT; a crash between the two leaves no model at OUT. The next command that opens OUT puts the old model back;
    leftover temp folders and old copies are removed once OUT is whole. Call it while holding the model's lock."""
    olds = sorted(out.parent.glob(f".{out.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if not out.exists() and olds and (olds[-1] / MANIFEST).is_file():
        os.replace(olds.pop(), out)
    if out.exists():
        for p in olds + list(out.parent.glob(f".{out.name}.tmp-*")):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
        for folder in (out, out / "heads"):  # atomic writes' temp files (.NAME.HEX.tmp) of a writer that died
            for p in folder.glob(".*.tmp"):
                if p.is_file() and not p.is_symlink():
                    p.unlink(missing_ok=True)


def _lock_path(root: Path) -> str:
    return str(root.parent / f".{root.name}.lock")


def _recover_if_interrupted(root: Path) -> None:
    """No folder at ROOT but an old copy beside it: a replace was cut short; put the model back, under the lock."""
    if not root.exists() and any(root.parent.glob(f".{root.name}.old-*")):
        with model_lock(root, must_exist=False):
            recover(root)


@contextmanager
def model_lock(root: str | Path, timeout: float | None = None, must_exist: bool = True):
    """One writer at a time per model folder (add-class, refresh, remove-class and train --force alike): a second
    waits for the first, then sees its result. The lock file sits beside the folder, so replacing the whole folder
    keeps it. $OVR_LOCK_TIMEOUT sets how long to wait (default 600 s)."""
    from filelock import FileLock, Timeout

    root = Path(root)
    if must_exist:
        _recover_if_interrupted(root)
        if not (root / MANIFEST).is_file():
            raise OvrError(f"not an ovr model (no {MANIFEST}): {root}")
    timeout = float(os.environ.get("OVR_LOCK_TIMEOUT", 600)) if timeout is None else timeout
    lock = FileLock(_lock_path(root))
    try:
        lock.acquire(timeout=timeout)
    except Timeout:
        raise OvrError(f"{root} is locked by another ovr process (waited {timeout:.0f} s); try again later") from None
    except OSError as e:
        raise OvrError(f"cannot lock {root}: {e.strerror or e} (the lock file {_lock_path(root)} goes beside it)") from None
    try:
        if root.is_dir():
            recover(root)  # the lock is ours: any temp file or folder left here is a dead writer's
        yield
    finally:
        lock.release()


def check_can_write(out: Path, force: bool) -> None:
    """Without --force only a new folder may become a model; with it, also an empty folder or an ovr model.
    The folder it goes in must be writable (a model is built beside OUT and renamed into place)."""
    if out.is_file():
        raise OvrError(f"--out {out} is a file; give a folder for the model")
    check_writable(out.parent, "cannot write the model: folder")
    if out.exists() and not force:
        raise OvrError(f"{out} exists; pass --force to overwrite it")
    if out.exists() and not (out / MANIFEST).is_file() and any(out.iterdir()):
        raise OvrError(f"{out} exists and is not an ovr model; refusing to overwrite it")


def check_confined(root: Path) -> None:
    """Refuse a model folder whose heads/ (or any file in it) is a symlink leading out of the folder: cleanup
    would otherwise delete files elsewhere, and reads would reveal them."""
    inside = root.resolve()
    for p in [root / "heads", *((root / "heads").iterdir() if (root / "heads").is_dir() else [])]:
        if p.is_symlink() and not p.resolve().is_relative_to(inside):
            raise OvrError(f"{p} is a symlink leading out of the model folder; refusing to use this model")


def read_manifest(root: str | Path) -> dict:
    root = Path(root)
    p = root / MANIFEST
    _recover_if_interrupted(root)
    if not root.is_dir():
        raise OvrError(f"model folder not found: {root}")
    check_confined(root)
    m = read_parsed(p, json.loads, (json.JSONDecodeError,), missing=f"not an ovr model (no {MANIFEST}): {root}",
                    invalid=f"{p} is corrupt")
    if not isinstance(m, dict) or not isinstance(m.get("schema_version"), int):
        raise OvrError(f"{p} has no schema_version; not an ovr model")
    v = m["schema_version"]
    if v > SCHEMA_VERSION:
        raise OvrError(f"{root} was written by a newer ovr (schema {v}, this ovr reads up to {SCHEMA_VERSION}); upgrade ovr")
    problem = manifest_problem(m)
    if problem:
        raise OvrError(f"{p} is damaged: {problem}")
    return m


_NUM = (int, float)
GATE_METHODS = {"lda": "a shrinkage LDA, one shared covariance (from the model's statistics: exact under growth)",
                "ridge": "a ridge regression solved from the model's statistics (exact under growth)",
                "softmax": "a softmax regression refit on the embeddings"}
_RECORD_KEYS = set(HeadRecord.__dataclass_fields__) | {"file", "sha256", "best_epoch"}
_HEAD_KEYS = {"file": str, "sha256": str, "threshold": _NUM, "positives": int, "negatives": int, "l2": _NUM,
              "calibration": dict}


def manifest_problem(m: dict) -> str | None:
    """The first thing wrong with a manifest's structure, in words, or None (types and required keys; the
    files it names are checked when they are read)."""
    for key, typ in (("classes", list), ("heads", dict), ("backbone", dict), ("examples", dict), ("head_type", str),
                     ("normalize", str), ("created", str)):
        if not isinstance(m.get(key), typ):
            return f"{key!r} is missing or not a {typ.__name__}"
    if m["head_type"] not in HEADS or m["normalize"] not in ("standardize", "l2"):
        return f"unknown head type {m['head_type']!r} or normalisation {m['normalize']!r}"
    b = m["backbone"]
    if not isinstance(b.get("dim"), int) or not isinstance(b.get("name"), str):
        return "the backbone has no name or dim"
    for key in ("weights", "fingerprint", "preprocess"):
        if not isinstance(b.get(key), str):
            return f"the backbone's {key!r} is missing or not a string"
    if b.get("decode", "pil") not in ("pil", "tensor") or b.get("frame", "crop") not in ("crop", "full"):
        return f"the backbone's decode {b.get('decode')!r} or frame {b.get('frame')!r} is not one ovr knows"
    try:
        from datetime import datetime

        datetime.fromisoformat(m["created"])
    except ValueError:
        return f"created {m['created']!r} is not a date and time"
    if not all(isinstance(c, str) for c in m["classes"]) or len(set(m["classes"])) != len(m["classes"]):
        return "class names must be distinct strings"
    for c in m["classes"]:
        h = m["heads"].get(c)
        if not isinstance(h, dict):
            return f"class {c!r} has no head entry"
        for key, typ in _HEAD_KEYS.items():
            if not isinstance(h.get(key), typ) or isinstance(h.get(key), bool):
                return f"head {c!r}: {key!r} is missing or not {'a number' if typ is _NUM else 'a ' + typ.__name__}"
        if not 0 <= h["threshold"] <= 1:
            return f"head {c!r}: threshold {h['threshold']} is outside [0, 1]"
        cal = h["calibration"]
        if not (cal.get("kind", "none") in ("platt", "temperature", "none")
                and all(isinstance(cal.get(k, 0.0), _NUM) and not isinstance(cal.get(k, 0.0), bool)
                        and math.isfinite(cal.get(k, 0.0)) for k in ("a", "b"))):
            return f"head {c!r}: calibration {cal!r} is not a kind with finite numbers a and b"
        created = h.get("created")
        if created is not None:
            try:
                from datetime import datetime

                datetime.fromisoformat(created)
            except (TypeError, ValueError):
                return f"head {c!r}: created {created!r} is not a date and time"
        unknown = set(h) - _RECORD_KEYS
        if unknown:
            return f"head {c!r}: unknown key {sorted(unknown)[0]!r}"
        tw = h.get("trained_with")
        if tw is not None and not (isinstance(tw, list) and all(isinstance(x, str) for x in tw)):
            return f"head {c!r}: trained_with must be a list of class names"
    e = m["examples"]
    if not isinstance(e.get("file"), str) or not isinstance(e.get("sha256"), str):
        return "the examples entry has no file or sha256"
    g = m.get("gate")
    if g is not None and not (isinstance(g, dict) and isinstance(g.get("file"), str) and isinstance(g.get("sha256"), str)
                              and isinstance(g.get("classes"), list)):
        return "the gate entry has no file, sha256 or classes"
    if g is not None:
        strength = g.get("strength", g.get("shrinkage"))  # "shrinkage": gates written before the softmax gate
        if not (isinstance(strength, _NUM) and isinstance(g.get("temperature"), _NUM)
                and g.get("method", "lda") in GATE_METHODS):
            return "the gate entry has no valid method, strength or temperature"
        if g.get("projection") == "stats" and not m.get("stats"):
            return "the gate reads the statistics, and there are none"
    st = m.get("stats")
    if st is not None and not (isinstance(st, dict) and isinstance(st.get("file"), str)
                               and isinstance(st.get("sha256"), str) and isinstance(st.get("classes"), list)
                               and all(isinstance(c, str) for c in st["classes"])
                               and isinstance(st.get("features"), int) and not isinstance(st.get("features"), bool)):
        return "the statistics entry has no file, sha256, classes or features"
    if m["head_type"] == "ridge" and st is None:
        return "a model of ridge heads has no statistics"
    if not isinstance(m.get("config", {}), dict):
        return "config is not a table"
    return None
