"""Result tables built from JSON rows, never typed by hand.

``build_incontext_table`` groups the in-context rows by experiment, run, method, arch, dataset and
training fraction, and reports the mean mIoU over evaluation seeds with its standard deviation
and the number of seeds. The same frame is written as CSV (for programs) and Markdown (for
people), plus a flat ``metrics.json`` that DVC compares across experiments. Overclustering rows
(``build_overcluster_table``) become ``overcluster.{csv,md}``, one line per (run, K), and linear-probe
rows (``build_linear_table``) ``linear.{csv,md}``, fine-tuning rows (``build_finetune_table``)
``finetune.{csv,md}``, VOC07 SVM and low-shot rows (``build_svm_table``) ``svm.{csv,md}``, detection rows
(``build_detect_table``) ``detect.{csv,md}``, classification rows (``build_classify_table``)
``classify.{csv,md}``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from cribo.config import atomic_write_text

GROUP_COLUMNS = ["experiment", "run_name", "run_id", "method", "arch", "dataset", "incontext_protocol", "fraction"]


class RowError(ValueError):
    pass


def read_rows(paths: list[str | Path]) -> list[dict]:
    """All ``*.json`` rows under the given files or folders (recursively), sorted by path."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            files.extend(sorted(path.rglob("*.json")))
        elif path.is_file():
            files.append(path)
        else:
            raise RowError(f"no such file or folder: {path}")
    rows = []
    for file in sorted(set(files)):
        try:
            row = json.loads(file.read_text())
        except json.JSONDecodeError as err:
            raise RowError(f"{file}: not valid JSON ({err})") from err
        if isinstance(row, dict) and "protocol" in row:
            rows.append({**row, "_source": str(file)})
    return rows


def build_incontext_table(rows: list[dict]) -> pd.DataFrame:
    """One line per (experiment, run, dataset, protocol, fraction): mean and std of mIoU over seeds."""
    rows = [r for r in rows if r.get("protocol") == "incontext"]
    if not rows:
        raise RowError("no in-context rows (protocol 'incontext') among the given rows")
    frame = pd.DataFrame(rows)
    for col in GROUP_COLUMNS:
        if col not in frame:
            frame[col] = None
    frame["incontext_protocol"] = frame["incontext_protocol"].fillna("clean")  # rows from before the choice
    frame[GROUP_COLUMNS] = frame[GROUP_COLUMNS].fillna("-")
    if "pixel_accuracy" not in frame:  # rows written before pixel accuracy was recorded
        frame["pixel_accuracy"] = float("nan")
    grouped = frame.groupby(GROUP_COLUMNS, sort=True)
    table = grouped.agg(
        miou=("miou", "mean"), miou_std=("miou", "std"),
        miou_hungarian=("miou_hungarian", "mean"), pixel_accuracy=("pixel_accuracy", "mean"),
        seeds=("seed", "nunique"),
    ).reset_index()
    table["miou_std"] = table["miou_std"].fillna(0.0)
    return table.round({"miou": 2, "miou_std": 2, "miou_hungarian": 2, "pixel_accuracy": 2})


OVERCLUSTER_COLUMNS = ["experiment", "run_name", "run_id", "method", "arch", "dataset", "clusters", "matching"]


def build_overcluster_table(rows: list[dict]) -> pd.DataFrame:
    """One line per (experiment, run, dataset, K): mIoU mean and std over k-means seeds (held in each row)
    and pixel accuracy (empty for rows written before overclustering reported it)."""
    columns = OVERCLUSTER_COLUMNS + ["miou", "miou_std", "pixel_accuracy", "seeds"]
    frame = _protocol_frame(rows, ("overcluster",), columns)
    if frame.empty:
        return frame
    frame[OVERCLUSTER_COLUMNS] = frame[OVERCLUSTER_COLUMNS].fillna("-")
    frame["seeds"] = frame["seeds"].map(len)
    table = frame[columns].sort_values(OVERCLUSTER_COLUMNS[:2] + ["dataset", "clusters"]).reset_index(drop=True)
    return table.round({"miou": 2, "miou_std": 2, "pixel_accuracy": 2})


LINEAR_COLUMNS = ["experiment", "run_name", "run_id", "method", "arch", "dataset", "protocol_name", "image_size",
                  "mask_size", "epochs", "iterations"]
