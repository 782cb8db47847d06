"""CrIBo's Tables 1-3 drawn: the published numbers of the CrIBo paper and ours over them.

Drawn from the same frames as ``cribo_table*.csv`` (``paper_tables.build_paper_table``), so the
figure cannot say anything the tables do not. Table 1: mIoU against the training fraction, one
line per published row of the CrIBo paper (CrIBo's rows coloured, baselines grey), our matching
runs as filled markers. Tables 2 and 3: one line per published row, the paper's value per
dataset as an open marker and ours as a filled one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cribo.config import save_figure
from cribo.results.paper_tables import FRACTION_LABELS, SECTIONS, format_epochs, build_paper_table

DATASET_MARKERS = {"Pascal Context": "o", "Pascal VOC": "s", "COCO-Stuff-164K": "^", "ADE20K": "D"}


def _present(value) -> bool:
    return value is not None and value == value  # NaN is how pandas spells an empty cell


def _label(record: dict) -> str:
    parts = [record["method"], record["backbone"], record["pretraining"],
             f"{format_epochs(record['epochs'])} ep" if _present(record["epochs"]) else None]
    return " ".join(str(p) for p in parts if _present(p))


def _fraction_panel(ax, frame, dataset: str) -> None:
    xs = np.arange(len(FRACTION_LABELS))
    colours = iter(["tab:red", "tab:blue", "tab:green", "tab:purple"])
    for record in frame[frame["section"] == SECTIONS["S1"]].to_dict("records"):
        paper = [record.get(f"{dataset} {f} paper") for f in FRACTION_LABELS.values()]
        ours = [record.get(f"{dataset} {f} ours") for f in FRACTION_LABELS.values()]
        is_cribo = record["method"].startswith("CrIBo")
        colour = next(colours) if is_cribo else "0.7"
        paper_values = np.array([v if _present(v) else np.nan for v in paper], dtype=float)
        ax.plot(xs, paper_values, color=colour, linewidth=1.6 if is_cribo else 0.8,
                label=_label(record) if is_cribo else None)
        ours_values = np.array([v if _present(v) else np.nan for v in ours], dtype=float)
        if np.isfinite(ours_values).any():
            ax.plot(xs, ours_values, "o", color=colour, markersize=6, label=f"ours: {record['run']}")
    ax.set_xticks(xs, list(FRACTION_LABELS.values()))
    ax.set_xlabel("training fraction (memory)")
    ax.set_ylabel("mIoU (%)")
    ax.set_title(f"Table 1, {dataset} (grey: baselines)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)


def _dataset_panel(ax, frame, title: str) -> None:
    rows = frame[frame["section"] == SECTIONS["S1"]].to_dict("records")
    for y, record in enumerate(rows):
        for dataset, marker in DATASET_MARKERS.items():
            paper, ours = record.get(f"{dataset} paper"), record.get(f"{dataset} ours")
            if _present(paper):
                ax.plot(paper, y, marker, mfc="none", color="0.4", label=dataset if y == 0 else None)
            if _present(ours):
                ax.plot(ours, y, marker, color="tab:red", label=f"ours ({dataset})")
    ax.set_yticks(range(len(rows)), [_label(r) + (f" [{r['run']}]" if _present(r["run"]) else "") for r in rows], fontsize=6)
    ax.invert_yaxis()
    ax.set_xlabel("mIoU (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="x")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=6)


def draw_cribo_tables(rows: list[dict], paper: dict, png: str | Path) -> Path:
    """Four panels (Table 1 on ADE20K and Pascal VOC, Table 2, Table 3), written atomically as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 10), dpi=100)
    table1 = build_paper_table(rows, paper, "table1")
    if not table1.empty:
        _fraction_panel(axes[0, 0], table1, "ADE20K")
        _fraction_panel(axes[0, 1], table1, "Pascal VOC")
    for ax, table, title in ((axes[1, 0], "table2", "Table 2, linear (open: paper, filled: ours)"),
                             (axes[1, 1], "table3", "Table 3, fine-tuning (open: paper, filled: ours)")):
        frame = build_paper_table(rows, paper, table)
        if not frame.empty:
            _dataset_panel(ax, frame, title)
    fig.suptitle("CrIBo Tables 1-3: published (CrIBo paper) and ours on the same rows")
    fig.tight_layout()
    return save_figure(fig, png)
