"""Paper comparison tables: our evaluation rows beside the published numbers, with the difference.

Published numbers live in ``config/paper_results.yaml`` (one entry per number, with its source and
confidence). For each protocol, our rows are grouped by what identifies a result (method, arch,
patch size, pretraining data, dataset and the protocol's setting: training fraction, linear
protocol, decoder, number of clusters), summarised as mean and sample standard deviation over the
seeds, and outer-joined with the published entries on the same key:

- a published entry with ``protocol: null`` (the source does not say) matches any linear protocol;
- an in-context entry with a ``memory_size`` matches only rows with that memory size;
- the VOC07 SVM protocols report mAP (``map``) instead of mIoU; a low-shot entry matches on ``k`` and
  the cost selection (``test`` for the published, official numbers); detection rows are compared
  twice, box AP (``detect_box``, entries keyed ``AP_bb``) and mask AP (``detect_mask``, ``AP_mk``);
  linear and semi-supervised classification on ``top1`` (semi: per subset list, ``1percent`` / ``10percent``;
  of the rows of a (lr, head_lr_mult) grid, the best top-1 is compared, and the ``grid`` column says which
  point and of how many: ORL does not say how it chose, and the only held-out split is the one reported,
  so the selection is on it, like the official low-shot SVM cost);
- ``delta`` = ours - paper; a missing side leaves its cells empty.

Published entries that match none of our rows are listed when their dataset is one we evaluated
(``all_paper`` lists every one), so a table shows what a run still lacks.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import yaml

KEY = ["method", "arch", "patch_size", "pretrain", "dataset"]
SETTINGS = {"incontext": ["fraction"], "linear": ["protocol"], "finetune": ["decoder"], "overcluster": ["clusters"],
            "svm": [], "svm_lowshot": ["k", "cost_selection"], "detect_box": [], "detect_mask": [],
            "classify_linear": [], "classify_semi": ["subset"]}
PROTOCOLS = tuple(SETTINGS)
# the number each section compares: mIoU for the dense protocols, mAP for the VOC07 SVMs, COCO AP for
# detection (box and mask from the same rows), top-1 for linear classification
METRIC = {**{p: "miou" for p in PROTOCOLS}, "svm": "map", "svm_lowshot": "map", "detect_box": "AP_bb",
          "detect_mask": "AP_mk", "classify_linear": "top1", "classify_semi": "top1"}
# shown beside the settings, not matched against the published entries
EXTRA_COLUMNS = {"incontext": ["memory_size", "incontext_protocol"], "classify_semi": ["grid"]}
# the rows a section reads (``protocol`` of the row), when it is not the section's own name
ROW_PROTOCOL = {"detect_box": "detect", "detect_mask": "detect"}
_REQUIRED = {"method", "arch", "patch_size", "pretrain", "dataset", "source"}
CONFIDENCES = ("verified", "table", "figure")
# The ``published`` section (every number of the research file, see tools/published_numbers.py)
PUBLISHED_REQUIRED = {"ref", "label", "method", "arch", "patch_size", "pretrain", "epochs", "protocol", "evaluator",
                      "dataset", "miou", "source", "where", "origin", "table"}
ORIGINS = ("ORIG", "ORIG-repo", "B-pub", "B-repro", "B-copied", "R-NeCo", "L-DIP", "E-OH", "R-OH")
EVALUATORS = ("cribo", "hummingbird", "open-hbird", "dip")
PUBLISHED_TABLES = {"table1": "incontext", "table2": "linear", "table3": "finetune"}
FRACTIONS = (1 / 128, 1 / 64, 1 / 8, 1.0)


class PaperResultsError(ValueError):
    """config/paper_results.yaml is malformed; the message names the entry and the key."""


def load_paper_results(path: str | Path) -> dict:
    """Read and check the published numbers; returns ``{"sources": ..., protocol: [entries]}``."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise PaperResultsError(f"cannot read {path}: {err}") from err
    if not isinstance(data, dict) or "sources" not in data:
        raise PaperResultsError(f"{path}: expected a mapping with 'sources' and the protocols {', '.join(PROTOCOLS)}")
    sources = data["sources"]
    for name, source in sources.items():
        if source.get("confidence") not in CONFIDENCES:
            raise PaperResultsError(f"{path}: sources.{name}.confidence must be one of {', '.join(CONFIDENCES)}")
    unknown = set(data) - {"sources", "published", *PROTOCOLS}
    if unknown:
        raise PaperResultsError(f"{path}: unknown section(s) {sorted(unknown)}; allowed: sources, published, "
                                f"{', '.join(PROTOCOLS)}")
    data["published"] = _check_published(path, data.get("published") or [], sources)
    for protocol in PROTOCOLS:
        entries = data.get(protocol) or []
        data[protocol] = entries
        for i, entry in enumerate(entries):
            where = f"{path}: {protocol}[{i}]"
            metric = METRIC[protocol]
            required = _REQUIRED | {metric} | set(SETTINGS[protocol])
            missing = sorted(required - set(entry) - ({"protocol"} if protocol == "linear" else set()))
            if missing:
                raise PaperResultsError(f"{where} lacks {', '.join(missing)}")
            if entry["source"] not in sources:
                raise PaperResultsError(f"{where}: source {entry['source']!r} is not under 'sources'")
            if not isinstance(entry[metric], (int, float)) or not 0 <= entry[metric] <= 100:
                raise PaperResultsError(f"{where}: {metric} must be a number in [0, 100], got {entry[metric]!r}")
    return data


