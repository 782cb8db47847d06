"""The command line end to end on a tiny hand-made dataset: train -> extract -> eval -> table."""

import json
import subprocess
import sys

import pandas as pd
import pytest
import yaml

from cribo.cli import main

TINY_MODEL = {"arch": "vit_tiny", "patch_size": 8, "img_size": 32, "depth": 1, "embed_dim": 32, "num_heads": 2}


def _run_config(tmp_path, root, method, **extra):
    cfg = {"method": method, "data": {"dataset": "voc", "root": str(root), "split": "train"},
           "model": TINY_MODEL, "train": {"device": "cpu", "num_workers": 0, "progress": False}, **extra}
    path = tmp_path / f"{method}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("method", ["random", "pixels"])
def test_baselines_train_extract_eval_table(tmp_path, tiny_voc, method):
    # the tiny fixture has 3 classes; the VOC spec has 21, which the metric handles (absent classes skipped)
    cfg = _run_config(tmp_path, tiny_voc, method)
    out = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--output-dir", str(out), "--summary", str(out / "summary.json")]) == 0
    ckpt = out / "checkpoint.pth"
    assert ckpt.is_file() and (out / "config.yaml").is_file() and (out / "provenance.json").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == method and len(summary["checkpoint_sha256"]) == 64

    (tiny_voc / "ImageSets/Segmentation/trainaug.txt").write_text(
        (tiny_voc / "ImageSets/Segmentation/train.txt").read_text())
    for split in ("trainaug", "val"):
        assert main(["extract", "--checkpoint", str(ckpt), "--dataset", "voc", "--data-root", str(tiny_voc),
                     "--split", split, "--out", str(tmp_path / "feats" / split), "--no-progress"]) == 0
    row_path = tmp_path / "rows" / "row.json"
    assert main(["eval", "incontext", "--checkpoint", str(ckpt), "--dataset", "voc", "--data-root", str(tiny_voc),
                 "--train-features", str(tmp_path / "feats/trainaug"), "--val-features", str(tmp_path / "feats/val"),
                 "--k", "5", "--out", str(row_path), "--no-progress"]) == 0
    row = json.loads(row_path.read_text())
    assert row["protocol"] == "incontext" and row["method"] == method and row["dataset"] == "voc"
    assert 0 <= row["miou"] <= 100 and row["miou_hungarian"] >= row["miou"] - 1e-9
    assert len(row["checkpoint_sha256"]) == 64 and row["k"] == 5
    if method == "pixels":
        # colour alone separates the fixture's three regions: raw pixels retrieve them well
        assert row["miou"] > 60

    # the same evaluation straight from the checkpoint (features extracted on the fly) agrees
    direct = tmp_path / "direct.json"
    assert main(["eval", "incontext", "--checkpoint", str(ckpt), "--dataset", "voc", "--data-root", str(tiny_voc),
                 "--k", "5", "--out", str(direct), "--no-progress"]) == 0
    assert json.loads(direct.read_text())["miou"] == pytest.approx(row["miou"])

    assert main(["table", "--rows", str(tmp_path / "rows"), "--out", str(tmp_path / "tables")]) == 0
    table = pd.read_csv(tmp_path / "tables" / "incontext.csv")
    assert table.loc[0, "method"] == method and table.loc[0, "miou"] == pytest.approx(round(row["miou"], 2))


