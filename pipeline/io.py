"""Small helpers shared by every stage: atomic JSON writes, content hashes, flat keys, and the
only way a stage deletes an output folder (one it can prove it wrote)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mapping -> {'a.b.c': value}: MLflow params and metrics, and ``load_params``
    overrides, are flat."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """Streamed SHA-256 of a file, so multi-GB shards never sit in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_json(path: str | Path, payload: Any) -> Path:
    """Write JSON atomically (temp file + rename): a crash never leaves a truncated file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------- output folders

OWNER_MARKER = ".sparseclip-output"


class UnsafeOutputError(ValueError):
    """An output folder the pipeline must not write or delete: outside the project, not its own."""


class BusyError(RuntimeError):
    """Another process holds the lock of the work asked for (the same training, running now)."""


def claim_output_dir(path: str | Path, stage: str) -> Path:
    """Create ``path`` (with parents) and mark it as written by ``stage``: the marker is the proof
    :func:`remove_output_dir` asks for before it deletes anything."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / OWNER_MARKER).write_text(json.dumps({"stage": stage}) + "\n")
    return path


def is_owned_output(path: str | Path) -> bool:
    """True when ``path`` is a real folder (not a link) that holds the pipeline's marker."""
    path = Path(path)
    return path.is_dir() and not path.is_symlink() and (path / OWNER_MARKER).is_file()


def check_output_dir(path: str | Path) -> Path:
    """Fail before any work when ``path`` cannot be (re)written: it exists and is not a folder the
    pipeline wrote (a non-empty folder without the marker, a file, a link), or its nearest existing
    folder is not writable. Returns the path."""
    path = Path(path)
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise UnsafeOutputError(f"output folder {path} is a link or a file, not a folder this pipeline wrote; "
                                "move it away or choose another out_dir")
    if path.is_dir() and not is_owned_output(path) and any(path.iterdir()):
        raise UnsafeOutputError(f"output folder {path} holds files this pipeline did not write (no {OWNER_MARKER} "
                                "marker), so it will not replace them; empty or move it, or choose another out_dir")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise UnsafeOutputError(f"output folder {path} cannot be created: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UnsafeOutputError(f"output folder {path} cannot be written: {existing} is not writable")
    return path


def remove_output_dir(path: str | Path) -> None:
    """Delete a folder the pipeline wrote (its marker is inside) or an empty one; refuse anything
    else, so that no params value can make a stage delete code, data or a repository."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    check_output_dir(path)
    shutil.rmtree(path)


@contextmanager
def staged_output_dir(out_dir: str | Path, stage: str) -> Iterator[Path]:
    """A fresh staging folder beside ``out_dir``, marked as ``stage``'s, that replaces ``out_dir``
    whole when the block succeeds (two renames; the old folder, checked to be the pipeline's, is
    removed last). On any error the staging folder goes and ``out_dir`` stays as it was: an
    interrupted or failed stage (a full disk) leaves neither a half-written output nor a mix of
    old and new files."""
    out_dir = check_output_dir(out_dir)
    staging = out_dir.with_name(f".{out_dir.name}.staging")
    remove_output_dir(staging)
    claim_output_dir(staging, stage)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # ours: claimed above
        raise
    previous = out_dir.with_name(f".{out_dir.name}.previous")
    remove_output_dir(previous)
    if out_dir.exists():
        check_output_dir(out_dir)
        out_dir.rename(previous)
    staging.rename(out_dir)
    remove_output_dir(previous)


@contextmanager
def exclusive_lock(path: str | Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing) for the block, or fail at once,
    naming ``what`` and the holder's pid, when another process holds it: two runs of one training
    at once would share its checkpoints and output folder."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise BusyError(f"{what} is already running (pid {holder} holds {path}); wait for it to "
                               "finish or stop it") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
