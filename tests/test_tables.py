import json

import pandas as pd
import pytest

from cribo.results.tables import RowError, build_incontext_table, read_rows, to_markdown, write_tables


def _row(run, miou, seed, fraction=1.0, **extra):
    return {"protocol": "incontext", "experiment": "toy", "run_name": run, "run_id": run[:8].ljust(8, "0"),
            "method": run, "arch": "vit_tiny", "dataset": "toyscenes", "fraction": fraction,
            "seed": seed, "miou": miou, "miou_hungarian": miou + 1, **extra}


def test_mean_and_sample_std_over_seeds():
    rows = [_row("dino", 40.0, 0, 0.125), _row("dino", 44.0, 1, 0.125), _row("dino", 45.0, 2, 0.125),
            _row("dino", 50.0, 0, 1.0)]
    table = build_incontext_table(rows)
    sub = table[table.fraction == 0.125].iloc[0]
    # mean (40+44+45)/3 = 43; sample variance ((-3)^2 + 1^2 + 2^2)/2 = 7 -> std sqrt(7)
    assert sub.miou == pytest.approx(43.0)
    assert sub.miou_std == pytest.approx(round(7 ** 0.5, 2))
    assert sub.seeds == 3
    full = table[table.fraction == 1.0].iloc[0]
    assert full.miou == 50.0 and full.miou_std == 0.0 and full.seeds == 1


def test_write_tables_from_folders(tmp_path):
    rows_dir = tmp_path / "rows"
    (rows_dir / "a").mkdir(parents=True)
    for i, row in enumerate([_row("random", 30.0, 0), _row("dino", 20.0, 0), _row("pixels", 35.5, 0)]):
        (rows_dir / "a" / f"{i}.json").write_text(json.dumps(row))
    (rows_dir / "note.json").write_text(json.dumps({"not": "a row"}))  # ignored: no protocol
    paths = write_tables([rows_dir], tmp_path / "tables")
    csv = pd.read_csv(paths["csv"])
    assert {"experiment", "method", "arch", "dataset", "fraction", "miou"} <= set(csv.columns)
    assert sorted(csv.method) == ["dino", "pixels", "random"]
    assert csv.set_index("method").miou["pixels"] == 35.5
    md = paths["md"].read_text()
    assert md.startswith("| experiment |") and "35.50" in md
    assert "| 1 |" in md  # fractions print exactly (0.125 would not become 0.12)
    metrics = json.loads(paths["metrics"].read_text())
    assert metrics["incontext_miou"]["toy"]["pixels"]["toyscenes_f1.0"] == 35.5


def test_no_rows_and_bad_json_are_clear_errors(tmp_path):
    with pytest.raises(RowError, match="no in-context rows"):
        build_incontext_table([])
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(RowError, match="bad.json"):
        read_rows([bad])
    with pytest.raises(RowError, match="no such file"):
        read_rows([tmp_path / "missing"])


def test_markdown_renders_every_cell():
    # metrics with two decimals; settings as written (integers stay integers in a column with NaN)
    table = pd.DataFrame({"a": ["x", "y"], "miou": [1.5, 2.0], "fraction": [0.125, 1.0], "epochs": [25.0, None]})
    assert to_markdown(table) == ("| a | miou | fraction | epochs |\n|---|---|---|---|\n"
                                  "| x | 1.50 | 0.125 | 25 |\n| y | 2.00 | 1 | - |\n")


def test_overcluster_table_one_line_per_k_and_metrics(tmp_path):
    from cribo.results.tables import build_overcluster_table

    def oc(run, k, miou, std):
        return {"protocol": "overcluster", "experiment": "toy", "run_name": run, "run_id": "0" * 8, "method": run,
                "arch": "vit_tiny", "dataset": "toyscenes", "clusters": k, "seed": None,
                "matching": "hungarian" if k == 9 else "many-to-one", "miou": miou, "miou_std": std,
                "seeds": [0, 1, 2]}

    table = build_overcluster_table([oc("cribo", 300, 40.123, 1.0), oc("cribo", 9, 12.0, 0.5), _row("dino", 50.0, 0)])
    assert table.clusters.tolist() == [9, 300] and table.seeds.tolist() == [3, 3] and table.miou.tolist() == [12.0, 40.12]
    assert build_overcluster_table([_row("dino", 50.0, 0)]).empty
    rows = tmp_path / "rows"
    rows.mkdir()
    for i, r in enumerate([_row("dino", 50.0, 0), oc("dino", 300, 33.0, 0.0)]):
        (rows / f"{i}.json").write_text(json.dumps(r))
    write_tables([rows], tmp_path / "out")
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["overcluster_miou"]["toy"]["dino"]["toyscenes_k300"] == 33.0
    assert "| dino |" in (tmp_path / "out" / "overcluster.md").read_text()


def _tables_from(rows: list[dict], run: str, tmp_path) -> dict:
    """Write ``rows`` (plus an in-context row of ``run``, which every table set needs) as JSON files, build
    the tables into ``tmp_path/tables`` and return the metrics."""
    out = tmp_path / "rows"
    out.mkdir(parents=True)
    for i, r in enumerate([*rows, _row(run, 20.0, 0)]):
        (out / f"{i}.json").write_text(json.dumps(r))
    write_tables([out], tmp_path / "tables")
    return json.loads((tmp_path / "tables" / "metrics.json").read_text())


