"""Memory subsets from list files: fixed image lists instead of seeded random fractions.

open-hummingbird-eval publishes, per dataset and fraction 1/D, five image lists (one per seed)
under folders named ``1_div_<D>``; a list file holds one image id per line (a file name with or
without extension is accepted). We generate our own seeded subsets by default
(:func:`cribo.eval.protocol.fraction_subset`) and read such lists when given.
"""

from __future__ import annotations

import re
from pathlib import Path


def read_id_list(path: str | Path) -> list[str]:
    """Image ids of a list file, extensions and blank lines dropped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training list not found: {path}")
    ids = [Path(line.strip()).stem for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise ValueError(f"{path}: the training list is empty")
    return ids


def find_list_file(list_dir: str | Path, fraction: float, seed: int) -> Path:
    """The list for ``fraction`` (1/D) and ``seed`` in ``list_dir/1_div_<D>/`` (the seed as a number in the name)."""
    list_dir = Path(list_dir)
    if not list_dir.is_dir():
        raise FileNotFoundError(f"--list-dir {list_dir} does not exist")
    divisor = round(1 / fraction) if fraction > 0 else 0
    folder = list_dir / f"1_div_{divisor}"
    available = {p.name: sorted(f.name for f in p.glob("*.txt")) for p in sorted(list_dir.glob("1_div_*")) if p.is_dir()}
    matches = [f for f in sorted(folder.glob("*.txt")) if re.search(rf"(?<![0-9]){seed}(?![0-9])", f.stem)] \
        if folder.is_dir() else []
    if len(matches) != 1:
        found = "; ".join(f"{name}: {', '.join(files) or 'no .txt files'}" for name, files in available.items())
        what = "no list file" if not matches else f"{len(matches)} list files"
        raise ValueError(f"{what} for fraction {fraction:g} (folder 1_div_{divisor}) and seed {seed} in {list_dir}; "
                         f"available: {found or 'no 1_div_<D> folders'}")
    return matches[0]


def incontext_settings(fractions: list[float], seeds: list[int], memory_size: int | None) -> list[tuple[float, int]]:
    """The (fraction, seed) pairs an in-context evaluation runs.

    A full memory of every training image (fraction 1, no ``memory_size`` sampling) draws nothing,
    so its seeds would all give the same row: it runs with the first seed only.
    """
    pairs = []
    for fraction in fractions:
        deterministic = float(fraction) == 1 and memory_size is None
        pairs.extend((fraction, seed) for seed in (seeds[:1] if deterministic else seeds))
    return pairs
