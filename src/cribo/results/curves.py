"""Training curves of the runs of an experiment, side by side, for ``dvc plots``.

Each run's ``log_steps.jsonl`` (one record every ``train.log_every`` steps) is read and one metric
becomes one column per run, indexed by the global step: the wide layout ``dvc plots`` draws as one
line per column. Runs without steps (the random and pixel baselines) are skipped.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from cribo.config import atomic_write_text, save_figure


def read_steps(pretrain_dir: str | Path) -> pd.DataFrame:
    """The per-step records of one run (empty frame if the run logs no steps)."""
    path = Path(pretrain_dir) / "log_steps.jsonl"
    if not path.is_file():
        return pd.DataFrame()
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    # a run resumed after a kill may log a step twice: the later record is the one that counted
    return pd.DataFrame(records).drop_duplicates("step", keep="last").set_index("step").sort_index()


def training_curves(runs: dict[str, str | Path], metric: str = "loss") -> pd.DataFrame:
    """``step x runs`` frame of ``metric`` (columns named after the runs)."""
    columns = {}
    for name, folder in runs.items():
        steps = read_steps(folder)
        if metric in steps:
            columns[name] = steps[metric]
    return pd.DataFrame(columns).rename_axis("step")


def write_curves(runs: dict[str, str | Path], out: str | Path, metric: str = "loss",
                 png: str | Path | None = None) -> Path:
    frame = training_curves(runs, metric)
    atomic_write_text(out, frame.to_csv(sep="\t"))
    if png is not None:
        plot_curves(frame, png, metric)
    return Path(out)


def plot_curves(frame: pd.DataFrame, png: str | Path, metric: str = "loss") -> Path:
    """One line per run (``frame``: step x runs), written atomically as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for name in frame.columns:
        series = frame[name].dropna()
        ax.plot(series.index, series.values, label=name, linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_title(f"pretraining {metric} per step")
    if len(frame.columns):
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, png)
