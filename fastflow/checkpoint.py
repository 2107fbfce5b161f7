"""Checkpoints written atomically, read back with clear errors.

A checkpoint is a dict saved with ``torch.save``. :func:`save_checkpoint` writes it to a
temporary file in the destination folder, flushes and fsyncs it, then ``os.replace``-s it over
the destination (atomic on POSIX and Windows), and fsyncs the folder: a run killed at any moment
leaves either the old checkpoint or the new one, never a torn file.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import torch

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "FORMAT", "VERSION"]

FORMAT = "fastflow-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated, corrupt, or not a fastflow checkpoint."""


def save_checkpoint(obj: dict[str, Any], path: str | os.PathLike) -> None:
    """Atomically write ``obj`` (a dict; ``format``/``version`` keys are added) to ``path``.

    Example:
        >>> import tempfile, os
        >>> d = tempfile.mkdtemp()
        >>> save_checkpoint({"step": 3}, os.path.join(d, "last.pt"))
        >>> load_checkpoint(os.path.join(d, "last.pt"))["step"]
        3

    Reference: the write-fsync-rename pattern of POSIX ``rename(2)`` atomicity.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    payload = {"format": FORMAT, "version": VERSION, **obj}
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:  # e.g. directories cannot be opened on Windows
        pass


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Loads with ``weights_only=True`` (no arbitrary code runs from the file).

    Raises:
        CheckpointError: the file is missing, truncated or corrupt, or not a fastflow checkpoint.

    Example:
        >>> load_checkpoint("/nonexistent.pt")
        Traceback (most recent call last):
        ...
        fastflow.checkpoint.CheckpointError: checkpoint not found: /nonexistent.pt
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        msg = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: truncated or corrupt checkpoint ({msg})") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a fastflow checkpoint")
    if obj.get("version", 0) > VERSION:
        raise CheckpointError(
            f"{path}: checkpoint version {obj.get('version')} is newer than this fastflow "
            f"(reads up to {VERSION})"
        )
    return obj
