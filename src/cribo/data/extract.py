"""Safe archive extraction: nothing may land outside the destination folder.

tar members with absolute paths or ``..`` are refused up front, and extraction goes through the
standard library's ``data`` filter (links leaving the folder, device files, unsafe modes); zip members are checked before anything is written
(absolute paths, drive letters, ``..`` escapes and symlinks are refused). Extraction happens in
``<dest>.partial`` and is renamed into place, so an interrupted extraction leaves no
half-populated ``dest``.
"""

from __future__ import annotations

import os
import shutil
import stat
import sys
import tarfile
import zipfile
from pathlib import Path, PurePosixPath

from tqdm import tqdm

SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".zip")
PLAIN = (".json",)  # single files (Pascal Context's annotations): copied into dest as they are


class UnsafeArchiveError(ValueError):
    """An archive member would be written outside the destination (or is a link); nothing was extracted."""


def _check_zip_member(archive: Path, info: zipfile.ZipInfo, root: Path) -> None:
    name = info.filename
    pure = PurePosixPath(name.replace("\\", "/"))
    if pure.is_absolute() or (len(name) > 1 and name[1] == ":") or ".." in pure.parts:
        raise UnsafeArchiveError(f"{archive}: member {name!r} would be written outside the destination; refused")
    if stat.S_ISLNK(info.external_attr >> 16):
        raise UnsafeArchiveError(f"{archive}: member {name!r} is a symbolic link; refused")
    if not (root / pure).resolve().is_relative_to(root.resolve()):
        raise UnsafeArchiveError(f"{archive}: member {name!r} resolves outside the destination; refused")


def extract(archive: str | Path, dest: str | Path, *, progress: bool = False) -> Path:
    """Extract ``archive`` (tar, tar.gz, tgz, tar.bz2, zip) into ``dest``; returns ``dest``.

    If ``dest`` exists, the archive's top-level entries are moved into it (replacing same-named ones).
    """
    archive, dest = Path(archive), Path(dest)
    name = archive.name.lower()
    if not name.endswith(SUFFIXES + PLAIN):
        raise ValueError(f"cannot extract {archive}: supported suffixes are {', '.join(SUFFIXES + PLAIN)}")
    partial = dest.with_name(dest.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    try:
        if name.endswith(PLAIN):
            shutil.copyfile(archive, partial / archive.name)
        elif name.endswith(".zip"):
            with zipfile.ZipFile(archive) as z:
                members = z.infolist()
                for info in members:
                    _check_zip_member(archive, info, partial)
                for info in tqdm(members, desc=f"extract {archive.name}", disable=not progress, file=sys.stdout,
                                 mininterval=5):
                    z.extract(info, partial)
        else:
            with tarfile.open(archive) as t:
                for member in t.getmembers():  # the data filter would strip a leading "/": refuse instead
                    pure = PurePosixPath(member.name)
                    if pure.is_absolute() or ".." in pure.parts:
                        raise UnsafeArchiveError(f"{archive}: member {member.name!r} would be written outside "
                                                 "the destination; refused")
                try:
                    t.extractall(partial, filter="data")
                except tarfile.FilterError as err:
                    member = getattr(getattr(err, "tarinfo", None), "name", "?")
                    raise UnsafeArchiveError(f"{archive}: member {member!r} refused ({err}); nothing kept") from err
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if not dest.exists():
        os.replace(partial, dest)
        return dest
    for entry in partial.iterdir():
        target = dest / entry.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
        os.replace(entry, target)
    partial.rmdir()
    return dest
