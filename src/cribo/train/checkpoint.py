"""Checkpoints: written atomically, read without executing pickled code.

A checkpoint is written to a temporary file in the same folder, flushed to disk, renamed over the
target and the folder entry synced, so a crash or a ``SIGKILL`` mid-write leaves the previous
checkpoint intact. Ours hold only tensors, numbers, strings and containers of them, so
``torch.load(weights_only=True)`` reads them.

Official CrIBo checkpoints pickle their ``args`` as an ``argparse.Namespace``; torch's restricted
unpickler is given exactly that one class (and nothing else), and the namespace is turned into a
plain dict. A file that would need any other global (e.g. a payload calling ``os.system``) is
refused with the name of that global. ``.safetensors`` files are read with safetensors (no pickle
at all); their string metadata is returned under ``__metadata__``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pickle
import shutil
from pathlib import Path

import torch


class CheckpointLoadError(ValueError):
    pass


class ResumeMismatchError(ValueError):
    """An output folder holds a checkpoint of other settings than the run asked to continue it."""


def save_checkpoint(state: dict, path: str | os.PathLike) -> None:
    _write_atomically(Path(path), lambda fh: torch.save(state, fh))


def copy_checkpoint(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Copy ``source`` to ``target`` with the same crash safety as :func:`save_checkpoint`."""
    with open(source, "rb") as src:
        _write_atomically(Path(target), lambda fh: shutil.copyfileobj(src, fh, 1 << 20))


def _write_atomically(path: Path, write) -> None:
    """``write(file)`` into a temporary file beside ``path``, flushed and synced, then renamed over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def _remove_stale_temporaries(path: Path) -> None:
    """Temporary files left by writers that were killed (their pid is gone) are only wasted disk."""
    for tmp in path.parent.glob(f".{path.name}.tmp-*"):
        try:
            os.kill(int(tmp.name.rsplit("-", 1)[1]), 0)
        except (ValueError, ProcessLookupError):
            tmp.unlink(missing_ok=True)
        except PermissionError:  # alive, owned by someone else
            pass


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems do not support syncing a directory
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: str | os.PathLike, map_location="cpu", mmap: bool = False) -> dict:
    """Read one of our checkpoints, an official CrIBo/DINO checkpoint, a state dict or a safetensors file.

    ``mmap=True`` maps the tensors instead of reading them (for a quick look at the metadata of a
    large checkpoint).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointLoadError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        return _load_safetensors(path)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap or None)
    except pickle.UnpicklingError as err:
        raise CheckpointLoadError(
            f"{path}: refused to load: it contains pickled objects other than tensors, plain containers "
            f"and argparse.Namespace ({_unpickling_reason(err)}); loading it would run code from the file. "
            "If you trust its origin, convert it in a separate Python session with "
            "torch.load(..., weights_only=False) and save its state dicts only") from err
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointLoadError(f"{path}: not a readable torch checkpoint ({err})") from err
    if not isinstance(ckpt, dict):
        raise CheckpointLoadError(f"{path}: expected a dict, got {type(ckpt).__name__}")
    if isinstance(ckpt.get("args"), argparse.Namespace):
        ckpt["args"] = vars(ckpt["args"])
    return ckpt


def _load_safetensors(path: Path) -> dict:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            state = {k: fh.get_tensor(k) for k in fh.keys()}
            state["__metadata__"] = dict(fh.metadata() or {})
    except (SafetensorError, OSError) as err:
        raise CheckpointLoadError(f"{path}: not a readable safetensors file ({err})") from err
    return state


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


def check_resume_settings(ckpt_path: str | os.PathLike, cfg: dict) -> None:
    """Refuse to continue ``ckpt_path`` with a run config of another run id; nothing happens without it.

    A resumed run must train with the settings of the epochs already done, or the checkpoint (and
    every row computed from it) would claim settings that part of its training never used. Only
    the ``train`` section (where and how fast to run) may differ. Called before anything is
    written to the output folder.
    """
    from cribo.config import artefact_settings, run_id

    path = Path(ckpt_path)
    if not path.is_file():
        return
    try:
        saved = load_checkpoint(path, mmap=True).get("config")
    except CheckpointLoadError:  # files in torch's legacy (non-zip) format cannot be memory-mapped
        saved = load_checkpoint(path).get("config")
    if not isinstance(saved, dict):
        raise ResumeMismatchError(f"{path} is not a checkpoint written by `cribo train` (no recorded run config), "
                                  "so it cannot be resumed; give another --output-dir or move the file away")
    if run_id(saved) == run_id(cfg):
        return
    old, new = _flatten(artefact_settings(saved)), _flatten(artefact_settings(cfg))
    changes = [f"{key}: {old.get(key, '(not set)')!r} -> {new.get(key, '(not set)')!r}"
               for key in sorted(old.keys() | new.keys()) if old.get(key, _MISSING) != new.get(key, _MISSING)]
    shown = "; ".join(changes[:8]) + (f"; and {len(changes) - 8} more" if len(changes) > 8 else "")
    raise ResumeMismatchError(
        f"{path} was trained with other settings (run id {run_id(saved)}) than this run (run id {run_id(cfg)}): "
        f"{shown}. Only the 'train' section may change when resuming: run with the checkpoint's settings to "
        "continue it, or give another --output-dir to start a run with the new ones")


_MISSING = object()


def _flatten(tree: dict, prefix: str = "") -> dict:
    """``{"optim": {"lr": 1}}`` -> ``{"optim.lr": 1}``."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
