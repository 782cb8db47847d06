"""CrIBo's Tables 1-3 in the paper's shape, built from hand-written rows and published entries."""

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from cribo.results.paper import PaperResultsError, load_paper_results
from cribo.results.paper_figure import draw_cribo_tables
from cribo.results.paper_tables import build_paper_table, to_paper_markdown, write_cribo_tables

SOURCES = {"S1": {"cite": "paper", "confidence": "table"}, "S2": {"cite": "readme", "confidence": "verified"},
           "S3": {"cite": "dip", "confidence": "table"}}


def _pub(ref, miou, *, dataset="voc", fraction=1.0, table="table1", label="CrIBo", method="cribo",
         pretrain="coco", epochs=300, source="S1", origin="ORIG", evaluator="cribo", **extra):
    protocol = {"table1": "incontext", "table2": "linear", "table3": "finetune"}[table]
    entry = {"ref": ref, "label": label, "method": method, "arch": "vit_small", "patch_size": 16,
             "pretrain": pretrain, "epochs": epochs, "protocol": protocol, "evaluator": evaluator,
             "dataset": dataset, "miou": miou, "source": source, "where": "t", "origin": origin, "table": table,
             **extra}
    if protocol == "incontext":
        entry["fraction"] = fraction
    return entry


PUBLISHED = [
    _pub(1, 39.1, fraction=1 / 128), _pub(2, 58.1), _pub(3, 23.4, dataset="ade20k"),
    _pub(4, 31.9, label="DINO †", method="dino", origin="B-repro"),
    _pub(5, 72.4, label="CrIBo †", pretrain=None, epochs=None, source="S3", origin="R-NeCo",
         evaluator="open-hbird", pretrain_printed="not stated"),
    _pub(6, 61.0, table="table2"), _pub(7, 74.2, table="table3", dataset="pascal-context"),
]
PAPER = {"sources": SOURCES, "incontext": [], "linear": [], "finetune": [], "overcluster": [],
         "published": PUBLISHED}


def _row(protocol, miou, run="cribo", **extra):
    base = {"protocol": protocol, "experiment": "e", "run_name": run, "method": "cribo", "arch": "vit_small",
            "patch_size": 16, "pretrain_data": "coco", "pretrain_epochs": 300, "dataset": "voc", "miou": miou}
    return {**base, **extra}


def _line(frame, section_prefix, run=None):
    chosen = frame[frame["section"].str.startswith(section_prefix)]
    chosen = chosen[chosen["run"].isna()] if run is None else chosen[chosen["run"] == run]
    assert len(chosen) == 1, chosen
    return chosen.iloc[0]


def test_table1_has_the_paper_columns_and_fills_matching_rows_with_the_seed_mean():
    rows = [_row("incontext", 56.0, fraction=1.0, seed=0), _row("incontext", 57.0, fraction=1.0, seed=1),
            _row("incontext", 40.0, fraction=1 / 128, seed=0)]
    frame = build_paper_table(rows, PAPER, "table1")
    assert list(frame.columns[6::4]) == [f"{d} {f} ours" for d in ("ADE20K", "Pascal VOC")
                                         for f in ("1/128", "1/64", "1/8", "1/1")]
    cribo = frame[(frame["method"] == "CrIBo") & (frame["section"] == "CrIBo paper")].iloc[0]
    assert cribo["run"] == "e/cribo"
    assert cribo["Pascal VOC 1/1 ours"] == pytest.approx((56.0 + 57.0) / 2)
    assert cribo["Pascal VOC 1/1 delta"] == pytest.approx(56.5 - 58.1)
    assert cribo["Pascal VOC 1/128 delta"] == pytest.approx(40.0 - 39.1)
    assert cribo["ADE20K 1/1 paper"] == 23.4 and cribo["ADE20K 1/1 ours"] != cribo["ADE20K 1/1 ours"]  # NaN: no run
    dino = _line(frame, "CrIBo paper")  # DINO's row: no run of ours matches it
    assert dino["method"] == "DINO †" and dino["Pascal VOC 1/1 paper"] == 31.9
    md = to_paper_markdown(frame, "table1")
    assert "| 56.50 / 58.1 (-1.60) |" in md and "| - / 31.9 |" in md
    # a published row whose pretraining data is not stated is matched on method and backbone, marked "?"
    dip = _line(frame, "DIP", run="e/cribo ?")
    assert dip["Pascal VOC 1/1 paper"] == 72.4 and dip["Pascal VOC 1/1 comparable"] == False  # noqa: E712
    assert "| e/cribo ? |" in md


