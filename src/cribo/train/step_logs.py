"""Per-step logs after a resume: each step recorded once.

Steps are logged as they run, a checkpoint only every ``train.checkpoint_every`` steps. A run
killed between two checkpoints has logged steps that the resumed run repeats; without this their
records would appear twice in ``log_steps.jsonl`` and in dvclive's plots (``dvc plots show``
draws both). Records from the resumed position on are dropped before training continues.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def drop_logged_steps_from(output_dir: str | os.PathLike, first_step: int, first_epoch: int) -> None:
    """Remove records of steps >= ``first_step`` (and epoch lines >= ``first_epoch``) from the run's logs.

    Touches ``log_steps.jsonl`` (key ``step``), ``log.txt`` (key ``epoch``) and the TSV files of
    ``dvclive/plots/metrics`` (column ``step``); each file is rewritten atomically, and only when it
    changes.
    """
    output_dir = Path(output_dir)
    _filter_json_lines(output_dir / "log_steps.jsonl", "step", first_step)
    _filter_json_lines(output_dir / "log.txt", "epoch", first_epoch)
    for tsv in sorted((output_dir / "dvclive" / "plots" / "metrics").rglob("*.tsv")):
        _filter_tsv(tsv, first_step)


def _filter_json_lines(path: Path, key: str, first: int) -> None:
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if not line.strip() or json.loads(line).get(key, -1) < first]
    if len(kept) != len(lines):
        _replace(path, "".join(kept))


def _filter_tsv(path: Path, first: int) -> None:
    lines = path.read_text().splitlines(keepends=True)
    header = lines[0].rstrip("\r\n").split("\t") if lines else []
    if "step" not in header:
        return
    column = header.index("step")
    kept = lines[:1] + [line for line in lines[1:] if line.strip() and int(line.split("\t")[column]) < first]
    if len(kept) != len(lines):
        _replace(path, "".join(kept))


def _replace(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
