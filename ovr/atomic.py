"""Atomic file writes (temp + fsync + rename), torch-free so that the CLI's cheap paths can use them."""
from __future__ import annotations

import os
import uuid
from pathlib import Path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Temp file in the same folder, fsync, rename: readers see the old file or the new one, never a half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()



def check_writable(folder: Path, what: str) -> None:
    """Fail early, in one line, when `folder` (or, if it does not exist yet, the nearest folder above it) cannot
    take a new file: tried for real with a probe file, since permission bits do not tell (root, read-only mounts,
    immutable folders). Used before any embedding or training work."""
    from .errors import OvrError

    p = Path(folder)
    while not p.exists() and p != p.parent:
        if p.is_symlink():
            raise OvrError(f"{what} {folder}: {p} is a broken symlink")
        p = p.parent
    if not p.is_dir():
        raise OvrError(f"{what} {folder}: {p} is a file, not a folder")
    probe = p / f".ovr-probe-{uuid.uuid4().hex[:8]}"
    try:
        probe.touch(exist_ok=False)
        probe.unlink()
    except OSError as e:
        raise OvrError(f"{what} {folder} is not writable ({e.strerror or e}; {p})") from None