def test_rows_of_another_epoch_count_or_dataset_get_their_own_line_with_extra_columns():
    rows = [_row("incontext", 50.0, run="short", fraction=1.0, pretrain_epochs=3),
            _row("incontext", 12.0, run="toy", dataset="toyscenes", fraction=0.125, pretrain_data="toyscenes")]
    # without the row of unstated pretraining data and epochs, which any cribo ViT-S/16 run matches
    paper = {**PAPER, "published": [e for e in PUBLISHED if e["pretrain"] is not None]}
    frame = build_paper_table(rows, paper, "table1")
    assert not (frame["run"] == "e/short").loc[frame["section"] == "CrIBo paper"].any()
    short = _line(frame, "our runs", run="e/short")
    assert short["Pascal VOC 1/1 ours"] == 50.0 and short["Pascal VOC 1/1 paper"] != short["Pascal VOC 1/1 paper"]
    toy = _line(frame, "our runs", run="e/toy")
    assert toy["toyscenes 1/8 ours"] == 12.0 and "| 12.00 |" in to_paper_markdown(frame, "table1")


def test_imported_checkpoint_without_epochs_fills_the_row():
    rows = [_row("incontext", 30.0, run="dino_coco", method="dino", fraction=1.0, pretrain_epochs=None)]
    frame = build_paper_table(rows, PAPER, "table1")
    assert _line(frame, "CrIBo paper", run="e/dino_coco")["Pascal VOC 1/1 delta"] == pytest.approx(30.0 - 31.9)


def test_a_published_number_is_compared_only_with_a_compatible_protocol():
    published = PUBLISHED + [_pub(8, 50.0, label="CrIBo †", source="S3", origin="R-NeCo", evaluator="open-hbird"),
                             _pub(9, 51.0, label="CrIBo ‡", source="S3", origin="L-DIP", evaluator="dip")]
    paper = {**PAPER, "published": published}
    rows = [_row("incontext", 55.0, fraction=1.0, incontext_protocol="open-hbird")]
    frame = build_paper_table(rows, paper, "table1")
    ours_paper = _line(frame, "CrIBo paper", run="e/cribo")
    assert ours_paper["Pascal VOC 1/1 comparable"] is False or ours_paper["Pascal VOC 1/1 comparable"] == False  # noqa: E712
    assert ours_paper["Pascal VOC 1/1 delta"] != ours_paper["Pascal VOC 1/1 delta"]  # NaN: no difference
    dip_rows = frame[(frame["section"].str.startswith("DIP")) & (frame["run"] == "e/cribo")]
    by_label = {r["method"]: r for r in dip_rows.to_dict("records")}
    assert by_label["CrIBo †"]["Pascal VOC 1/1 delta"] == pytest.approx(55.0 - 50.0)
    assert by_label["CrIBo ‡"]["Pascal VOC 1/1 comparable"] == False  # noqa: E712 (DIP's own evaluator)
    md = to_paper_markdown(frame, "table1")
    assert "| 55.00* / 58.1 |" in md and "| 55.00 / 50.0 (+5.00) |" in md


def test_tables_2_and_3_compare_mmseg_and_the_mask_decoder():
    rows = [_row("linear", 60.0, protocol_name="mmseg"), _row("linear", 64.0, run="lp", protocol_name="leopart"),
            _row("finetune", 70.0, dataset="pascal-context", decoder="mask")]
    linear = build_paper_table(rows, PAPER, "table2")
    assert list(linear.columns[6::4]) == ["Pascal Context ours", "Pascal VOC ours", "COCO-Stuff-164K ours",
                                          "ADE20K ours"]
    assert _line(linear, "CrIBo paper", run="e/cribo")["Pascal VOC delta"] == pytest.approx(60.0 - 61.0)
    leopart = _line(linear, "CrIBo paper", run="e/lp")
    assert leopart["Pascal VOC comparable"] == False and leopart["Pascal VOC ours"] == 64.0  # noqa: E712
    finetune = build_paper_table(rows, PAPER, "table3")
    assert _line(finetune, "CrIBo paper", run="e/cribo")["Pascal Context delta"] == pytest.approx(70.0 - 74.2)


def test_published_section_is_validated(tmp_path):
    path = tmp_path / "p.yaml"
    for entry, message in [({**PUBLISHED[0], "origin": "guess"}, r"ref 1\): origin 'guess' must be one of"),
                           ({**PUBLISHED[0], "fraction": 0.3}, r"fraction 0.3 must be one of 1/128"),
                           ({**PUBLISHED[0], "table": "table2"}, r"table 'table2' must be table1"),
                           ({**PUBLISHED[0], "dataset": "pascal"}, r"dataset 'pascal' must be a registered dataset"),
                           ({k: v for k, v in PUBLISHED[0].items() if k != "where"}, r"lacks where")]:
        path.write_text(yaml.safe_dump({**PAPER, "published": [entry]}, allow_unicode=True))
        with pytest.raises(PaperResultsError, match=message):
            load_paper_results(path)
    path.write_text(yaml.safe_dump({**PAPER, "published": [PUBLISHED[0], PUBLISHED[0]]}, allow_unicode=True))
    with pytest.raises(PaperResultsError, match="ref 1 appears twice"):
        load_paper_results(path)


