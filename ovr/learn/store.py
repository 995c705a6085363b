"""The model directory: manifest.json + one safetensors file per head + the training examples index.

A head file is a whole detector: its feature standardisation is folded into its weights (heads.Normalizer.fold),
so heads trained at different times on different data sit side by side and still run as one matmul.

Files other than manifest.json are content-addressed (their name carries their hash), so an update writes new
files beside the old ones and then swaps the manifest atomically: a crash at any point leaves the old model
readable, and an untouched head keeps the very same file (same bytes, same sha256).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ..version import __version__
from .aggregate import Gate
from ..errors import OvrError
from ..atomic import atomic_write_bytes
from .heads import Tensors
from .manifest import MANIFEST, SCHEMA_VERSION, check_can_write, model_lock, read_manifest, recover  # noqa: F401 (re-exported)
from .model import HeadRecord, Model, now
from .stats import FeatureMap, Stats



def head_filename(name: str, data: bytes) -> str:
    """Derived, never trusted: a safe ASCII stem, a hash of the exact name (case collisions differ), the content hash."""
    stem = re.sub(r"[^a-z0-9_-]+", "_", name.lower()).strip("_")[:32] or "class"
    return f"{stem}-{hashlib.sha256(name.encode()).hexdigest()[:10]}-{hashlib.sha256(data).hexdigest()[:16]}.safetensors"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _head_bytes(name: str, tensors: Tensors) -> bytes:
    # One metadata key: safetensors writes several in hash-map order, which changes from call to call, and then
    # the same head would get other bytes, another sha256 and another file name.
    return st_save({k: v.detach().cpu().contiguous().float() for k, v in tensors.items()},
                   metadata={"ovr-head": name})


def _blob(data: bytes, folder: Path, prefix: str, suffix: str) -> str:
    name = f"{prefix}-{_sha(data)[:16]}{suffix}"
    if not (folder / name).exists():
        atomic_write_bytes(folder / name, data)
    return name


def _write_files(model: Model, root: Path, changed: set[str] | None, old: dict | None) -> dict:
    """Write what changed (content-addressed) and return the manifest that points at it."""
    (root / "heads").mkdir(parents=True, exist_ok=True)
    heads = {}
    for c in model.classes:
        if old is not None and changed is not None and c not in changed and c in old["heads"]:
            heads[c] = old["heads"][c]  # untouched: same file, same bytes
            continue
        data = _head_bytes(c, model.heads[c])
        fname = head_filename(c, data)
        if not (root / "heads" / fname).exists():
            atomic_write_bytes(root / "heads" / fname, data)
        heads[c] = {**model.records[c].to_json(), "file": f"heads/{fname}", "sha256": _sha(data)}
    ex = json.dumps(model.examples, ensure_ascii=False).encode()
    gate = stats = None
    if model.gate is not None:
        g = model.gate
        data = st_save({"weight": g.weight.contiguous().float(), "bias": g.bias.contiguous().float()},
                       metadata={"ovr-gate": json.dumps(g.classes, ensure_ascii=False)})
        gate = {"file": _blob(data, root, "gate", ".safetensors"), "sha256": _sha(data), "classes": list(g.classes),
                "method": g.method, "strength": g.strength, "temperature": g.temperature,
                "projection": "stats" if g.projection is not None else None}
    if model.stats is not None:
        st = model.stats
        t = {"counts": st.counts, "sums": st.sums, "rows": st.rows.reshape(1), "total": st.total, "gram": st.gram}
        if st.features.projection is not None:
            t["projection"] = st.features.projection.float()
        if st.moments is not None:
            t["moments"] = st.moments
        data = st_save({k: v.contiguous() for k, v in t.items()}, metadata={"ovr-stats": "1"})
        stats = {"file": _blob(data, root, "stats", ".safetensors"), "sha256": _sha(data), "classes": list(st.classes),
                 "rows": float(st.rows), "features": st.dim}
    return {
        "schema_version": SCHEMA_VERSION, "ovr_version": __version__, "created": model.created, "updated": now(),
        "backbone": model.backbone, "head_type": model.head_type, "calibration": model.calibration,
        "normalize": model.normalize,
        "examples": {"file": _blob(ex, root, "examples", ".json"), "sha256": _sha(ex), "count": len(model.examples)},
        "classes": list(model.classes), "heads": heads, "gate": gate, "stats": stats, "config": model.config,
    }


def _prune(root: Path, manifest: dict) -> None:
    """Delete files the manifest no longer names (left by a replaced head or an interrupted update)."""
    keep = {h["file"] for h in manifest["heads"].values()} | {manifest["examples"]["file"]}
    for part in ("gate", "stats"):
        if manifest.get(part):
            keep.add(manifest[part]["file"])
    for p in [*root.glob("heads/*"), *root.glob("examples-*"), *root.glob("gate-*"), *root.glob("stats-*")]:
        rel = p.relative_to(root).as_posix()
        if rel not in keep and not p.is_symlink() and p.parent.resolve() in (root.resolve(), (root / "heads").resolve()):
            p.unlink(missing_ok=True)


# A test hook: raise right after the first rename of a replace, as a kill there would stop it.
_CRASH_BETWEEN_RENAMES = "OVR_TEST_CRASH_BETWEEN_RENAMES"


def save_model(model: Model, out: str | Path, force: bool = False, config_toml: str | None = None) -> dict:
    """A whole new model: built in a temp folder beside OUT and renamed into place (never half-written), under the
    same lock as every other writer of OUT."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with model_lock(out, must_exist=False):
        recover(out)
        check_can_write(out, force)
        tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            manifest = _write_files(model, tmp, None, None)
            if config_toml is not None:
                atomic_write_bytes(tmp / "config.toml", config_toml.encode())
            atomic_write_bytes(tmp / MANIFEST, json.dumps(manifest, indent=2, ensure_ascii=False).encode())
            if out.exists():
                old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
                os.replace(out, old)
                if os.environ.get(_CRASH_BETWEEN_RENAMES):
                    raise SystemExit("crash between renames (test hook)")
                os.replace(tmp, out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, out)
        finally:
            if tmp.exists() and out.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        recover(out)  # temp folders an earlier, killed train left beside OUT
    return manifest


