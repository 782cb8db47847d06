"""Several in-context / overclustering rows from one process: the same rows as one call per setting."""

import json

import pytest
import yaml

from cribo.cli import main
from cribo.eval.subsets import incontext_settings

TINY_MODEL = {"arch": "vit_tiny", "patch_size": 8, "img_size": 32, "depth": 1, "embed_dim": 32, "num_heads": 2}


def test_incontext_settings_full_memory_runs_one_seed():
    # fraction 1 with every patch in memory draws nothing: seeds 1 and 2 would repeat seed 0's row
    assert incontext_settings([1.0, 0.5], [0, 1, 2], None) == [(1.0, 0), (0.5, 0), (0.5, 1), (0.5, 2)]
    # a sampled memory (memory_size) draws per seed even at fraction 1
    assert incontext_settings([1.0], [3, 4], 100) == [(1.0, 3), (1.0, 4)]


@pytest.fixture
def stores(tmp_path, tiny_voc):
    cfg = {"method": "random", "data": {"dataset": "voc", "root": str(tiny_voc), "split": "train"},
           "model": TINY_MODEL, "train": {"device": "cpu", "num_workers": 0, "progress": False}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", "--config", str(tmp_path / "run.yaml"), "--output-dir", str(tmp_path / "run")]) == 0
    ckpt = str(tmp_path / "run" / "checkpoint.pth")
    for split in ("train", "val"):
        assert main(["extract", "--checkpoint", ckpt, "--dataset", "voc", "--data-root", str(tiny_voc),
                     "--split", split, "--out", str(tmp_path / split), "--no-progress"]) == 0
    return ckpt, tiny_voc, tmp_path


def _incontext(ckpt, root, tmp_path, out, fractions, seeds):
    return main(["eval", "incontext", "--checkpoint", ckpt, "--dataset", "voc", "--data-root", str(root),
                 "--train-features", str(tmp_path / "train"), "--val-features", str(tmp_path / "val"), "--k", "3",
                 "--fraction", *map(str, fractions), "--seed", *map(str, seeds), "--out", out, "--no-progress"])


def test_incontext_rows_of_several_settings_equal_single_calls(stores):
    ckpt, root, tmp_path = stores
    assert _incontext(ckpt, root, tmp_path, str(tmp_path / "rows" / "f{fraction}-s{seed}.json"), [1.0, 0.5], [0, 1]) == 0
    written = sorted(p.name for p in (tmp_path / "rows").iterdir())
    assert written == ["f0.5-s0.json", "f0.5-s1.json", "f1.0-s0.json"]
    for fraction, seed in ((1.0, 0), (0.5, 1)):
        single = tmp_path / f"single-{fraction}-{seed}.json"
        assert _incontext(ckpt, root, tmp_path, str(single), [fraction], [seed]) == 0
        many = json.loads((tmp_path / "rows" / f"f{fraction}-s{seed}.json").read_text())
        one = json.loads(single.read_text())
        assert (many["fraction"], many["seed"]) == (fraction, seed)
        assert many["miou"] == one["miou"] and many["per_class_iou"] == one["per_class_iou"]


def test_several_rows_need_placeholders_in_the_output_path(stores, capsys):
    ckpt, root, tmp_path = stores
    assert _incontext(ckpt, root, tmp_path, str(tmp_path / "row.json"), [1.0, 0.5], [0]) != 0
    err = capsys.readouterr().err
    assert "{fraction}" in err and "{seed}" in err and "row.json" in err
    assert not (tmp_path / "row.json").exists()


def test_overcluster_rows_of_several_k(stores, capsys):
    ckpt, root, tmp_path = stores
    common = ["eval", "overcluster", "--checkpoint", ckpt, "--val-features", str(tmp_path / "val"),
              "--seeds", "1", "--restarts", "1", "--iterations", "5", "--pca-dim", "4"]
    assert main(common + ["--clusters", "classes", "24", "--out", str(tmp_path / "oc" / "k{clusters}.json")]) == 0
    rows = {p.name: json.loads(p.read_text()) for p in (tmp_path / "oc").iterdir()}
    assert sorted(rows) == ["k24.json", "kclasses.json"]
    assert rows["kclasses.json"]["matching"] == "hungarian" and rows["k24.json"]["clusters"] == 24
    single = tmp_path / "single.json"
    assert main(common + ["--clusters", "24", "--out", str(single)]) == 0
    assert json.loads(single.read_text())["miou"] == rows["k24.json"]["miou"]
    assert main(common + ["--clusters", "classes", "24", "--out", str(tmp_path / "one.json")]) != 0
    assert "{clusters}" in capsys.readouterr().err