FINETUNE_COLUMNS = ["experiment", "run_name", "run_id", "method", "arch", "dataset", "decoder", "image_size",
                    "iterations", "lr", "layer_decay"]


def build_linear_table(rows: list[dict]) -> pd.DataFrame:
    """One line per linear-probe row: mIoU (identity mapping) and the protocol's settings
    (``epochs`` for leopart, ``iterations`` for mmseg; the other is empty)."""
    return _segmentation_table(rows, "linear", LINEAR_COLUMNS)


def build_finetune_table(rows: list[dict]) -> pd.DataFrame:
    """One line per fine-tuning row: mIoU (identity mapping), decoder and schedule."""
    return _segmentation_table(rows, "finetune", FINETUNE_COLUMNS)


def _protocol_frame(rows: list[dict], protocols: tuple[str, ...], columns: list[str]) -> pd.DataFrame:
    """The rows of ``protocols`` as a frame holding every one of ``columns`` (missing cells None; no rows:
    an empty frame with those columns)."""
    rows = [r for r in rows if r.get("protocol") in protocols]
    if not rows:
        return pd.DataFrame(columns=columns)
    frame = pd.DataFrame(rows)
    for col in columns:
        if col not in frame:
            frame[col] = None
    return frame


def _segmentation_table(rows: list[dict], protocol: str, settings: list[str]) -> pd.DataFrame:
    columns = settings + ["miou", "pixel_accuracy"]
    frame = _protocol_frame(rows, (protocol,), columns)
    if frame.empty:
        return frame
    order = ["experiment", "run_name", "dataset", settings[6]]
    table = frame[columns].sort_values(order).reset_index(drop=True)
    return table.round({"miou": 2, "pixel_accuracy": 2})


SVM_COLUMNS = ["experiment", "run_name", "run_id", "method", "arch", "dataset", "protocol", "k", "cost_selection",
               "selects_on_test", "samples", "image_size", "feature_dim"]


def build_svm_table(rows: list[dict]) -> pd.DataFrame:
    """VOC07 SVM rows (``k`` empty) and low-shot rows (one per k and cost selection): mAP, and for
    low-shot its sample standard deviation over the random training sets."""
    columns = SVM_COLUMNS + ["map", "map_std"]
    frame = _protocol_frame(rows, ("svm", "svm_lowshot"), columns)
    if frame.empty:
        return frame
    frame["k"] = frame["k"].astype("Int64")
    table = frame[columns].sort_values(["experiment", "run_name", "dataset", "protocol", "k", "cost_selection"],
                                       na_position="first").reset_index(drop=True)
    return table.round({"map": 2, "map_std": 2})


DETECT_COLUMNS = ["experiment", "run_name", "run_id", "method", "arch", "pretrain_data", "dataset", "iterations",
                  "batch_size", "test_size"]
DETECT_METRICS = ["AP_bb", "AP50_bb", "AP75_bb", "AP_mk", "AP50_mk", "AP75_mk"]


def build_detect_table(rows: list[dict]) -> pd.DataFrame:
    """Detection rows: box and mask AP / AP50 / AP75 (%) with the schedule run and seconds per iteration."""
    columns = DETECT_COLUMNS + DETECT_METRICS + ["seconds_per_iteration"]
    frame = _protocol_frame(rows, ("detect",), columns)
    if frame.empty:
        return frame
    table = frame[columns].sort_values(["experiment", "run_name", "dataset"]).reset_index(drop=True)
    return table.round({**{m: 2 for m in DETECT_METRICS}, "seconds_per_iteration": 3})


CLASSIFY_COLUMNS = ["experiment", "run_name", "run_id", "method", "arch", "dataset", "protocol", "subset",
                    "train_images", "epochs", "lr", "head_lr_mult", "weight_decay", "image_size"]
CLASSIFY_METRICS = ["top1", "top5"]


def build_classify_table(rows: list[dict]) -> pd.DataFrame:
    """Classification rows (linear on frozen features; semi-supervised, one per subset list): top-1 / top-5 (%)."""
    columns = CLASSIFY_COLUMNS + CLASSIFY_METRICS
    frame = _protocol_frame(rows, ("classify_linear", "classify_semi"), columns)
    if frame.empty:
        return frame
    table = frame[columns].sort_values(["experiment", "run_name", "dataset", "protocol", "subset", "lr",
                                        "head_lr_mult"], na_position="first").reset_index(drop=True)
    return table.round({m: 2 for m in CLASSIFY_METRICS})


