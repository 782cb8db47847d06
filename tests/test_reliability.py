"""Issue 18: user mistakes are refused with one line naming the culprit, before anything is written.

Each test reproduces one case of the issue through the command line, the way a user meets it:
exit code 2, an ``error:`` line that names the file, key or value, no traceback, and the output
location untouched.
"""

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest
import torch
import yaml

from cribo.cli import main

TINY_MODEL = {"arch": "vit_tiny", "patch_size": 8, "img_size": 32, "depth": 1, "embed_dim": 32, "num_heads": 2}
TINY_DINO = {"out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16, "warmup_teacher_temp_epochs": 0}
SRC = str(Path(__file__).resolve().parents[1] / "src")


def _config(tmp_path, root, method, name=None, **sections):
    cfg = {"method": method, "data": {"dataset": "voc", "root": str(root), "split": "train"},
           "model": dict(TINY_MODEL), "train": {"device": "cpu", "num_workers": 0, "progress": False}}
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    path = tmp_path / f"{name or method}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _refused(capsys, argv) -> str:
    """Run ``cribo argv`` in this process; assert exit code 2; return the error text."""
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    return err


@pytest.fixture
def trained(tmp_path, tiny_voc):
    """A one-epoch DINO run (2 steps of 3 images) and its config."""
    cfg = _config(tmp_path, tiny_voc, "dino", seed=0, dino=TINY_DINO, optim={"epochs": 1, "batch_size": 3,
                                                                               "warmup_epochs": 0})
    out = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--output-dir", str(out)]) == 0
    return cfg, out


# ------------------------------------------------------------------ 1. resume checks the config

@pytest.mark.parametrize("override, key", [("seed=1", "seed"), ("optim.lr=0.01", "optim.lr"),
                                           ("dino.teacher_temp=0.05", "dino.teacher_temp"),
                                           ("dino.out_dim=128", "dino.out_dim")])  # the last: other head width
def test_resume_with_other_settings_is_refused_before_writing(trained, capsys, override, key):
    cfg, out = trained
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    err = _refused(capsys, ["train", "--config", cfg, "--output-dir", out, "--set", override])
    assert f"{key}:" in err and "run id" in err and "--output-dir" in err
    # nothing of the folder changed: config.yaml still describes the epochs that were trained
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_resume_may_change_the_train_section(trained, capsys):
    cfg, out = trained
    assert main(["train", "--config", str(cfg), "--output-dir", str(out), "--set", "train.log_every=5"]) == 0
    assert "resuming from" in capsys.readouterr().out


# ------------------------------------------------------------------ 2. features of another checkpoint

@pytest.fixture
def two_checkpoints_and_features(tmp_path, tiny_voc):
    ckpts = []
    for seed in (0, 1):
        cfg = _config(tmp_path, tiny_voc, "random", name=f"random{seed}", seed=seed)
        assert main(["train", "--config", str(cfg), "--output-dir", str(tmp_path / f"r{seed}")]) == 0
        ckpts.append(tmp_path / f"r{seed}" / "checkpoint.pth")
    for split in ("train", "val"):
        assert main(["extract", "--checkpoint", str(ckpts[0]), "--dataset", "voc", "--data-root", str(tiny_voc),
                     "--split", split, "--out", str(tmp_path / "feats" / split), "--no-progress"]) == 0
    return ckpts, tmp_path / "feats"


def test_features_of_another_checkpoint_are_refused(tmp_path, tiny_voc, capsys, two_checkpoints_and_features):
    (a, b), feats = two_checkpoints_and_features
    row = tmp_path / "rows" / "row.json"
    err = _refused(capsys, ["eval", "incontext", "--checkpoint", b, "--dataset", "voc", "--data-root", tiny_voc,
                            "--train-features", feats / "train", "--val-features", feats / "val", "--k", "3",
                            "--out", row, "--no-progress"])
    assert str(a) in err and str(b) in err and "extracted" in err
    err = _refused(capsys, ["eval", "overcluster", "--checkpoint", b, "--val-features", feats / "val",
                            "--clusters", "classes", "--seeds", "1", "--out", row])
    assert str(b) in err and "extracted" in err
    assert not row.exists()
    # the right checkpoint still works
    assert main(["eval", "incontext", "--checkpoint", str(a), "--dataset", "voc", "--data-root", str(tiny_voc),
                 "--train-features", str(feats / "train"), "--val-features", str(feats / "val"), "--k", "3",
                 "--out", str(row), "--no-progress"]) == 0


# ------------------------------------------------------------------ 3. truncated PNG masks (+ 8: worker errors)

def test_truncated_png_mask_is_named_also_from_a_worker(tmp_path, tiny_voc, capsys):
    cfg = _config(tmp_path, tiny_voc, "random")
    assert main(["train", "--config", str(cfg), "--output-dir", str(tmp_path / "r")]) == 0
    mask = tiny_voc / "SegmentationClass" / "v1.png"
    mask.write_bytes(mask.read_bytes()[:-30])  # cut inside the image data
    args = ["extract", "--checkpoint", tmp_path / "r" / "checkpoint.pth", "--dataset", "voc", "--data-root",
            tiny_voc, "--split", "val", "--out", tmp_path / "f", "--no-progress"]
    err = _refused(capsys, args)
    assert "v1.png" in err and "truncated" in err
    # the same from a DataLoader worker process: the message, not the worker's traceback
    err = _refused(capsys, [*args, "--num-workers", "1"])
    assert err.startswith("error: corrupt or unreadable mask: ") and "v1.png" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "f").exists()


