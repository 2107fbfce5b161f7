"""Checkpoints written atomically, read back with clear errors.

A checkpoint is a dict saved with ``torch.save``. :func:`save_checkpoint` writes it to a
temporary file in the destination folder (``.tmp-XXXXXXXX.pt``, created with mode ``0o666``
less the umask, like any other file the process writes), flushes and fsyncs it, then
``os.replace``-s it over the destination (atomic on POSIX and Windows), and fsyncs the folder: a
run killed at any moment leaves either the old checkpoint or the new one, never a torn file. A
kill mid-write can leave the temporary behind; :func:`remove_stale_temporaries` deletes those.
"""

from __future__ import annotations

import os
import re
import secrets
import stat
import warnings
from typing import Any

import torch

__all__ = [
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "remove_stale_temporaries",
    "FORMAT",
    "VERSION",
]

FORMAT = "fastflow-checkpoint"
VERSION = 1

_TMP_PREFIX, _TMP_SUFFIX = ".tmp-", ".pt"
# the names save_checkpoint gives its temporaries (8 random characters; older versions used
# tempfile.mkstemp, whose names are 8 characters of [a-z0-9_]): nothing else matches
_TMP_NAME = re.compile(r"\.tmp-[a-z0-9_]{8}\.pt")
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save writes zip archives


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated, corrupt, or not a fastflow checkpoint."""


def _open_temporary(folder: str) -> tuple[int, str]:
    """Create ``folder/.tmp-XXXXXXXX.pt`` exclusively, mode 0o666 filtered by the umask."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    flags |= getattr(os, "O_NOFOLLOW", 0)
    for _ in range(100):
        tmp = os.path.join(folder, f"{_TMP_PREFIX}{secrets.token_hex(4)}{_TMP_SUFFIX}")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"{folder}: cannot create a temporary checkpoint file")


def save_checkpoint(obj: dict[str, Any], path: str | os.PathLike) -> None:
    """Atomically write ``obj`` (a dict; ``format``/``version`` keys are added) to ``path``.

    The file gets the permissions of any file the process creates (``0o666`` less the umask:
    ``0o644`` under the usual ``022``).

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
    fd, tmp = _open_temporary(folder)
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


def remove_stale_temporaries(folder: str | os.PathLike) -> list[str]:
    """Delete the temporaries a killed :func:`save_checkpoint` left in ``folder`` (only regular
    files named like its temporaries, ``.tmp-XXXXXXXX.pt``; not in subfolders). Call it only when
    no other process is saving checkpoints into ``folder``.

    Returns:
        The names removed.

    Example:
        >>> import tempfile, os
        >>> d = tempfile.mkdtemp()
        >>> open(os.path.join(d, ".tmp-0a1b2c3d.pt"), "wb").close()
        >>> open(os.path.join(d, "notes.tmp-0a1b2c3d.pt"), "wb").close()
        >>> remove_stale_temporaries(d), sorted(os.listdir(d))
        (['.tmp-0a1b2c3d.pt'], ['notes.tmp-0a1b2c3d.pt'])
    """
    folder = os.fspath(folder)
    removed = []
    try:
        names = sorted(os.listdir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return removed
    for name in names:
        if not _TMP_NAME.fullmatch(name):
            continue
        p = os.path.join(folder, name)
        try:
            if stat.S_ISREG(os.lstat(p).st_mode):
                os.unlink(p)
                removed.append(name)
        except FileNotFoundError:
            pass
    return removed


def _short(text: str, limit: int = 100) -> str:
    """First line of ``text`` without terminal escapes, cut at a word boundary."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", text).strip()
    line = " ".join(text.splitlines()[0].split()) if text else ""
    if len(line) <= limit:
        return line
    cut = line[:limit].rsplit(" ", 1)[0].rstrip(" ,.;:")
    return cut + "..."


def _load_failure(path: str, e: Exception) -> CheckpointError:
    """The one-line error for a file ``torch.load(weights_only=True)`` could not read."""
    msg = str(e)
    weights_only = "Weights only load failed" in msg  # not only tensors and plain containers
    m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", msg) if weights_only else None
    if m:
        why = f"it holds a pickled {m.group(1)} object; fastflow reads only tensors and plain data"
        return CheckpointError(f"{path} is not a fastflow checkpoint ({why})")
    with open(path, "rb") as f:
        head = f.read(len(_ZIP_MAGIC))
    if not head:
        return CheckpointError(f"{path}: truncated or corrupt checkpoint (empty file)")
    if not _ZIP_MAGIC.startswith(head):
        why = "not a file written by torch.save"
        return CheckpointError(f"{path} is not a fastflow checkpoint ({why})")
    if weights_only:
        why = "it holds objects other than tensors and plain data"
        return CheckpointError(f"{path} is not a fastflow checkpoint ({why})")
    detail = _short(msg) or type(e).__name__
    return CheckpointError(f"{path}: truncated or corrupt checkpoint ({detail})")


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Loads with ``weights_only=True`` (no arbitrary code runs from the file); torch's warnings
    about foreign files are not shown, the error says what is wrong.

    Raises:
        CheckpointError: the file is missing, truncated or corrupt, or not a fastflow checkpoint
            (including any pickle of other objects, e.g. ``torch.save({"a": SomeClass()})``).

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
        with warnings.catch_warnings():
            # e.g. "Detected pickle protocol 4 in the checkpoint": the error below says it all
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise _load_failure(path, e) from None
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"{path} is not a fastflow checkpoint (it holds a {type(obj).__name__}, not a dict)"
        )
    if obj.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a fastflow checkpoint (no format {FORMAT!r} entry)")
    if obj.get("version", 0) > VERSION:
        raise CheckpointError(
            f"{path}: checkpoint version {obj.get('version')} is newer than this fastflow "
            f"(reads up to {VERSION})"
        )
    return obj