def _check_published(path: Path, entries: list, sources: dict) -> list[dict]:
    """Every published number names its row in the research file, its source and origin, and a
    setting the paper-shaped tables can place; a slip is reported with the entry's ``ref``."""
    from cribo.data.registry import known_datasets

    datasets = known_datasets()
    seen = set()
    for i, entry in enumerate(entries):
        where = f"{path}: published[{i}]" + (f" (ref {entry.get('ref')})" if isinstance(entry, dict) else "")
        if not isinstance(entry, dict):
            raise PaperResultsError(f"{where}: expected a mapping")
        missing = sorted(PUBLISHED_REQUIRED - set(entry))
        if missing:
            raise PaperResultsError(f"{where} lacks {', '.join(missing)}")
        if entry["ref"] in seen:
            raise PaperResultsError(f"{where}: ref {entry['ref']} appears twice")
        seen.add(entry["ref"])
        checks = [("source", entry["source"] in sources, "a key under 'sources'"),
                  ("origin", entry["origin"] in ORIGINS, f"one of {', '.join(ORIGINS)}"),
                  ("evaluator", entry["evaluator"] in EVALUATORS, f"one of {', '.join(EVALUATORS)}"),
                  ("dataset", entry["dataset"] in datasets, f"a registered dataset ({', '.join(datasets)})"),
                  ("table", PUBLISHED_TABLES.get(entry["table"]) == entry["protocol"],
                   "table1 (incontext), table2 (linear) or table3 (finetune), agreeing with 'protocol'"),
                  ("miou", isinstance(entry["miou"], (int, float)) and 0 <= entry["miou"] <= 100,
                   "a number in [0, 100]")]
        if entry["protocol"] == "incontext":
            fraction = entry.get("fraction")
            checks.append(("fraction", isinstance(fraction, (int, float))
                           and any(abs(fraction - f) < 1e-9 for f in FRACTIONS), "one of 1/128, 1/64, 1/8, 1"))
        for key, ok, expected in checks:
            if not ok:
                raise PaperResultsError(f"{where}: {key} {entry[key] if key in entry else None!r} must be {expected}")
    return entries