# ------------------------------------------------------------------ 4. outputs that cannot be written

def test_outputs_under_a_file_or_onto_a_folder_are_refused_before_any_work(tmp_path, tiny_voc, capsys):
    blocker = tmp_path / "results"
    blocker.write_text("a file where a folder should be")
    missing = tmp_path / "no-such-checkpoint.pth"  # the output check must come before reading it
    err = _refused(capsys, ["eval", "incontext", "--checkpoint", missing, "--dataset", "voc", "--data-root", tiny_voc,
                            "--out", blocker / "row.json"])
    assert f"--out {blocker / 'row.json'}" in err and f"{blocker} is a file" in err
    err = _refused(capsys, ["train", "--config", _config(tmp_path, tiny_voc, "random"), "--output-dir",
                            blocker / "run"])
    assert "--output-dir" in err and f"{blocker} is a file" in err
    err = _refused(capsys, ["export", "--checkpoint", missing, "--out", tmp_path])
    assert "is a folder" in err
    err = _refused(capsys, ["table", "--rows", tmp_path, "--out", blocker])
    assert "is a file" in err
    assert blocker.read_text() == "a file where a folder should be"


# imports what main() needs as the current user, then (as root, who may write anywhere) continues
# as the unprivileged user 'nobody', who cannot read the interpreter's files under /root
_AS_NOBODY = """
import os, sys
import cribo.cli, cribo.config, cribo.data.download, cribo.data.registry, cribo.data.segmentation
import cribo.outputs, cribo.results.paper, cribo.results.tables, cribo.train.checkpoint
if os.geteuid() == 0:
    os.setgid(65534)
    os.setuid(65534)
sys.exit(cribo.cli.main(sys.argv[1:]))
"""


def test_output_without_write_permission_is_refused_before_any_work(tiny_voc):
    base = Path(tempfile.mkdtemp(prefix="cribo-perm-"))
    try:
        os.chmod(base, 0o755)
        locked = base / "locked"
        locked.mkdir()
        os.chmod(locked, 0o555)
        env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
        done = subprocess.run([sys.executable, "-c", _AS_NOBODY, "eval", "incontext", "--checkpoint",
                               str(base / "missing.pth"), "--dataset", "voc", "--data-root", str(tiny_voc),
                               "--out", str(locked / "row.json")], capture_output=True, text=True, env=env,
                              timeout=120)
        assert done.returncode == 2, done.stderr
        assert done.stderr.startswith(f"error: --out {locked / 'row.json'}: no permission to write in {locked}")
        assert "Traceback" not in done.stderr and not list(locked.iterdir())
    finally:
        os.chmod(base / "locked", 0o755)
        shutil.rmtree(base)