def update_model(model: Model, root: str | Path, changed: set[str]) -> dict:
    """Rewrite only the heads in `changed` (and the examples index), then swap the manifest atomically.
    Call it while holding `model_lock(root)`."""
    root = Path(root)
    old = read_manifest(root)
    manifest = _write_files(model, root, changed, old)
    atomic_write_bytes(root / MANIFEST, json.dumps(manifest, indent=2, ensure_ascii=False).encode())
    _prune(root, manifest)
    return manifest


def _check_head_tensors(c: str, t: dict, head_type: str, dim: int) -> None:
    want = {"linear": {"weight", "bias"}, "ridge": {"weight", "bias"}, "mlp": {"w1", "b1", "w2", "b2"}}[head_type]
    if set(t) != want:
        raise OvrError(f"head of class {c!r} holds tensors {sorted(t)}, expected {sorted(want)}")
    w = t["w1" if head_type == "mlp" else "weight"]
    if w.ndim != (2 if head_type == "mlp" else 1) or w.shape[0] != dim:
        raise OvrError(f"head of class {c!r} has a weight of shape {list(w.shape)}; expected "
                       f"{[dim, 'hidden'] if head_type == 'mlp' else [dim]}")
    if head_type == "mlp":
        shapes = {"b1": [w.shape[1]], "w2": [w.shape[1]], "b2": []}
    else:
        shapes = {"bias": []}
    for k, want_shape in shapes.items():
        if list(t[k].shape) not in (want_shape, want_shape or [1]):
            raise OvrError(f"head of class {c!r} has {k} of shape {list(t[k].shape)}; expected {want_shape}")
    if not all(bool(torch.isfinite(v).all()) for v in t.values()):
        raise OvrError(f"head of class {c!r} has NaN or infinite weights")


def _inside(root: Path, rel) -> Path:
    """A path the manifest names, only if it stays inside the model folder (no absolute paths, no '..', no
    symlink leading out): a crafted manifest must not make ovr read or write elsewhere."""
    if not isinstance(rel, str) or not rel or Path(rel).is_absolute() or ".." in Path(rel).parts:
        raise OvrError(f"{root / MANIFEST} names a file outside the model folder: {rel!r}")
    p = root / rel
    if not p.resolve().is_relative_to(root.resolve()):
        raise OvrError(f"{root / MANIFEST}: {rel!r} leads outside the model folder (symlink)")
    return p


def _read_verified(root: Path, rel: str, sha: str, what: str) -> bytes:
    p = _inside(root, rel)
    if not p.is_file():
        raise _Superseded(f"{what} is missing: {p}")
    data = p.read_bytes()
    if _sha(data) != sha:
        raise OvrError(f"{what} is corrupt (sha256 mismatch): {p}")
    return data


class _Superseded(OvrError):
    """A file the manifest names is gone: a writer may have swapped the manifest and pruned it since we read."""


