"""Checking that an output location can be written, before any work is done.

A command that computes for an hour and then finds that ``--out`` is not writable wastes the
hour and, worse, may already have written half of its outputs. Every command therefore checks
its output paths first: the nearest existing ancestor must be a folder we may write into, no
ancestor may be a file, and an existing target must be of the right kind (a file for ``--out
row.json``, a folder for ``--output-dir``). The errors name the option, the path and the fix.
"""

from __future__ import annotations

import os
from pathlib import Path


class OutputLocationError(ValueError):
    """An output path that cannot be written; the message names the option, the path and the fix."""


def check_output_location(path: str | os.PathLike, option: str, kind: str = "file") -> None:
    """Raise :class:`OutputLocationError` unless ``path`` can be created or replaced as a ``kind``.

    ``kind`` is ``"file"`` or ``"dir"``. Nothing is created: the check only looks at the file system.
    """
    if kind not in ("file", "dir"):
        raise ValueError(f"kind must be 'file' or 'dir', got {kind!r}")
    path = Path(path)
    if path.exists():
        if kind == "file" and path.is_dir():
            raise OutputLocationError(f"{option} {path}: is a folder, but a file is written there; "
                                      "give a file name (or remove the folder)")
        if kind == "dir" and not path.is_dir():
            raise OutputLocationError(f"{option} {path}: is a file, but a folder is written there; "
                                      "give another folder (or remove the file)")
    # the nearest ancestor that exists decides whether the missing folders can be created
    ancestor = path if kind == "dir" and path.is_dir() else path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        if ancestor.is_symlink():  # a dangling link: mkdir would fail with 'File exists'
            raise OutputLocationError(f"{option} {path}: {ancestor} is a broken symbolic link; "
                                      "fix or remove it")
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputLocationError(f"{option} {path}: {ancestor} is a file, not a folder, so nothing can be "
                                  f"written under it; choose another path or move {ancestor} away")
    # replacing an existing entry, or creating one, needs write and search permission on its folder
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputLocationError(f"{option} {path}: no permission to write in {ancestor}; choose a folder "
                                  "you can write to, or fix its permissions")
