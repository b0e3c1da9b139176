"""Training checkpoints: written atomically, read back with a clear error when a file is
missing or not a fastmeta checkpoint.

A checkpoint is a plain dict (tensors, numbers, strings, lists, dicts) saved with
``torch.save``; it loads with ``weights_only=True``, so reading one runs no pickled code.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

FORMAT = "fastmeta-checkpoint"
VERSION = 1
FILENAME = "checkpoint.pt"


class CheckpointError(ValueError):
    """The file exists but is not a readable fastmeta checkpoint."""


def resolve_path(path: str | os.PathLike) -> Path:
    """``path`` itself, or ``path/checkpoint.pt`` when ``path`` is a run directory."""
    path = Path(path)
    if path.is_dir():
        path = path / FILENAME
    return path


def atomic_write(path: Path, write) -> None:
    """Calls ``write(handle)`` on a temporary file beside ``path``, flushes it to disk and
    renames it over ``path``: readers see the old file or the new one, never a torn one."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 -> what open() would have made
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def save(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Writes ``state`` to ``path`` atomically: to a temporary file in the same directory,
    flushed to disk, then renamed over ``path`` (``os.replace``), so an interrupted save
    never leaves a truncated checkpoint behind."""
    if not isinstance(state, dict):
        raise TypeError(f"checkpoint state must be a dict, got {type(state).__name__}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "version": VERSION, **state}
    atomic_write(path, lambda handle: torch.save(payload, handle))
    return path


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Reads a checkpoint written by :func:`save`.

    Raises ``FileNotFoundError`` when there is no such file and :class:`CheckpointError`
    (a ``ValueError``) when the file is not a readable fastmeta checkpoint.
    """
    path = resolve_path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # truncated, corrupt, or not a torch file at all
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if len(reason) > 160:
            reason = reason[:157] + "..."
        raise CheckpointError(f"{path} is not a readable fastmeta checkpoint "
                              f"({type(error).__name__}: {reason})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a fastmeta checkpoint")
    if state.get("version") != VERSION:
        raise CheckpointError(f"{path} is a version {state.get('version')!r} fastmeta checkpoint; "
                              f"this fastmeta reads version {VERSION}")
    return state