def test_dino_trains_two_epochs_and_resumes(tmp_path, tiny_voc):
    cfg = _run_config(tmp_path, tiny_voc, "dino",
                      dino={"out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16, "warmup_teacher_temp_epochs": 0},
                      optim={"epochs": 1, "batch_size": 3, "warmup_epochs": 0})
    out = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--output-dir", str(out)]) == 0
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [entry["epoch"] for entry in log] == [0]
    assert all(entry["loss"] == entry["loss"] for entry in log)  # finite, not NaN
    # the same command again resumes the finished run instead of starting over: nothing left to train
    assert main(["train", "--config", str(cfg), "--output-dir", str(out)]) == 0
    assert [json.loads(line)["epoch"] for line in (out / "log.txt").read_text().splitlines()] == [0]
    # more epochs change the schedules, hence the run id: not a continuation of this checkpoint (issue 18)
    assert main(["train", "--config", str(cfg), "--output-dir", str(out), "--set", "optim.epochs=2"]) == 2
    assert [json.loads(line)["epoch"] for line in (out / "log.txt").read_text().splitlines()] == [0]


def test_config_typo_unknown_dataset_and_corrupt_image_exit_2(tmp_path, tiny_voc, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"method": "random", "optim": {"epohcs": 3}}))
    assert main(["train", "--config", str(bad), "--output-dir", str(tmp_path / "o")]) == 2
    assert "'epohcs'" in capsys.readouterr().err

    cfg = _run_config(tmp_path, tiny_voc, "random")
    main(["train", "--config", str(cfg), "--output-dir", str(tmp_path / "r")])
    ckpt = str(tmp_path / "r" / "checkpoint.pth")
    assert main(["eval", "incontext", "--checkpoint", ckpt, "--dataset", "vocc", "--data-root", str(tiny_voc),
                 "--out", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err
    assert "unknown dataset 'vocc'" in err and "toyscenes" in err

    (tiny_voc / "JPEGImages" / "v0.jpg").write_bytes(b"\x00garbage")
    assert main(["extract", "--checkpoint", ckpt, "--dataset", "voc", "--data-root", str(tiny_voc),
                 "--split", "val", "--out", str(tmp_path / "f"), "--no-progress"]) == 2
    assert "v0.jpg" in capsys.readouterr().err
    assert not (tmp_path / "f").exists() and not list(tmp_path.glob("f.tmp*"))  # nothing half-written


def test_console_script_help_documents_every_subcommand():
    out = subprocess.run([sys.executable, "-m", "cribo.cli", "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("data", "config", "train", "extract", "eval", "table"):
        assert command in out
    out = subprocess.run([sys.executable, "-m", "cribo.cli", "eval", "incontext", "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert "--temperature" in out and "--memory-size" in out


def test_cribo_trains_with_bank_and_logs_its_losses(tmp_path, tiny_voc):
    cfg = _run_config(tmp_path, tiny_voc, "cribo",
                      dino={"out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16, "warmup_teacher_temp_epochs": 0},
                      cribo={"num_clusters": 4, "object_out_dim": 32, "queue_size": 8},
                      train={"device": "cpu", "num_workers": 0, "progress": False, "log_every": 2},
                      optim={"epochs": 2, "batch_size": 3, "warmup_epochs": 0})
    out = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--output-dir", str(out)]) == 0
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [entry["epoch"] for entry in log] == [0, 1]
    for entry in log:
        assert {"global", "cross_view", "cross_image", "objects_per_image", "cycle_fraction"} <= set(entry)
        assert 1 <= entry["objects_per_image"] <= 4
    assert log[0]["cross_image"] == 0.0  # epoch 0 only fills the bank
    steps = [json.loads(line) for line in (out / "log_steps.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [0, 2]  # 2 steps per epoch (6 images, batch 3), log_every 2
    assert {"global", "cross_view", "cross_image", "objects_per_image", "cycle_fraction", "lr", "wd",
            "momentum"} <= set(steps[0])
    from cribo.train.checkpoint import load_checkpoint

    ckpt = load_checkpoint(out / "checkpoint.pth")
    # the official layout: a 2 x K*Q x D queue, per-image counts, and the two loss centres
    assert ckpt["centroids_queue_cpu"].shape == (2, 8 * 4, 32) and ckpt["cpv_queue_cpu"].shape == (8,)
    assert set(ckpt["dino_loss"]) == {"center", "center_c"}
    assert all(k.startswith(("module.backbone.", "module.head.")) for k in ckpt["student"])
    assert "head.last_layer_c.weight_g" in ckpt["teacher"] and "head.last_layer.weight_v" in ckpt["teacher"]
    # the teacher backbone of a CrIBo checkpoint serves the evaluations like any other
    (tiny_voc / "ImageSets/Segmentation/trainaug.txt").write_text(
        (tiny_voc / "ImageSets/Segmentation/train.txt").read_text())
    assert main(["eval", "incontext", "--checkpoint", str(out / "checkpoint.pth"), "--dataset", "voc",
                 "--data-root", str(tiny_voc), "--k", "5", "--out", str(tmp_path / "row.json"), "--no-progress"]) == 0
    assert json.loads((tmp_path / "row.json").read_text())["method"] == "cribo"


def test_warmup_longer_than_the_run_is_capped(tmp_path, tiny_voc):
    # optim.warmup_epochs defaults to 10 (the official value); a 3-epoch run must still train
    cfg = _run_config(tmp_path, tiny_voc, "dino", dino={"out_dim": 16, "hidden_dim": 8, "bottleneck_dim": 4},
                      optim={"epochs": 3, "batch_size": 3})
    assert main(["train", "--config", str(cfg), "--output-dir", str(tmp_path / "run")]) == 0
    log = [json.loads(line) for line in (tmp_path / "run" / "log.txt").read_text().splitlines()]
    assert len(log) == 3


def test_train_on_another_process_count_than_the_released_run_says_so(tmp_path, tiny_voc, capsys):
    # released on 2 processes x 4 images; run here on 1 process with the per-process batch kept
    cfg = _run_config(tmp_path, tiny_voc, "random", released={"world_size": 2, "batch_size": 4},
                      optim={"batch_size": 4})
    out = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--output-dir", str(out)]) == 0
    assert "WARNING: this released config was trained on 2 processes x 4 images = 8" in capsys.readouterr().err
    note = json.loads((out / "provenance.json").read_text())["released_batch"]
    assert note["this_run"]["total_batch"] == 4 and note["released"]["total_batch"] == 8


def test_cribo_with_local_crops_is_refused_without_a_traceback(tmp_path, tiny_voc, capsys):
    cfg = _run_config(tmp_path, tiny_voc, "cribo", dino={"local_crops_number": 2})
    assert main(["train", "--config", str(cfg), "--output-dir", str(tmp_path / "run")]) != 0
    err = capsys.readouterr().err
    assert "method cribo has no local crops" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()