METRIC_COLUMNS = {"ours", "paper", "delta", "base", "change", "map", *DETECT_METRICS, *CLASSIFY_METRICS}


def to_markdown(table: pd.DataFrame) -> str:
    """Markdown of ``table``: metrics (``miou*``, ``pixel_accuracy``, ``*_std``, ``ours``, ``paper``, ``delta``) with 2 decimals,
    settings in their shortest form (56, 0.001, 0.125), missing cells as ``-``."""
    header = "| " + " | ".join(table.columns) + " |"
    rule = "|" + "|".join("---" for _ in table.columns) + "|"
    lines = [header, rule]
    metric = [c.startswith(("miou", "pixel_accuracy")) or c.endswith("_std") or c in METRIC_COLUMNS
              for c in table.columns]
    for values in table.itertuples(index=False):
        lines.append("| " + " | ".join(_fmt(v, m) for v, m in zip(values, metric)) + " |")
    return "\n".join(lines) + "\n"


def _fmt(value, metric: bool = False) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != value:
            return "-"
        return f"{value:.2f}" if metric else f"{value:g}"
    return str(value)


def run_metrics(rows: list[dict]) -> pd.DataFrame:
    """One value per (experiment, run, metric), metrics named by protocol and setting, e.g.
    ``incontext toyscenes f=0.125`` (mean over seeds), ``overcluster toyscenes K=300``,
    ``linear toyscenes mmseg``, ``finetune toyscenes mask``."""
    records = []
    for r in rows:
        protocol = r.get("protocol")
        if protocol == "incontext":
            variant = r.get("incontext_protocol") or "clean"
            metric = f"incontext {r['dataset']} f={r['fraction']:g}" + ("" if variant == "clean" else f" {variant}")
        elif protocol == "overcluster":
            metric = f"overcluster {r['dataset']} K={'classes' if r.get('matching') == 'hungarian' else r['clusters']}"
        elif protocol == "linear":
            metric = f"linear {r['dataset']} {r.get('protocol_name')}"
        elif protocol == "finetune":
            metric = f"finetune {r['dataset']} {r.get('decoder')}"
        elif protocol == "svm":
            metric = f"svm {r['dataset']} mAP"
        elif protocol == "svm_lowshot":
            metric = f"svm {r['dataset']} k={r['k']} {r['cost_selection']} mAP"
        else:
            continue
        value = r["map"] if protocol.startswith("svm") else r["miou"]
        records.append({"experiment": r.get("experiment"), "run_name": r.get("run_name"), "metric": metric,
                        "value": float(value)})
    if not records:
        return pd.DataFrame(columns=["experiment", "run_name", "metric", "value"])
    frame = pd.DataFrame(records)
    return frame.groupby(["experiment", "run_name", "metric"], as_index=False, sort=True)["value"].mean()


def build_ablation_table(rows: list[dict], base: str) -> pd.DataFrame:
    """Each ablation run (named ``<base>~<key>=<value>``) against ``base``, metric by metric:
    ``setting | metric | base | ours | change`` (change = ours - base)."""
    metrics = run_metrics(rows)
    columns = ["experiment", "setting", "run_name", "metric", "base", "ours", "change"]
    base_values = metrics[metrics.run_name == base].set_index(["experiment", "metric"])["value"]
    lines = []
    for r in metrics[metrics.run_name.str.startswith(f"{base}~")].itertuples(index=False):
        reference = base_values.get((r.experiment, r.metric), float("nan"))
        lines.append({"experiment": r.experiment, "setting": r.run_name.split("~", 1)[1], "run_name": r.run_name,
                      "metric": r.metric, "base": reference, "ours": r.value, "change": r.value - reference})
    if not lines:
        return pd.DataFrame(columns=columns)
    table = pd.DataFrame(lines)[columns].sort_values(["experiment", "setting", "metric"]).reset_index(drop=True)
    return table.round({"base": 2, "ours": 2, "change": 2})


def classify_metric_key(table: pd.DataFrame, r) -> str:
    """``<dataset>_linear``, ``<dataset>_semi_<list>``, and ``..._lr<lr>_x<mult>`` when the list has several
    grid points in ``table`` for that run (one key per point: they would overwrite each other)."""
    if r.protocol == "classify_linear":
        return f"{r.dataset}_linear"
    key = f"{r.dataset}_semi_{r.subset}"
    same = ((table.protocol == "classify_semi") & (table.experiment == r.experiment) & (table.run_name == r.run_name)
            & (table.dataset == r.dataset) & (table.subset == r.subset))
    return key + (f"_lr{r.lr:g}_x{r.head_lr_mult:g}" if int(same.sum()) > 1 else "")


