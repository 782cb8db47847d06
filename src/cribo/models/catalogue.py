"""Released checkpoints by name: the catalogue ``config/checkpoints.yaml`` and a verified fetch.

Each entry records where a project publishes its weights (the URL its README prints), whether
that URL serves the file (``direct``) or a sharing page, whether it could be verified, the
published checksum if any, and what the tables match it on (method, arch, patch size,
pretraining data). ``fetch_checkpoint`` downloads one (resumable, checked by
:func:`cribo.data.download.download`, plus the published md5 prefix when that is all there is);
``baseline_spec`` turns a name into the ``baselines:`` entry the workflow imports.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from cribo.data.download import DownloadError, download, file_digest

REQUIRED = ("method", "arch", "patch_size", "pretrain", "epochs", "url", "filename", "direct", "url_verified",
            "checksum", "source")
OPTIONAL = ("md5_prefix", "timm_model", "page")


class CatalogueError(ValueError):
    """config/checkpoints.yaml is malformed or names no such checkpoint; the message says which."""


def load_catalogue(path: str | Path) -> dict[str, dict]:
    """``{name: entry}`` from the catalogue file, every entry checked."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise CatalogueError(f"cannot read {path}: {err}") from err
    entries = (data or {}).get("checkpoints") if isinstance(data, dict) else None
    if not isinstance(entries, dict) or not entries:
        raise CatalogueError(f"{path}: expected a mapping 'checkpoints: {{name: entry}}'")
    for name, entry in entries.items():
        where = f"{path}: checkpoints.{name}"
        if not isinstance(entry, dict):
            raise CatalogueError(f"{where}: expected a mapping")
        missing = [k for k in REQUIRED if k not in entry]
        unknown = sorted(set(entry) - set(REQUIRED) - set(OPTIONAL))
        if missing or unknown:
            raise CatalogueError(f"{where}: " + "; ".join(
                ([f"lacks {', '.join(missing)}"] if missing else []) + ([f"unknown key(s) {', '.join(unknown)}"]
                                                                         if unknown else [])))
        if entry["url"] is None and entry["direct"]:
            raise CatalogueError(f"{where}: direct is true but there is no url")
        if entry["url"] is not None and not str(entry["url"]).startswith(("https://", "http://", "file:")):
            raise CatalogueError(f"{where}: url {entry['url']!r} is not an http(s) or file URL")
        checksum = entry["checksum"]
        if checksum is not None and not str(checksum).startswith(("md5:", "sha256:")):
            raise CatalogueError(f"{where}: checksum must be 'md5:<hex>', 'sha256:<hex>' or null, got {checksum!r}")
        if "/" in entry["filename"] or not entry["filename"]:
            raise CatalogueError(f"{where}: filename must be a plain file name, got {entry['filename']!r}")
    return entries


def get_entry(catalogue: dict[str, dict], name: str) -> dict:
    if name not in catalogue:
        raise CatalogueError(f"no checkpoint named {name!r} in the catalogue; known: {', '.join(sorted(catalogue))}")
    return catalogue[name]


def checkpoint_path(catalogue: dict[str, dict], name: str, downloads: str | Path) -> Path:
    """Where ``fetch_checkpoint`` puts ``name``: ``<downloads>/<name>/<filename>``."""
    return Path(downloads) / name / get_entry(catalogue, name)["filename"]


def fetch_checkpoint(catalogue: dict[str, dict], name: str, downloads: str | Path, *, url: str | None = None,
                     progress: bool = True) -> Path:
    """Download checkpoint ``name`` (resuming a partial file) and verify it; returns its path.

    ``url`` replaces the catalogue's (a mirror, or a local copy as ``file:`` URL). Entries
    without a direct download raise :class:`CatalogueError` saying where the weights are published
    and how to give them by hand.
    """
    entry = get_entry(catalogue, name)
    source = url or (entry["url"] if entry["direct"] else None)
    if source is None:
        where = entry["url"] or entry.get("page")
        raise CatalogueError(
            f"checkpoint {name} has no direct download"
            + (f" (published at {where}, a page that needs a browser)" if where else " (no public release found)")
            + f"; download it by hand and give baselines: {{{name}: {{weights: PATH, method: {entry['method']}"
            + (f", pretrain: {entry['pretrain']}" if entry["pretrain"] else "") + "}}")
    dest = checkpoint_path(catalogue, name, downloads)
    if dest.is_file() and entry["checksum"] is None and not prefix_mismatch(dest, entry):
        return dest  # a finished download (partial ones live in <file>.part until complete)
    path = download(source, dest, checksum=entry["checksum"], progress=progress)
    if prefix_mismatch(path, entry):
        path.unlink()
        prefix = entry["md5_prefix"]
        raise DownloadError(f"{source}: md5 of the download does not start with the published {prefix}; "
                            f"the file was deleted (a changed release, or a corrupted transfer: fetch again)")
    return path


def prefix_mismatch(path: Path, entry: dict) -> bool:
    """True when the project publishes only an md5 prefix and ``path`` does not have it."""
    prefix = entry.get("md5_prefix")
    return bool(prefix) and not file_digest(path, "md5").startswith(str(prefix).lower())


def baseline_spec(catalogue: dict[str, dict], name: str, downloads: str | Path) -> dict:
    """The ``baselines:`` entry of a catalogue name: where its weights land and what to match."""
    entry = get_entry(catalogue, name)
    return {"weights": str(checkpoint_path(catalogue, name, downloads)), "method": entry["method"],
            "pretrain": entry["pretrain"], "timm_model": entry.get("timm_model"), "catalogue": name}
