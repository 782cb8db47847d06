"""CrIBo's Tables 1-3 as the paper prints them, each cell "ours / paper (difference)".

The published side is the ``published`` section of ``config/paper_results.yaml`` (every number of
the research file, with its source and origin). Each table keeps the paper's rows (method x
backbone x pretraining data x epochs, in the order and with the markers of the source) and its
columns (dataset x training fraction for Table 1, dataset for Tables 2 and 3):

- Table 1, in-context retrieval: ADE20K and Pascal VOC at 1/128, 1/64, 1/8, 1/1; rows of the CrIBo
  paper, then the CrIBo README, DIP's Table 1 (NeCo's runs, marked †, DIP's own, ‡) and the
  open-hummingbird-eval README (whose rows differ by memory size, not fraction);
- Table 2, linear probe on frozen features, and Table 3, Segmenter fine-tuning: Pascal Context,
  Pascal VOC, COCO-Stuff-164K, ADE20K.

Our evaluation rows (mean over seeds) fill a paper row when they agree on method, architecture,
patch size and pretraining data, and on pretraining epochs when both are known (an imported
checkpoint does not know its own). A published row whose pretraining data was not stated is matched
on method and backbone only, and the run is marked ``?``. Our runs that match no published row get rows of their own, with extra columns for
the datasets the paper lacks (the toy scenes).

Protocols: a published number is compared only with our rows of a compatible protocol
(``COMPATIBLE``); a cell holding only incompatible rows shows our value marked ``*`` and no
difference.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

FRACTION_LABELS = {1 / 128: "1/128", 1 / 64: "1/64", 1 / 8: "1/8", 1.0: "1/1"}
DATASET_TITLES = {"ade20k": "ADE20K", "voc": "Pascal VOC", "pascal-context": "Pascal Context",
                  "coco-stuff171": "COCO-Stuff-164K"}
SEGMENTATION_DATASETS = ["pascal-context", "voc", "coco-stuff171", "ade20k"]
LAYOUTS = {
    "table1": {"protocol": "incontext", "columns": [(d, f) for d in ("ade20k", "voc") for f in FRACTION_LABELS.values()],
               "title": "Table 1: in-context (dense nearest-neighbour) retrieval"},
    "table2": {"protocol": "linear", "columns": [(d, None) for d in SEGMENTATION_DATASETS],
               "title": "Table 2: linear segmentation, frozen backbone"},
    "table3": {"protocol": "finetune", "columns": [(d, None) for d in SEGMENTATION_DATASETS],
               "title": "Table 3: fine-tuning (Segmenter)"},
}
SECTIONS = {"S1": "CrIBo paper", "S2": "CrIBo README", "S3": "DIP Table 1 (†: NeCo's runs, ‡: DIP's)",
            "S5": "open-hummingbird-eval README"}
OURS_SECTION = "our runs without a published row"
# Which of our protocol variants each published evaluator's numbers may be compared with. CrIBo's
# authors do not state their retrieval settings beyond Hummingbird's (published-numbers.md note
# 7); our clean protocol follows Hummingbird. NeCo and open-hummingbird-eval's own runs used
# open-hummingbird-eval; DIP's evaluator (identity metric, temperature 0.07) matches neither.
COMPATIBLE = {
    "incontext": {"cribo": {"clean"}, "hummingbird": {"clean"}, "open-hbird": {"open-hbird"}, "dip": set()},
    "linear": {"cribo": {"mmseg"}},        # CrIBo's Table 2: mmsegmentation's Segmenter linear decoder
    "finetune": {"cribo": {"mask"}},       # CrIBo's Table 3: Segmenter's mask transformer
}
ARCH_TITLES = {"vit_tiny": "ViT-T", "vit_small": "ViT-S", "vit_base": "ViT-B", "vit_large": "ViT-L",
               "vit_giant": "ViT-G", "resnet50": "ResNet-50"}
PRETRAIN_TITLES = {"coco": "COCO", "imagenet": "IN-1k"}


def _variant(row: dict, protocol: str) -> str:
    """The protocol variant a row was produced with (older in-context rows predate the choice)."""
    if protocol == "incontext":
        return row.get("incontext_protocol") or "clean"
    if protocol == "linear":
        return row.get("protocol_name") or "unknown"
    return row.get("decoder") or "unknown"


def _column(row: dict, protocol: str) -> tuple[str, str | None]:
    if protocol != "incontext":
        return row["dataset"], None
    fraction = float(row["fraction"])
    label = next((text for value, text in FRACTION_LABELS.items() if abs(value - fraction) < 1e-9), f"{fraction:g}")
    return row["dataset"], label


def our_cells(rows: list[dict], protocol: str) -> pd.DataFrame:
    """Our rows of ``protocol`` reduced to one value per (run, column, protocol variant, memory size):
    the mean over seeds, with their number."""
    records = []
    for row in rows:
        if row.get("protocol") != protocol:
            continue
        dataset, fraction = _column(row, protocol)
        records.append({"experiment": row.get("experiment"), "run_name": row.get("run_name"),
                        "method": row.get("method"), "arch": row.get("arch"), "patch_size": row.get("patch_size"),
                        "pretrain": row.get("pretrain_data"), "epochs": row.get("pretrain_epochs"),
                        "dataset": dataset, "fraction": fraction, "variant": _variant(row, protocol),
                        "memory_size": row.get("memory_size") if protocol == "incontext" else None,
                        "miou": float(row["miou"])})
    keys = ["experiment", "run_name", "method", "arch", "patch_size", "pretrain", "epochs", "dataset", "fraction",
            "variant", "memory_size"]
    if not records:
        return pd.DataFrame(columns=keys + ["ours", "seeds"])
    frame = pd.DataFrame(records).astype({k: object for k in keys})
    grouped = frame.groupby(keys, dropna=False, sort=True)["miou"].agg(["mean", "size"]).reset_index()
    for key in keys:  # grouping turns None into NaN; an absent setting stays None
        grouped[key] = grouped[key].astype(object).where(grouped[key].notna(), None)
    return grouped.rename(columns={"mean": "ours", "size": "seeds"})


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))


def _same(a, b) -> bool:
    return (_missing(a) and _missing(b)) or (not _missing(a) and not _missing(b) and a == b)


def _run_matches(entry: dict, run: dict) -> bool:
    # pretraining data not stated by the source: matched on method and backbone only (the run is
    # then marked "?", the pairing being an assumption)
    keys = ("method", "arch", "patch_size") + (() if entry["pretrain"] is None else ("pretrain",))
    if not all(_same(entry[k], run[k]) for k in keys):
        return False
    return _missing(run["epochs"]) or _missing(entry["epochs"]) or int(run["epochs"]) == int(entry["epochs"])


def _paper_rows(entries: list[dict], table: str) -> list[dict]:
    """The published rows of one table, in the source's order: one per (source, label, backbone,
    pretraining, epochs, memory size), with its numbers by column."""
    rows: dict[tuple, dict] = {}
    for entry in entries:
        if entry["table"] != table:
            continue
        key = (entry["source"], entry["label"], entry["arch"], entry["patch_size"], entry["pretrain"],
               entry.get("pretrain_printed"), entry["epochs"], entry.get("memory_size"))
        row = rows.setdefault(key, {"entry": entry, "ref": entry["ref"], "cells": {}})
        column = (entry["dataset"], _column(entry, LAYOUTS[table]["protocol"])[1])
        row["cells"][column] = entry
    order = list(SECTIONS)
    return sorted(rows.values(), key=lambda r: (order.index(r["entry"]["source"]), r["ref"]))


def _backbone(arch, patch_size) -> str:
    title = ARCH_TITLES.get(arch, str(arch))
    return title if _missing(patch_size) else f"{title}/{int(patch_size)}"


def _column_name(column: tuple[str, str | None]) -> str:
    dataset, fraction = column
    title = DATASET_TITLES.get(dataset, dataset)
    return title if fraction is None else f"{title} {fraction}"


def build_paper_table(rows: list[dict], paper: dict, table: str) -> pd.DataFrame:
    """One line per (published row, our matching run), plus one per run matching no published row.

    Columns: ``section, method, backbone, pretraining, epochs, run``, then for every column of the
    paper (and every extra dataset column of ours) ``<column> ours``, ``<column> paper``,
    ``<column> delta`` and ``<column> comparable`` (False: our value comes from a protocol the
    published number's evaluator is not comparable with, so there is no delta).
    """
    layout = LAYOUTS[table]
    protocol = layout["protocol"]
    ours = our_cells(rows, protocol)
    columns = list(layout["columns"])
    for column in sorted({(d, f) for d, f in zip(ours["dataset"], ours["fraction"])} - set(columns),
                         key=lambda c: (str(c[0]), str(c[1]))):
        columns.append(column)  # datasets the paper does not have (the toy scenes)
    run_keys = ["experiment", "run_name", "method", "arch", "patch_size", "pretrain", "epochs"]
    runs = ours[run_keys].drop_duplicates().to_dict("records") if len(ours) else []
    compatible = COMPATIBLE[protocol]
    lines, matched_runs = [], set()

    def cells_of(run: dict | None, published: dict) -> dict:
        out = {}
        for column in columns:
            entry = published.get(column)
            paper_value = entry["miou"] if entry else None
            ours_value, comparable = None, None
            if run is not None:
                mine = ours[(ours["experiment"] == run["experiment"]) & (ours["run_name"] == run["run_name"])
                            & (ours["dataset"] == column[0])
                            & ours["fraction"].apply(lambda f: _same(f, column[1]))]
                if entry is not None and entry.get("memory_size") is not None:
                    mine = mine[mine["memory_size"] == entry["memory_size"]]
                if len(mine):
                    allowed = compatible.get(entry["evaluator"], set()) if entry else set(mine["variant"])
                    good = mine[mine["variant"].isin(allowed)]
                    comparable = bool(len(good)) if entry else None
                    chosen = good if len(good) else mine
                    # several variants or memory sizes in one cell: the first in sorted order
                    ours_value = float(chosen.sort_values(["variant", "memory_size"]).iloc[0]["ours"])
            name = _column_name(column)
            delta = (ours_value - paper_value if comparable and ours_value is not None and paper_value is not None
                     else None)
            out.update({f"{name} ours": ours_value, f"{name} paper": paper_value, f"{name} delta": delta,
                        f"{name} comparable": comparable})
        return out

    for published in _paper_rows(paper.get("published") or [], table):
        entry = published["entry"]
        label = {"section": SECTIONS[entry["source"]], "method": entry["label"],
                 "backbone": _backbone(entry["arch"], entry["patch_size"]),
                 "pretraining": PRETRAIN_TITLES.get(entry["pretrain"], entry.get("pretrain_printed")),
                 "epochs": entry["epochs"] if entry["epochs"] is not None else entry.get("epochs_printed")}
        if entry.get("memory_size") is not None:
            label["method"] += f" (memory {entry['memory_size']:,})"
        matching = [run for run in runs if _run_matches(entry, run)]
        for run in matching or [None]:
            if run is not None:
                matched_runs.add((run["experiment"], run["run_name"]))
            unstated = " ?" if run is not None and entry["pretrain"] is None else ""
            lines.append({**label, "run": f"{run['experiment']}/{run['run_name']}{unstated}" if run else None,
                          **cells_of(run, published["cells"])})
    for run in runs:
        if (run["experiment"], run["run_name"]) in matched_runs:
            continue
        lines.append({"section": OURS_SECTION, "method": run["method"],
                      "backbone": _backbone(run["arch"], run["patch_size"]),
                      "pretraining": PRETRAIN_TITLES.get(run["pretrain"], run["pretrain"]),
                      "epochs": None if _missing(run["epochs"]) else int(run["epochs"]),
                      "run": f"{run['experiment']}/{run['run_name']}", **cells_of(run, {})})
    frame = pd.DataFrame(lines)
    if frame.empty:
        return frame
    numeric = [c for c in frame.columns if c.endswith((" ours", " paper", " delta"))]
    frame[numeric] = frame[numeric].apply(pd.to_numeric).round(2)
    return frame


def format_epochs(value) -> str:
    """Epochs read back from a frame come as floats (300.0) or as printed ("800+30")."""
    return str(int(value)) if isinstance(value, (int, float)) else str(value)


def _cell(ours, paper, delta, comparable) -> str:
    """'12.30 / 10.90 (+1.40)'; '- / 10.90' without a run; '12.30* / 10.90' across protocols."""
    if _missing(ours) and _missing(paper):
        return ""
    mine = "-" if _missing(ours) else f"{ours:.2f}" + ("*" if comparable is False else "")
    if _missing(paper):
        return mine
    text = f"{mine} / {paper:.1f}"
    return text + (f" ({delta:+.2f})" if not _missing(delta) else "")


def to_paper_markdown(frame: pd.DataFrame, table: str) -> str:
    """The table as the paper prints it: one column per (dataset, fraction), cells 'ours / paper (delta)'."""
    title = LAYOUTS[table]["title"]
    legend = ("Each cell: ours / paper (ours - paper), mIoU %. `-`: no run of ours; `*`: our value comes "
              "from a protocol not comparable with that published number (no difference given); "
              "`run ?`: the source does not state the pretraining data, so the run was matched on method and "
              "backbone only. "
              "Published numbers: config/paper_results.yaml (`published`).")
    if frame.empty:
        return f"# {title}\n\n{legend}\n\n(no published rows and no runs)\n"
    names = [c[: -len(" ours")] for c in frame.columns if c.endswith(" ours")]
    header = ["section", "method", "backbone", "pretraining", "epochs", "run", *names]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for record in frame.to_dict("records"):
        label = ["" if _missing(record[k]) else format_epochs(record[k]) for k in header[:6]]
        cells = [_cell(record[f"{n} ours"], record[f"{n} paper"], record[f"{n} delta"], record[f"{n} comparable"])
                 for n in names]
        lines.append("| " + " | ".join(label + cells) + " |")
    return f"# {title}\n\n{legend}\n\n" + "\n".join(lines) + "\n"


def write_cribo_tables(rows: list[dict], paper: dict, out_dir: str | Path) -> dict[str, Path]:
    """``cribo_table{1,2,3}.{csv,md}`` under ``out_dir``; returns the CSV paths by table."""
    from cribo.config import atomic_write_text

    out_dir = Path(out_dir)
    written = {}
    for number, table in enumerate(LAYOUTS, start=1):
        frame = build_paper_table(rows, paper, table)
        atomic_write_text(out_dir / f"cribo_table{number}.csv", frame.to_csv(index=False))
        atomic_write_text(out_dir / f"cribo_table{number}.md", to_paper_markdown(frame, table))
        written[table] = out_dir / f"cribo_table{number}.csv"
    return written