def _write_pair(out_dir: Path, name: str, table: pd.DataFrame) -> None:
    """``name.csv`` (for programs) and ``name.md`` (for people) of one table."""
    atomic_write_text(out_dir / f"{name}.csv", table.to_csv(index=False))
    atomic_write_text(out_dir / f"{name}.md", to_markdown(table))


def _add_metrics(metrics: dict, section: str, table: pd.DataFrame, values) -> None:
    """``metrics[section][experiment][run_name]`` gains ``values(line)`` (a dict) for each line of ``table``;
    nested, so `dvc metrics show` flattens it readably."""
    for r in table.itertuples(index=False):
        metrics.setdefault(section, {}).setdefault(r.experiment, {}).setdefault(r.run_name, {}).update(values(r))


def write_tables(row_paths: list[str | Path], out_dir: str | Path, ablation_base: str | None = None,
                 paper: str | Path | None = None) -> dict[str, Path]:
    out_dir = Path(out_dir)
    rows = read_rows(row_paths)
    table = build_incontext_table(rows)
    overclusters = build_overcluster_table(rows)
    _write_pair(out_dir, "overcluster", overclusters)
    linear = build_linear_table(rows)
    _write_pair(out_dir, "linear", linear)
    finetune = build_finetune_table(rows)
    _write_pair(out_dir, "finetune", finetune)
    csv_path, md_path, metrics_path = (out_dir / "incontext.csv", out_dir / "incontext.md",
                                       out_dir / "metrics.json")
    _write_pair(out_dir, "incontext", table)
    metrics: dict = {"incontext_miou": {}}

    def incontext_key(r) -> str:
        return f"{r.dataset}_f{r.fraction}" + ("" if r.incontext_protocol == "clean" else f"_{r.incontext_protocol}")

    _add_metrics(metrics, "incontext_miou", table, lambda r: {incontext_key(r): r.miou})
    _add_metrics(metrics, "linear_miou", linear, lambda r: {f"{r.dataset}_{r.protocol_name}": r.miou})
    _add_metrics(metrics, "finetune_miou", finetune, lambda r: {f"{r.dataset}_{r.decoder}": r.miou})
    _add_metrics(metrics, "overcluster_miou", overclusters, lambda r: {f"{r.dataset}_k{r.clusters}": r.miou})
    svm_table = build_svm_table(rows)
    _write_pair(out_dir, "svm", svm_table)
    _add_metrics(metrics, "svm_map", svm_table, lambda r: {
        f"{r.dataset}_{'full' if r.protocol == 'svm' else f'k{r.k}_{r.cost_selection}'}": r.map})
    classify = build_classify_table(rows)
    _write_pair(out_dir, "classify", classify)
    _add_metrics(metrics, "classify_top1", classify, lambda r: {classify_metric_key(classify, r): r.top1})
    detect = build_detect_table(rows)
    _write_pair(out_dir, "detect", detect)
    _add_metrics(metrics, "detect_ap", detect, lambda r: {f"{r.dataset}_box": r.AP_bb, f"{r.dataset}_mask": r.AP_mk})
    ablations = build_ablation_table(rows, ablation_base) if ablation_base else build_ablation_table([], "")
    _write_pair(out_dir, "ablations", ablations)
    if paper is not None:
        from cribo.results.paper import write_paper_tables

        from cribo.results.paper import load_paper_results
        from cribo.results.paper_figure import draw_cribo_tables
        from cribo.results.paper_tables import write_cribo_tables

        write_paper_tables(rows, paper, out_dir)
        write_cribo_tables(rows, load_paper_results(paper), out_dir)
        draw_cribo_tables(rows, load_paper_results(paper), out_dir / "cribo_tables.png")
    atomic_write_text(metrics_path, json.dumps(metrics, indent=1, sort_keys=True) + "\n")
    return {"csv": csv_path, "md": md_path, "metrics": metrics_path, "overcluster_csv": out_dir / "overcluster.csv",
            "overcluster_md": out_dir / "overcluster.md"}