# ------------------------------------------------------------------ 5. architecture mismatches

def test_weights_that_do_not_fit_their_model_are_named(tmp_path, tiny_voc, capsys):
    cfg = _config(tmp_path, tiny_voc, "random")
    assert main(["train", "--config", str(cfg), "--output-dir", str(tmp_path / "r")]) == 0
    ckpt = torch.load(tmp_path / "r" / "checkpoint.pth", weights_only=True)
    ckpt["config"]["model"].update(embed_dim=64)  # the recorded model is wider than its weights
    torch.save(ckpt, tmp_path / "wider.pth")
    err = _refused(capsys, ["extract", "--checkpoint", tmp_path / "wider.pth", "--dataset", "voc", "--data-root",
                            tiny_voc, "--split", "val", "--out", tmp_path / "f", "--no-progress"])
    assert "wider.pth" in err and "do not fit" in err and "pos_embed" in err
    # bare weights of a 32-wide ViT given as timm's ViT-S (384 wide)
    bare = {k.removeprefix("backbone."): v for k, v in ckpt["teacher"].items()}
    torch.save(bare, tmp_path / "bare.pth")
    err = _refused(capsys, ["extract", "--checkpoint", tmp_path / "bare.pth", "--timm-model", "vit_small_patch16_224",
                            "--dataset", "voc", "--data-root", tiny_voc, "--split", "val", "--out", tmp_path / "f",
                            "--no-progress"])
    assert "bare.pth" in err and "vit_small_patch16_224" in err
    assert not (tmp_path / "f").exists()


# ------------------------------------------------------------------ 6. geometry

@pytest.mark.parametrize("method, override, named", [
    ("random", "model.img_size=36", "model.img_size 36 is not a multiple of model.patch_size 8"),
    ("random", "model.num_heads=3", "model.embed_dim 32 is not divisible by model.num_heads 3"),
    ("cribo", "cribo.num_clusters=17", "cribo.num_clusters 17 is larger than the 16 patch tokens"),
])
def test_geometry_is_checked_before_training(tmp_path, tiny_voc, capsys, method, override, named):
    cfg = _config(tmp_path, tiny_voc, method, dino=TINY_DINO,
                  cribo={"num_clusters": 4, "object_out_dim": 32, "queue_size": 8},
                  optim={"epochs": 1, "batch_size": 3})
    err = _refused(capsys, ["train", "--config", cfg, "--output-dir", tmp_path / "run", "--set", override])
    assert named in err and err.startswith(f"error: --set {override}:")
    assert not (tmp_path / "run").exists()


def test_zero_batch_size_is_a_usage_error(tmp_path, tiny_voc, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["extract", "--checkpoint", str(tmp_path / "c.pth"), "--dataset", "voc", "--data-root", str(tiny_voc),
              "--split", "val", "--out", str(tmp_path / "f"), "--batch-size", "0"])
    assert exit_.value.code == 2
    assert "--batch-size: 0 must be at least 1" in capsys.readouterr().err


# ------------------------------------------------------------------ 7. trust on first use

def _zip(path: Path, members: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)


def test_refused_archive_does_not_poison_the_recorded_checksum(tmp_path, capsys):
    mirror, downloads, raw = tmp_path / "mirror", tmp_path / "downloads", tmp_path / "raw"
    mirror.mkdir()
    archive = "stuff_annotations_trainval2017.zip"  # no published checksum in the registry
    args = ["data", "download", "coco_stuff_annotations", "--mirror", mirror.as_uri(), "--downloads", downloads,
            "--raw", raw, "--retries", "0", "--no-progress"]
    _zip(mirror / archive, {"../escape.txt": b"outside"})
    err = _refused(capsys, args)
    assert "escape.txt" in err and "refused" in err
    assert not (downloads / f"{archive}.sha256").exists()
    _zip(mirror / archive, {"stuff/a.txt": b"the good archive"})  # the server is fixed
    assert main([str(a) for a in args]) == 0
    recorded = downloads / f"{archive}.sha256"
    assert recorded.is_file() and (raw / "coco_stuff_annotations" / "stuff" / "a.txt").is_file()
    # a later change on the server is reported with the file holding the recorded hash
    shutil.rmtree(raw)
    (downloads / archive).unlink()
    _zip(mirror / archive, {"stuff/a.txt": b"another archive"})
    err = _refused(capsys, args)
    assert f"delete {recorded}" in err