def test_linear_and_finetune_tables_keep_their_protocols_apart(tmp_path):
    from cribo.results.tables import build_finetune_table, build_linear_table

    def seg(protocol, run, miou, **extra):
        return {"protocol": protocol, "experiment": "toy", "run_name": run, "run_id": "1" * 8, "method": run,
                "arch": "vit_tiny", "dataset": "voc", "miou": miou, "pixel_accuracy": 90.0, **extra}

    rows = [seg("linear", "cribo", 61.234, protocol_name="mmseg", iterations=80000),
            seg("linear", "cribo", 55.0, protocol_name="leopart", epochs=25, mask_size=100),
            seg("finetune", "cribo", 70.0, decoder="mask", iterations=80000, lr=0.001, layer_decay=1.0),
            seg("finetune", "cribo", 68.0, decoder="linear", iterations=80000, lr=0.001, layer_decay=0.65)]
    linear = build_linear_table(rows)
    # sorted by protocol; each protocol's own schedule column filled, the other empty
    assert linear.protocol_name.tolist() == ["leopart", "mmseg"] and linear.miou.tolist() == [55.0, 61.23]
    assert linear.epochs.tolist()[0] == 25 and pd.isna(linear.epochs.tolist()[1])
    finetune = build_finetune_table(rows)
    assert finetune.decoder.tolist() == ["linear", "mask"] and finetune.layer_decay.tolist() == [0.65, 1.0]
    metrics = _tables_from(rows, "cribo", tmp_path)
    assert metrics["finetune_miou"]["toy"]["cribo"] == {"voc_linear": 68.0, "voc_mask": 70.0}
    assert metrics["linear_miou"]["toy"]["cribo"] == {"voc_leopart": 55.0, "voc_mmseg": 61.23}
    assert "| mask |" in (tmp_path / "tables" / "finetune.md").read_text()


def test_classification_table_one_line_per_mode_and_subset(tmp_path):
    from cribo.results.tables import build_classify_table

    def cls(protocol, run, top1, **extra):
        return {"protocol": protocol, "experiment": "toy", "run_name": run, "run_id": "2" * 8, "method": run,
                "arch": "resnet50", "dataset": "imagenet", "top1": top1, "top5": 90.0, "epochs": 20, **extra}

    rows = [cls("classify_semi", "orl", 55.123, subset="10percent", train_images=128116),
            cls("classify_linear", "orl", 59.0, train_images=1281167),
            cls("classify_semi", "orl", 42.0, subset="1percent", train_images=12811)]
    table = build_classify_table(rows)
    # linear first (no subset), then the semi rows by list; top-1 to 2 decimals
    assert table.protocol.tolist() == ["classify_linear", "classify_semi", "classify_semi"]
    assert table.subset.tolist()[1:] == ["10percent", "1percent"] and pd.isna(table.subset.tolist()[0])
    assert table.top1.tolist() == [59.0, 55.12, 42.0]
    metrics = _tables_from(rows, "orl", tmp_path)
    assert metrics["classify_top1"]["toy"]["orl"] == {"imagenet_linear": 59.0, "imagenet_semi_10percent": 55.12,
                                                      "imagenet_semi_1percent": 42.0}
    assert "| classify_semi | 1percent | 12811 |" in (tmp_path / "tables" / "classify.md").read_text()
    # two grid points on the 1 % list: one metric each, named by the point (not one overwriting the other)
    rows[2].update(lr=0.01, head_lr_mult=10)
    rows.append(cls("classify_semi", "orl", 40.0, subset="1percent", train_images=12811, lr=0.1, head_lr_mult=1))
    metrics = _tables_from(rows, "orl", tmp_path / "grid")
    assert metrics["classify_top1"]["toy"]["orl"] == {
        "imagenet_linear": 59.0, "imagenet_semi_10percent": 55.12, "imagenet_semi_1percent_lr0.01_x10": 42.0,
        "imagenet_semi_1percent_lr0.1_x1": 40.0}


def test_ablation_table_compares_each_setting_with_the_base():
    from cribo.results.tables import build_ablation_table

    rows = [_row("cribo", 20.0, 0), _row("cribo", 22.0, 1),
            _row("cribo~cribo.cycle_check=false", 18.0, 0), _row("cribo~cribo.cycle_check=false", 19.0, 1),
            {"protocol": "linear", "experiment": "toy", "run_name": "cribo", "dataset": "toyscenes",
             "protocol_name": "mmseg", "miou": 30.0},
            {"protocol": "linear", "experiment": "toy", "run_name": "cribo~cribo.cycle_check=false",
             "dataset": "toyscenes", "protocol_name": "mmseg", "miou": 31.5},
            # an ablation metric the base lacks: base and change empty
            {"protocol": "finetune", "experiment": "toy", "run_name": "cribo~cribo.cycle_check=false",
             "dataset": "toyscenes", "decoder": "mask", "miou": 9.0},
            _row("dino", 50.0, 0)]
    table = build_ablation_table(rows, "cribo")
    lines = {r["metric"]: r for r in table.to_dict("records")}
    assert set(lines) == {"incontext toyscenes f=1", "linear toyscenes mmseg", "finetune toyscenes mask"}
    assert lines["incontext toyscenes f=1"]["base"] == 21.0 and lines["incontext toyscenes f=1"]["ours"] == 18.5
    assert lines["incontext toyscenes f=1"]["change"] == -2.5
    assert lines["linear toyscenes mmseg"]["change"] == 1.5
    assert pd.isna(lines["finetune toyscenes mask"]["base"]) and pd.isna(lines["finetune toyscenes mask"]["change"])
    assert set(table.setting) == {"cribo.cycle_check=false"}
    assert build_ablation_table(rows, "dino").empty