def _our_setting(protocol: str, row: dict) -> dict:
    if protocol == "incontext":  # the protocol variant rides with the memory size: both change the number
        return {"fraction": float(row["fraction"]), "memory_size": row.get("memory_size"),
                "incontext_protocol": row.get("incontext_protocol") or "clean"}
    if protocol == "linear":
        return {"protocol": row.get("protocol_name")}
    if protocol == "finetune":
        return {"decoder": row.get("decoder")}
    if not SETTINGS[protocol]:  # svm, detection, linear classification: no setting beyond the key
        return {}
    if protocol == "svm_lowshot":
        return {"k": int(row["k"]), "cost_selection": row.get("cost_selection")}
    if protocol == "classify_semi":
        return {"subset": row.get("subset"), "grid": row.get("grid")}
    clusters = "classes" if row.get("matching") == "hungarian" else int(row["clusters"])
    return {"clusters": clusters}


def our_results(rows: list[dict], protocol: str) -> pd.DataFrame:
    """Our rows of ``protocol`` grouped by run and setting: mean, sample std and count over seeds."""
    records = []
    if protocol == "classify_semi":
        rows = best_of_grid(rows)
    for row in rows:
        if row.get("protocol") != ROW_PROTOCOL.get(protocol, protocol):
            continue
        records.append({"run_name": row.get("run_name"), "experiment": row.get("experiment"),
                        **{k: row.get(k) for k in KEY if k != "pretrain"},
                        "pretrain": row.get("pretrain_data"), **_our_setting(protocol, row),
                        "miou": float(row[METRIC[protocol]]), **_spread(protocol, row)})
    columns = ["experiment", "run_name", *KEY, *SETTINGS[protocol], *EXTRA_COLUMNS.get(protocol, [])]
    if not records:
        return pd.DataFrame(columns=columns + ["ours", "ours_std", "seeds"])
    frame = pd.DataFrame(records)
    frame = frame.astype({c: object for c in columns})
    out = []
    for key, group in frame.groupby(columns, dropna=False, sort=True):
        values = group["miou"].to_numpy()
        if len(values) > 1:
            spread, seeds = float(np.std(values, ddof=1)), len(values)
        else:
            spread, seeds = float(group["spread"].iloc[0]), int(group["n"].iloc[0])
        out.append({**dict(zip(columns, key)), "ours": float(values.mean()), "ours_std": spread, "seeds": seeds})
    return pd.DataFrame(out)


def best_of_grid(rows: list[dict]) -> list[dict]:
    """The semi-supervised rows reduced to the best top-1 of each (lr, head_lr_mult) grid.

    Rows that differ only in the grid point (same experiment, run, checkpoint, dataset, subset list, seed
    and schedule) form one grid; its best row is kept, with ``grid`` saying which point won and of how
    many (``lr 0.01, head x10 (best of 9)``). Other rows pass through unchanged.
    """
    def key(row: dict) -> tuple:
        return tuple(str(row.get(k)) for k in ("experiment", "run_name", "checkpoint_sha256", "dataset", "subset",
                                               "subset_sha256", "seed", "epochs", "steps", "weight_decay",
                                               "image_size", "batch_size"))

    grids: dict[tuple, list[dict]] = {}
    out = []
    for row in rows:
        if row.get("protocol") == "classify_semi":
            grids.setdefault(key(row), []).append(row)
        else:
            out.append(row)
    for grid in grids.values():
        best = max(grid, key=lambda r: (float(r["top1"]), float(r.get("top5") or 0)))
        lr, mult = best.get("lr"), best.get("head_lr_mult")
        label = f"lr {lr:g}, head x{mult:g}" if lr is not None and mult is not None else "grid point not recorded"
        out.append({**best, "grid": f"{label} (best of {len(grid)})" if len(grid) > 1 else label})
    return out


