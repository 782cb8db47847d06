"""Resumable, verified HTTP(S) / file downloads with retries and a free-space check.

Written on the standard library (``urllib``) because what the stage needs is narrow and must be
exact: an interrupted transfer resumes with an HTTP ``Range`` request from the bytes already in
``<dest>.part``; transient failures (connection resets, timeouts, HTTP 5xx / 429) are retried
with exponential backoff; the checksum (``md5:<hex>`` or ``sha256:<hex>``) is verified before the
part file is renamed to its final name, and a mismatching file is deleted and reported. Free disk
space is checked before the first byte is written.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import socket
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm


class DownloadError(RuntimeError):
    """A download failed for good (after retries), or its content is wrong; the message says which."""


def file_digest(path: str | Path, algorithm: str) -> str:
    """Hex digest of a file, read in 4 MiB blocks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _parse_checksum(checksum: str | None) -> tuple[str, str] | None:
    if checksum is None:
        return None
    algorithm, _, digest = checksum.partition(":")
    if algorithm not in ("md5", "sha256") or not digest:
        raise ValueError(f"checksum must be 'md5:<hex>' or 'sha256:<hex>', got {checksum!r}")
    return algorithm, digest.lower()


def _matches(path: Path, size: int | None, checksum: tuple[str, str] | None) -> bool:
    if size is not None and path.stat().st_size != size:
        return False
    if checksum is not None:
        return file_digest(path, checksum[0]) == checksum[1]
    return size is not None


class _Transient(Exception):
    """An error worth retrying."""


def _open(url: str, start: int, timeout: float):
    """Response for ``url`` from byte ``start``, and whether the server honoured the range."""
    request = urllib.request.Request(url, headers={"User-Agent": "cribo-data/1"})
    if start and not url.startswith("file:"):
        request.add_header("Range", f"bytes={start}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code >= 500 or err.code == 429:
            raise _Transient(f"HTTP {err.code}") from err
        if err.code == 416 and start:  # asked past the end: the part file is complete (or bigger)
            return None, True
        raise DownloadError(f"download of {url} failed: HTTP {err.code} {err.reason}") from err
    except urllib.error.URLError as err:
        if isinstance(err.reason, FileNotFoundError) or url.startswith("file:"):
            raise DownloadError(f"download of {url} failed: {err.reason}") from err
        raise _Transient(str(err.reason)) from err
    except (ConnectionError, TimeoutError, socket.timeout, http.client.HTTPException) as err:
        raise _Transient(repr(err)) from err
    if url.startswith("file:"):
        if start:
            response.seek(start)  # file responses are seekable
        return response, True
    return response, response.status == 206


def _remaining_bytes(response, start: int, resumed: bool) -> int | None:
    length = response.headers.get("Content-Length") if response is not None else None
    if length is None:
        return None
    length = int(length)
    return length - (start if response.geturl().startswith("file:") else 0) if resumed else length


def _check_space(folder: Path, need: int | None) -> None:
    if need is None or need <= 0:
        return
    free = shutil.disk_usage(folder).free
    if free < need:
        raise DownloadError(f"not enough free disk space in {folder}: the download needs {need / 1e9:.2f} GB "
                            f"more, {free / 1e9:.2f} GB free; free space or point --downloads elsewhere")


def download(url: str, dest: str | Path, *, size: int | None = None, checksum: str | None = None,
             retries: int = 4, backoff: float = 1.0, chunk: int = 1 << 20, progress: bool = True,
             timeout: float = 60.0, expected_bytes: int | None = None) -> Path:
    """Download ``url`` to ``dest`` (resuming ``dest.part``), verify it, return ``dest``.

    Args:
        size: exact size in bytes when known (checked).
        checksum: ``md5:<hex>`` or ``sha256:<hex>`` (checked); a mismatch deletes the file.
        retries: attempts after the first for transient errors, each resuming where the last stopped.
        backoff: seconds before the first retry, doubled at each further one.
        expected_bytes: approximate size for the free-space check when ``size`` is unknown and the
            server sends no Content-Length.
    """
    dest = Path(dest)
    digest = _parse_checksum(checksum)
    if dest.is_file() and (digest is not None or size is not None) and _matches(dest, size, digest):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    attempt, checked_space = 0, False
    while True:
        start = part.stat().st_size if part.is_file() else 0
        try:
            response, resumed = _open(url, start, timeout)
            if response is None:  # 416: nothing left to fetch
                break
            with response:
                if not resumed:
                    start = 0
                remaining = _remaining_bytes(response, start, resumed)
                if not checked_space:
                    need = (size - start) if size is not None else (remaining if remaining is not None else
                                                                    (expected_bytes or 0) - start)
                    _check_space(dest.parent, need)
                    checked_space = True
                total = start + remaining if remaining is not None else size
                with open(part, "ab" if start else "wb") as out, tqdm(
                        total=total, initial=start, unit="B", unit_scale=True, desc=dest.name,
                        disable=not progress, file=sys.stdout, mininterval=2) as bar:
                    while True:
                        try:
                            block = response.read(chunk)
                        except (ConnectionError, TimeoutError, socket.timeout, http.client.HTTPException) as err:
                            raise _Transient(repr(err)) from err
                        if not block:
                            break
                        out.write(block)
                        bar.update(len(block))
                if remaining is not None and part.stat().st_size < start + remaining:
                    raise _Transient(f"connection closed after {part.stat().st_size} of {start + remaining} bytes")
            break
        except _Transient as err:
            attempt += 1
            if attempt > retries:
                raise DownloadError(f"download of {url} failed after {retries + 1} attempts: {err}; "
                                    f"rerun to resume from the {part.stat().st_size if part.is_file() else 0} "
                                    f"bytes in {part}") from None
            wait = backoff * 2 ** (attempt - 1)
            print(f"{dest.name}: {err}; retry {attempt}/{retries} in {wait:g} s", file=sys.stderr)
            time.sleep(wait)
    actual_size = part.stat().st_size
    if size is not None and actual_size != size:
        part.unlink()
        raise DownloadError(f"{dest.name} from {url} has {actual_size} bytes, expected {size}; removed, rerun")
    if digest is not None:
        actual = file_digest(part, digest[0])
        if actual != digest[1]:
            part.unlink()
            raise DownloadError(f"{dest.name} from {url} is corrupt: {digest[0]} {actual}, expected {digest[1]}; "
                                "the file was removed, rerun to download it again")
    os.replace(part, dest)
    return dest
