"""The learning-curve benchmark end to end in its quick mode: real trainings, real evaluations, its outputs."""

import csv
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_learning_curve.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_learning_curve", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


def _workflow_config(tmp_path):
    cfg = {"experiment": "curve", "dataset": {"name": "toyscenes", "toyscenes": {"num_train": 16, "num_val": 4}},
           "pretrain": {"seed": 0, "model": {"arch": "vit_tiny", "patch_size": 8, "img_size": 32, "depth": 2},
                        "cribo": {"num_clusters": 4}},  # at most the 16 tokens of a 32 px view
           "runs": {"random": {"method": "random"}, "pixels": {"method": "pixels"}, "dino": {"method": "dino"},
                    "cribo": {"method": "cribo"}},
           "evaluate": {"image_size": 32, "incontext": {"k": 5, "memory_passes": 1, "memory_augment": False}}}
    path = tmp_path / "workflow.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_quick_snapshots_write_the_curve_its_figure_and_its_command(tmp_path):
    bench = _bench()
    argv = ["--config", str(_workflow_config(tmp_path)), "--runs", "cribo", "dino", "--mode", "snapshots",
            "--quick", "--floors", "--parallel", "2", "--out-dir", str(tmp_path / "out"),
            "--work-dir", str(tmp_path / "work")]
    assert bench.main(argv) == 0
    with open(tmp_path / "out" / "learning_curve.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == bench.COLUMNS
    floors = [r for r in rows if r["mode"] == "floor"]
    assert sorted(r["method"] for r in floors) == ["pixels", "random"]
    curve = [r for r in rows if r["mode"] == "snapshots"]
    # quick: one 2-epoch run per method, a snapshot after each epoch
    assert sorted((r["run"], int(r["epochs"])) for r in curve) == [("cribo", 1), ("cribo", 2), ("dino", 1), ("dino", 2)]
    for r in curve:
        # 16 training images in batches of 4 (drop_last): 4 steps per epoch, 4 images per step
        assert int(r["steps"]) == 4 * int(r["epochs"]) and int(r["images_seen"]) == 4 * int(r["steps"])
        assert int(r["schedule_epochs"]) == 2 and 0 <= float(r["miou"]) <= 100
        assert 0 <= float(r["pixel_accuracy"]) <= 100
    for run in ("cribo", "dino"):
        first, second = sorted((r for r in curve if r["run"] == run), key=lambda r: int(r["epochs"]))
        assert 0 < float(first["train_minutes"]) < float(second["train_minutes"])  # cumulative epoch seconds
    png = (tmp_path / "out" / "learning_curve.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    sidecar = json.loads((tmp_path / "out" / "learning_curve.json").read_text())
    assert sidecar["command"].endswith(" ".join(argv)) and "not annealed" in sidecar["note"]
    # one JSON row per evaluation, as every evaluation writes
    assert len(list((tmp_path / "work" / "rows").glob("*.json"))) == len(rows)


def test_an_unknown_run_is_named_in_the_error_and_nothing_is_trained(tmp_path, capsys):
    bench = _bench()
    code = bench.main(["--config", str(_workflow_config(tmp_path)), "--runs", "cribo", "byol", "--quick",
                       "--out-dir", str(tmp_path / "out"), "--work-dir", str(tmp_path / "work")])
    assert code == 2
    err = capsys.readouterr().err
    assert "byol" in err and "cribo" in err and "Traceback" not in err
    assert not (tmp_path / "work").exists() and not (tmp_path / "out").exists()


def test_snapshots_of_a_run_trained_outside_the_engine_are_refused_before_training(tmp_path, capsys):
    bench = _bench()
    cfg = yaml.safe_load(_workflow_config(tmp_path).read_text())
    cfg["runs"]["supervised"] = {"method": "supervised"}
    path = tmp_path / "with-supervised.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code = bench.main(["--config", str(path), "--runs", "cribo", "supervised", "--mode", "snapshots", "--quick",
                       "--out-dir", str(tmp_path / "out"), "--work-dir", str(tmp_path / "work")])
    assert code == 2
    err = capsys.readouterr().err
    assert "supervised" in err and "--mode budgets" in err
    assert not (tmp_path / "work").exists()