def _spread(protocol: str, row: dict) -> dict:
    """The spread a single row already holds: over k-means seeds (overclustering) or low-shot samples."""
    if protocol == "overcluster":
        return {"spread": float(row["miou_std"]), "n": len(row.get("seeds") or [0])}
    if protocol == "svm_lowshot":
        return {"spread": float(row["map_std"]), "n": int(row["samples"])}
    return {"spread": np.nan, "n": 1}


def _matches(entry: dict, ours: dict, protocol: str) -> bool:
    if any(entry[k] != ours[k] for k in KEY):
        return False
    if protocol == "incontext":
        if abs(float(entry["fraction"]) - float(ours["fraction"])) > 1e-9:
            return False
        return entry.get("memory_size") is None or entry["memory_size"] == ours.get("memory_size")
    if protocol == "linear":
        return entry.get("protocol") is None or entry["protocol"] == ours["protocol"]
    return all(entry[setting] == ours[setting] for setting in SETTINGS[protocol])


def paper_table(rows: list[dict], paper: dict, protocol: str, all_paper: bool = False) -> pd.DataFrame:
    """Our results of ``protocol`` beside the published ones: one line per (our result, matching entry)."""
    ours = our_results(rows, protocol)
    entries = paper.get(protocol) or []
    sources = paper["sources"]
    settings = SETTINGS[protocol] + EXTRA_COLUMNS.get(protocol, [])
    lines, used = [], set()
    for record in ours.to_dict("records"):
        matched = [i for i, e in enumerate(entries) if _matches(e, record, protocol)]
        used.update(matched)
        for i in matched or [None]:
            entry = entries[i] if i is not None else {}
            lines.append({**{k: record[k] for k in ["experiment", "run_name", *KEY, *settings]},
                          "ours": record["ours"], "ours_std": record["ours_std"], "seeds": record["seeds"],
                          "paper": entry.get(METRIC[protocol]), "source": entry.get("source"),
                          "confidence": sources[entry["source"]]["confidence"] if entry else None})
    datasets = set(ours["dataset"]) if len(ours) else set()
    for i, entry in enumerate(entries):
        if i in used or not (all_paper or entry["dataset"] in datasets):
            continue
        lines.append({"experiment": None, "run_name": None, **{k: entry[k] for k in KEY},
                      **{k: entry.get(k) for k in settings}, "ours": None, "ours_std": None, "seeds": None,
                      "paper": entry[METRIC[protocol]], "source": entry["source"],
                      "confidence": sources[entry["source"]]["confidence"]})
    columns = ["experiment", "run_name", *KEY, *settings, "ours", "ours_std", "seeds", "paper", "delta", "source",
               "confidence"]
    if not lines:
        return pd.DataFrame(columns=columns)
    table = pd.DataFrame(lines)
    table["ours"] = pd.to_numeric(table["ours"])
    table["paper"] = pd.to_numeric(table["paper"])
    table["delta"] = table["ours"] - table["paper"]
    table = table[columns]
    order = ["dataset", *SETTINGS[protocol], "method", "pretrain", "arch"]
    table = table.sort_values(order, key=lambda s: s.astype(str), kind="stable").reset_index(drop=True)
    return table.round({"ours": 2, "ours_std": 2, "delta": 2})


def write_paper_tables(rows: list[dict], paper_path: str | Path, out_dir: str | Path,
                       all_paper: bool = False) -> dict[str, Path]:
    """``paper_<protocol>.{csv,md}`` for each protocol under ``out_dir``."""
    from cribo.config import atomic_write_text
    from cribo.results.tables import to_markdown

    paper = load_paper_results(paper_path)
    out_dir = Path(out_dir)
    written = {}
    for protocol in PROTOCOLS:
        table = paper_table(rows, paper, protocol, all_paper)
        csv_path, md_path = out_dir / f"paper_{protocol}.csv", out_dir / f"paper_{protocol}.md"
        atomic_write_text(csv_path, table.to_csv(index=False))
        atomic_write_text(md_path, to_markdown(table))
        written[protocol] = csv_path
    return written
