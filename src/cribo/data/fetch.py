"""The download stage: fetch a dataset's archives, verify them, extract each into its own folder.

``fetch_dataset("coco-stuff15", ...)`` looks up the archives :data:`~cribo.data.registry.PREPARED`
lists, downloads each into ``DOWNLOADS/<filename>`` (resumable, retried, checksum verified, free
space checked first: :mod:`cribo.data.download`) and extracts it into ``RAW/<archive name>/``
(refusing archives that escape their folder: :mod:`cribo.data.extract`). ``RAW/<name>/.extracted``
is written last, so an interrupted stage redoes only what it had not finished.

``mirror`` replaces the registry's host: ``<mirror>/<filename>`` (a local mirror on a cluster,
or the tests' loopback server). Archives without a published checksum get trust-on-first-use:
the sha256 of the first download is written to ``<filename>.sha256`` and later downloads
must match it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from cribo.data.registry import ARCHIVES, PREPARED, USER_PROVIDED, Archive

EXTRACTED = ".extracted"


def archives_of(name: str) -> list[Archive]:
    """The archives a prepared dataset (or a single archive name) needs."""
    if name in PREPARED:
        return [ARCHIVES[a] for a in PREPARED[name]]
    if name in ARCHIVES:
        return [ARCHIVES[name]]
    if name in USER_PROVIDED:
        raise ValueError(f"{name} cannot be downloaded (licence or login): obtain it yourself and run "
                         f"`cribo data check {name} --root DIR`")
    raise ValueError(f"unknown dataset or archive {name!r}; downloadable: {', '.join(sorted(PREPARED))}; "
                     f"archives: {', '.join(sorted(ARCHIVES))}")


def archive_url(archive: Archive, mirror: str | None) -> str:
    return f"{mirror.rstrip('/')}/{archive.filename}" if mirror else archive.url


def fetch_archive(archive: Archive, downloads: str | Path, raw: str | Path, *, mirror: str | None = None,
                  remove_archive: bool = False, progress: bool = True, retries: int = 4,
                  backoff: float = 2.0) -> Path:
    """Download, verify and extract one archive; returns ``RAW/<archive name>``."""
    from cribo.data.download import DownloadError, download, file_digest
    from cribo.data.extract import UnsafeArchiveError, extract

    downloads, raw = Path(downloads), Path(raw)
    dest = raw / archive.name
    if (dest / EXTRACTED).is_file():
        return dest
    downloads.mkdir(parents=True, exist_ok=True)
    raw.mkdir(parents=True, exist_ok=True)
    path = downloads / archive.filename
    recorded = path.with_name(path.name + ".sha256")
    if archive.md5:
        checksum = f"md5:{archive.md5}"
    elif recorded.is_file():
        checksum = f"sha256:{recorded.read_text().split()[0]}"
    else:
        checksum = None
    try:
        download(archive_url(archive, mirror), path, size=None, checksum=checksum, retries=retries,
                 backoff=backoff, progress=progress, expected_bytes=archive.approx_bytes)
    except DownloadError as err:
        if checksum is None or archive.md5 or "corrupt" not in str(err):
            raise
        found = str(err).split("; the file was removed")[0]
        raise DownloadError(f"{found} (the sha256 recorded in {recorded} on the first download; there is no "
                            f"published checksum); the download was removed. If the file on the server changed "
                            f"legitimately, delete {recorded} and rerun") from err
    _check_space_for_extraction(path, raw)
    if dest.exists():  # a half-extracted folder of an interrupted run
        shutil.rmtree(dest)
    try:
        extract(path, dest, progress=progress)
    except UnsafeArchiveError:
        if checksum is None:  # an unverified archive that was refused must not be trusted on the next run
            path.unlink(missing_ok=True)
        raise
    if checksum is None:
        # trust on first use, but only for an archive that was accepted: recording the hash of a
        # refused one would make every later good download fail as "corrupt"
        digest = file_digest(path, "sha256")
        tmp = recorded.with_name(recorded.name + ".tmp")
        tmp.write_text(f"{digest}  {archive.filename}\n")
        os.replace(tmp, recorded)
        print(f"note: no published checksum for {archive.filename}; recorded its sha256 {digest[:16]}... "
              f"in {recorded} (later downloads are checked against it)")
    (dest / EXTRACTED).write_text(f"{archive.filename}\n")
    if remove_archive:
        path.unlink()
    return dest


def _check_space_for_extraction(archive: Path, raw: Path) -> None:
    from cribo.data.download import DownloadError

    need = archive.stat().st_size  # archives of JPEGs and PNGs barely compress
    free = shutil.disk_usage(raw).free
    if free < need:
        raise DownloadError(f"not enough free space in {raw} to extract {archive.name}: needs about "
                            f"{need / 1e9:.1f} GB, {free / 1e9:.1f} GB free")


def fetch_dataset(name: str, downloads: str | Path, raw: str | Path, **kwargs) -> list[Path]:
    return [fetch_archive(a, downloads, raw, **kwargs) for a in archives_of(name)]