def load_model(root: str | Path, manifest: dict | None = None) -> Model:
    """Read and verify every file against the manifest's sha256. A reader racing an update can read the old
    manifest and then find one of its files already pruned: it then reads the new manifest once more, so it sees
    the old model or the new one, never an error or a mix. (`manifest`: one read earlier, for that test.)"""
    root = Path(root)
    m = manifest if manifest is not None else read_manifest(root)
    try:
        return _load_files(root, m)
    except _Superseded:
        fresh = read_manifest(root)
        if fresh == m:
            raise
        return _load_files(root, fresh)


def _load_files(root: Path, m: dict) -> Model:
    heads, records = {}, {}
    raw = {c: dict(m["heads"][c]) for c in m["classes"]}
    legacy = _legacy_trained_with(raw)
    for c in m["classes"]:
        rec = raw[c]
        data = _read_verified(root, rec.pop("file"), rec.pop("sha256"), f"head of class {c!r}")
        try:
            heads[c] = st_load(data)
        except Exception as e:  # safetensors raises its own error types on malformed bytes
            raise OvrError(f"head of class {c!r} is not a safetensors file: {e}") from None
        _check_head_tensors(c, heads[c], m["head_type"], m["stats"]["features"] if m["head_type"] == "ridge"
                            else m["backbone"]["dim"])
        try:
            records[c] = _record(rec, legacy.get(c))
        except TypeError as e:
            raise OvrError(f"{root / MANIFEST} is damaged: head {c!r}: {e}") from None
    e = m["examples"]
    try:
        examples = json.loads(_read_verified(root, e["file"], e["sha256"], "training examples index"))
        assert isinstance(examples, list) and all(
            isinstance(x, dict) and isinstance(x.get("key"), str)
            and (x.get("label") is None or isinstance(x["label"], str))  # None: an extra negative
            and x.get("split") in ("train", "val", "test")
            and all(isinstance(v, str) for v in x.get("labels", [])) for x in examples)
    except (json.JSONDecodeError, UnicodeDecodeError, AssertionError):
        raise OvrError(f"the training examples index of {root} is corrupt (each example needs a key, a label and a "
                       f"split)") from None
    stats = gate = None
    if m.get("stats"):
        s = m["stats"]
        t = st_load(_read_verified(root, s["file"], s["sha256"], "statistics"))
        stats = Stats(list(s["classes"]), t["counts"], t["sums"], t["rows"].reshape(()), t["total"], t["gram"],
                      FeatureMap(t.get("projection")), t.get("moments"))
    if m.get("gate"):
        g = m["gate"]
        t = st_load(_read_verified(root, g["file"], g["sha256"], "gate"))
        strength = g.get("strength", g.get("shrinkage"))  # gates written before the softmax gate: an LDA's shrinkage
        proj = stats.features.projection if g.get("projection") == "stats" and stats is not None else None
        gate = Gate(list(g["classes"]), t["weight"], t["bias"], g.get("method", "lda"), float(strength),
                    float(g["temperature"]), proj)
    return Model(m["backbone"], m["normalize"], m["head_type"], list(m["classes"]), heads, records, examples,
                 m.get("calibration", "platt"), m.get("config", {}), m["created"], gate, stats,
                 m.get("config", {}).get("train", {}).get("gate", "ridge"))


# Heads trained by one `ovr train` call were written microseconds apart; a head added later, seconds or more after.
SAME_RUN_SECONDS = 5.0


def _legacy_trained_with(raw: dict[str, dict]) -> dict[str, list[str]]:
    """Manifests written before `trained_with` existed: a head saw every class whose head existed when it was
    trained, i.e. was created no later than it (heads of one training run count as one moment). Said in `ovr info`."""
    if all("trained_with" in r for r in raw.values()):
        return {}
    import datetime as dt

    when = {c: dt.datetime.fromisoformat(r["created"]).timestamp() for c, r in raw.items()}
    return {c: [k for k in raw if when[k] <= when[c] + SAME_RUN_SECONDS] for c in raw if "trained_with" not in raw[c]}


_OLD_KEYS = {"best_epoch": "iterations"}


def _record(rec: dict, legacy_trained_with: list[str] | None) -> HeadRecord:
    rec = {_OLD_KEYS.get(k, k): v for k, v in rec.items()}
    if legacy_trained_with is not None:
        rec["trained_with"], rec["trained_with_inferred"] = legacy_trained_with, True
    rec.setdefault("solver", "adam")
    return HeadRecord.from_json(rec)
