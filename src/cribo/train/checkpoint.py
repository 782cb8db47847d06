"""Checkpoints: written atomically, read without executing pickled code.

A checkpoint is written to a temporary file in the same folder, flushed to disk and renamed over
the target, so a crash mid-write leaves the previous checkpoint intact. It holds only tensors,
numbers, strings and containers of them, so ``torch.load(weights_only=True)`` reads it.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path

import torch


class CheckpointLoadError(ValueError):
    pass


def save_checkpoint(state: dict, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointLoadError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointLoadError(
            f"{path}: refused to load: it contains pickled objects other than tensors and plain "
            f"containers: {_unpickling_reason(err)}") from err
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointLoadError(f"{path}: not a readable torch checkpoint ({err})") from err
    if not isinstance(ckpt, dict):
        raise CheckpointLoadError(f"{path}: expected a dict, got {type(ckpt).__name__}")
    return ckpt


def _unpickling_reason(err: Exception) -> str:
    """The line of torch's long weights-only message that names the offending global."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for line in lines:
        if "Unsupported global" in line or "GLOBAL" in line:
            return line
    return lines[-1] if lines else type(err).__name__


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()