# ------------------------------------------------------------------ 8. the smaller ones

def test_a_set_typo_is_blamed_on_the_set_not_the_file(tmp_path, tiny_voc, capsys):
    cfg = _config(tmp_path, tiny_voc, "random")
    err = _refused(capsys, ["train", "--config", cfg, "--output-dir", tmp_path / "o", "--set", "seed=2",
                            "--set", "optim.epohcs=3"])
    assert err.startswith("error: --set optim.epohcs=3: unknown key(s) 'epohcs' under 'optim'")
    # a typo in the file itself is still the file's
    cfg.write_text(cfg.read_text() + "optim: {epohcs: 3}\n")
    err = _refused(capsys, ["train", "--config", cfg, "--output-dir", tmp_path / "o", "--set", "seed=2"])
    assert err.startswith(f"error: {cfg}: unknown key(s) 'epohcs'")
    assert not (tmp_path / "o").exists()


def test_configfile_overlay_typo_is_blamed_on_the_overlay_in_one_line(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text("evaluate:\n  incontxt: {k: 3}\n")
    snakemake = Path(sys.executable).with_name("snakemake")
    done = subprocess.run([str(snakemake), "-n", "--configfile", "config/ci.yaml", str(overlay)], cwd=repo,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"})
    assert done.returncode != 0
    out = done.stdout + done.stderr
    assert f"{overlay}: unknown key(s) 'incontxt' under 'evaluate'" in out
    assert len(out.splitlines()) < 15 and "Failed validating" not in out  # not the whole schema


class _HardCrash(BaseException):
    """Stands for a SIGKILL: nothing is saved, the process simply stops."""


def test_steps_replayed_after_a_resume_are_logged_once(tmp_path, tiny_voc, monkeypatch):
    from cribo.train import engine

    cfg = _config(tmp_path, tiny_voc, "dino", dino=TINY_DINO, optim={"epochs": 2, "batch_size": 3, "warmup_epochs": 0},
                  train={"log_every": 1, "checkpoint_every": 0})
    out = tmp_path / "run"

    def crash_after(global_step):
        if global_step == 3:
            raise _HardCrash()

    # crashed after global step 3 (epoch 1, step 1): the checkpoint is from the end of epoch 0 (step 2)
    monkeypatch.setattr(engine, "_test_signal_hook", crash_after)
    with pytest.raises(_HardCrash):
        main(["train", "--config", str(cfg), "--output-dir", str(out)])
    monkeypatch.undo()
    steps = [json.loads(line)["step"] for line in (out / "log_steps.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2]  # step 2 is logged but not checkpointed: it runs again on resume
    assert main(["train", "--config", str(cfg), "--output-dir", str(out)]) == 0
    steps = [json.loads(line)["step"] for line in (out / "log_steps.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3]
    tsv = (out / "dvclive" / "plots" / "metrics" / "train" / "loss.tsv").read_text().splitlines()
    assert [int(line.split("\t")[0]) for line in tsv[1:]] == [0, 1, 2, 3]
    assert [json.loads(line)["epoch"] for line in (out / "log.txt").read_text().splitlines()] == [0, 1]


def test_export_is_readable_like_any_other_file(tmp_path, tiny_voc):
    cfg = _config(tmp_path, tiny_voc, "random")
    assert main(["train", "--config", str(cfg), "--output-dir", str(tmp_path / "r")]) == 0
    umask = os.umask(0o022)
    try:
        assert main(["export", "--checkpoint", str(tmp_path / "r" / "checkpoint.pth"),
                     "--out", str(tmp_path / "model.safetensors")]) == 0
    finally:
        os.umask(umask)
    # what open() gives a new file under umask 022, as for every other output
    assert stat.S_IMODE((tmp_path / "model.safetensors").stat().st_mode) == 0o666 & ~0o022