def test_shipped_published_numbers_are_complete_and_consistent():
    published = load_paper_results("config/paper_results.yaml")["published"]
    assert sorted(e["ref"] for e in published) == list(range(1, 366))
    tables = [e["table"] for e in published]
    # CrIBo's Table 1 has 13 published rows x 8 columns minus the 4 + 2 cells the copied rows leave empty
    assert tables.count("table2") == 12 * 4 and tables.count("table3") == 11 * 4
    # the README's numbers are Table 1's at 1/1 (published-numbers.md, S2)
    paper = {(e["arch"], e["pretrain"], e["dataset"]): e["miou"] for e in published
             if e["source"] == "S1" and e["method"] == "cribo" and e["table"] == "table1" and e["fraction"] == 1.0}
    readme = {(e["arch"], e["pretrain"], e["dataset"]): e["miou"] for e in published if e["source"] == "S2"}
    assert len(readme) == 6 and readme == {k: paper[k] for k in readme}


def test_the_generator_reads_the_research_table():
    spec = importlib.util.spec_from_file_location("published_numbers",
                                                  Path(__file__).parents[1] / "tools" / "published_numbers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    markdown = "\n".join([
        "| # | method | backbone | data | ep | protocol | dataset | setting | metric | value | source | where | origin |",
        "| 7 | DINO † | ViT-S/16 | COCO | 300 | in-context (dense NN retrieval) | Pascal VOC 2012 | 1/64 | mIoU | 18.4 "
        "| S1 | Table 1 | B-repro |",
        "| 9 | DINO | ViT-B/16 | not stated | n/s | in-context (dense NN retrieval) | Pascal VOC 2012 | "
        "full train set, memory 1024*10^3 | mIoU | 50.8 | S5 | README | E-OH |",
        "| 11 | CrIBo | ViT-S/8 | COCO | 300 | linear (frozen backbone) | Pascal Context | full | mIoU | 40.6 | S1 "
        "| Table 2 | ORIG |"])
    first, second, third = module.parse(markdown)
    assert first | {} == {**first, "method": "dino", "arch": "vit_small", "patch_size": 16, "pretrain": "coco",
                          "epochs": 300, "fraction": 1 / 64, "evaluator": "cribo", "table": "table1", "miou": 18.4}
    assert second["memory_size"] == 1_024_000 and second["pretrain"] is None and second["evaluator"] == "open-hbird"
    assert third["table"] == "table2" and third["dataset"] == "pascal-context" and "fraction" not in third


def test_written_files(tmp_path):
    write_cribo_tables([_row("incontext", 57.0, fraction=1.0)], PAPER, tmp_path)
    for n in (1, 2, 3):
        assert (tmp_path / f"cribo_table{n}.md").read_text().startswith(f"# Table {n}:")
        assert (tmp_path / f"cribo_table{n}.csv").read_text().startswith("section,method,backbone")
    png = draw_cribo_tables([_row("incontext", 57.0, fraction=1.0), _row("linear", 60.0, protocol_name="mmseg")],
                            PAPER, tmp_path / "cribo_tables.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not list(tmp_path.glob("*.tmp.png"))


def test_cribo_table_command_writes_the_three_tables_and_the_figure_from_rows(tmp_path):
    from cribo.cli import main

    rows = tmp_path / "rows"
    rows.mkdir()
    for seed, miou in ((0, 20.0), (1, 22.0)):
        row = _row("incontext", miou, run="toy_dino", method="dino", arch="vit_tiny", dataset="toyscenes",
                   pretrain_data="toyscenes", pretrain_epochs=3, fraction=1.0, seed=seed, miou_hungarian=miou)
        (rows / f"s{seed}.json").write_text(json.dumps(row))
    out = tmp_path / "tables"
    assert main(["table", "--rows", str(rows), "--out", str(out), "--paper", "config/paper_results.yaml"]) == 0
    table1 = (out / "cribo_table1.md").read_text()
    # every published row is there, our toy run gets its own line with its own column
    published = load_paper_results("config/paper_results.yaml")["published"]
    ade = {e["fraction"]: e["miou"] for e in published if e["source"] == "S1" and e["method"] == "cribo"
           and e["pretrain"] == "coco" and e["dataset"] == "ade20k" and e["table"] == "table1"}
    cells = " | ".join(f"- / {ade[f]:.1f}" for f in (1 / 128, 1 / 64, 1 / 8, 1.0))
    assert f"| CrIBo paper | CrIBo | ViT-S/16 | COCO | 300 |  | {cells} |" in table1
    assert "| our runs without a published row | dino | ViT-T/16 | toyscenes | 3 | e/toy_dino |" in table1
    assert "| 21.00 |" in table1
    assert (out / "cribo_table2.csv").is_file() and (out / "cribo_table3.md").is_file()
    assert (out / "cribo_tables.png").read_bytes()[:4] == b"\x89PNG"
