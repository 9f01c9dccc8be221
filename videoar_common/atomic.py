"""Atomic writes and commit markers, shared by every stage that writes durable state.

Rule (from torchtitan/Megatron practice): a directory of results (checkpoint, shard partition)
counts only once its marker file is written, last. Readers look for the marker, never at mtimes,
so a crash mid-write leaves the previous committed state in use. Single files are written to a
temporary name in the same directory and renamed, which is atomic on POSIX file systems.
:func:`save_committed_step` is the one save protocol of both trainers' ``step_XXXXXXXX`` checkpoints
(its halves :func:`open_step_dir` and :func:`commit_step_dir` serve the AR trainer's asynchronous saves).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

COMMIT_MARKER = "COMMITTED"


def fsync_dir(path: str | Path) -> None:
    """Flush ``path``'s directory entries (a rename or a new file inside it) to disk; best effort where
    the file system cannot open a directory."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same directory, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp creates 0600; results are meant to be shared
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def mark_committed(directory: str | Path, info: dict | None = None) -> None:
    """Write the commit marker into ``directory``; call this after everything else is on disk."""
    atomic_write_json(Path(directory) / COMMIT_MARKER, info or {})


def is_committed(directory: str | Path) -> bool:
    return (Path(directory) / COMMIT_MARKER).is_file()


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


_STEP_RE = re.compile(r"^step_(\d+)$")


def committed_steps(root: str | Path) -> list[int]:
    """Steps of the committed ``step_XXXXXXXX`` directories under ``root``, ascending."""
    root = Path(root)
    if not root.is_dir():
        return []
    steps = []
    for child in root.iterdir():
        m = _STEP_RE.match(child.name)
        if m and child.is_dir() and is_committed(child):
            steps.append(int(m.group(1)))
    return sorted(steps)


def latest_committed(root: str | Path) -> Path | None:
    """The committed step directory with the highest step, or None."""
    steps = committed_steps(root)
    return Path(root) / step_dir_name(steps[-1]) if steps else None


def prune_keep_last(root: str | Path, keep: int) -> list[Path]:
    """Delete committed step directories beyond the newest ``keep`` and stale uncommitted ones
    older than the newest committed step. Returns what was removed."""
    if keep <= 0:
        return []
    root = Path(root)
    steps = committed_steps(root)
    removed = []
    for step in steps[:-keep]:
        target = root / step_dir_name(step)
        shutil.rmtree(target, ignore_errors=True)
        removed.append(target)
    newest = steps[-1] if steps else None
    if newest is not None and root.is_dir():
        for child in root.iterdir():
            m = _STEP_RE.match(child.name)
            if m and int(m.group(1)) < newest and not is_committed(child):
                shutil.rmtree(child, ignore_errors=True)
                removed.append(child)
    return removed


def open_step_dir(root: str | Path, step: int, ctx) -> Path:
    """Collective first half of the save protocol: rank 0 removes a leftover directory of this step (a
    crash before its commit, or an earlier save of the same step) and creates it; returns its path once
    every rank can write into it. ``ctx`` is the run's :class:`~videoar_common.distributed.DistContext`."""
    path = Path(root) / step_dir_name(step)
    if ctx.is_main:
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
    ctx.barrier()
    return path


def commit_step_dir(root: str | Path, step: int, ctx, *, keep_last: int,
                    before_commit: Callable[[Path], None] | None = None) -> Path:
    """Collective second half, called by every rank once its own files of the step are whole: after a
    barrier (so every rank's are), ``before_commit(path)`` runs on every rank (fault-injection drills),
    then rank 0 writes the commit marker and prunes to the newest ``keep_last`` (0 = keep all).

    Pruning runs only here, after the new step is committed, so it never removes the newest committed
    checkpoint while a newer one is still being written (an asynchronous save commits later)."""
    path = Path(root) / step_dir_name(step)
    ctx.barrier()
    if before_commit is not None:
        before_commit(path)
    if ctx.is_main:
        mark_committed(path, {"step": step})
        prune_keep_last(root, keep_last)
    ctx.barrier()
    return path


def save_committed_step(root: str | Path, step: int, ctx, write: Callable[[Path], None], *, keep_last: int,
                        before_commit: Callable[[Path], None] | None = None) -> Path:
    """Collective save of ``<root>/step_XXXXXXXX``, the protocol of both trainers' checkpoints:
    :func:`open_step_dir`, every rank calls ``write(path)``, then :func:`commit_step_dir`. (The AR
    trainer's asynchronous saves run the same two halves with the write in between done in the
    background.)"""
    path = open_step_dir(root, step, ctx)
    write(path)
    return commit_step_dir(root, step, ctx, keep_last=keep_last, before_commit=before_commit)
