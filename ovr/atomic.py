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
    except OSError as e:  # name the file the user knows (a full disk said nothing of where)
        raise OSError(e.errno, e.strerror, str(path)) from e
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


def inside_model(path: Path) -> Path | None:
    """The model folder `path` is in (or is), if any: a folder above it holding an ovr manifest."""
    for d in [path, *path.parents]:
        if (d / "manifest.json").is_file() and (d / "heads").is_dir():
            return d
    return None


def check_output_file(path: str | Path, what: str) -> Path:
    """Where a user-named output file may be written, or a one-line OvrError: only a regular file (a device, a FIFO
    or a folder at the path is refused, never replaced), never inside a model folder (a report or export there
    could replace a model's own files), and in a folder that exists (not created). A symlink is followed: the
    file it points to is the one written, and that path is returned."""
    from .errors import OvrError

    p = Path(path)
    target = p.resolve() if p.is_symlink() else p
    if target.exists() and not target.is_file():
        kind = ("a folder" if target.is_dir() else "a FIFO" if target.is_fifo() else
                "a device" if target.is_char_device() or target.is_block_device() else "not a regular file")
        raise OvrError(f"{what} {p}: it is {kind}; give the path of a regular file")
    if not target.parent.is_dir():
        raise OvrError(f"{what} {p}: the folder {target.parent} does not exist")
    model = inside_model(target.parent.resolve())
    if model is not None:
        raise OvrError(f"{what} {p}: that is inside the model folder {model}; write it elsewhere")
    check_writable(target.parent, what)
    return target


def check_output_folder(path: str | Path, what: str) -> None:
    """A user-named output folder (a report): not inside a model folder, and writable."""
    from .errors import OvrError

    p = Path(path)
    model = inside_model(p.resolve() if p.exists() else p.parent.resolve())
    if model is not None or (p.exists() and inside_model(p.resolve())):
        raise OvrError(f"{what} {p}: that is inside the model folder {model or p}; write it elsewhere")
    check_writable(p, what)
