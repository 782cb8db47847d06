"""Exact resumption and crash safety of the training engine, with real processes and real signals.

An uninterrupted CrIBo run is the reference. The same run hard-killed (SIGKILL) mid-epoch and
resumed, twice, must end with bitwise-identical weights, optimizer state, loss centres and memory
bank on CPU; so must a run stopped by SIGTERM (Slurm's time-limit signal), which checkpoints first.
"""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from cribo.train.checkpoint import load_checkpoint

from conftest import write_voc

pytestmark = pytest.mark.slow

MODEL = {"arch": "vit_tiny", "patch_size": 8, "img_size": 32, "depth": 1, "embed_dim": 32, "num_heads": 2,
         "drop_path_rate": 0.2}  # drop path draws from the global RNG: its state must be restored too


def _config(tmp_path, root, num_workers, checkpoint_every, saveckp_freq=0):
    cfg = {"method": "cribo", "seed": 3, "data": {"dataset": "voc", "root": str(root), "split": "train"},
           "model": MODEL,
           "dino": {"out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16, "warmup_teacher_temp_epochs": 0},
           "cribo": {"num_clusters": 4, "object_out_dim": 32, "queue_size": 8},
           "optim": {"epochs": 2, "batch_size": 3, "warmup_epochs": 0, "clip_grad": 3.0},
           "train": {"device": "cpu", "num_workers": num_workers, "progress": False, "log_every": 1,
                     "checkpoint_every": checkpoint_every, "saveckp_freq": saveckp_freq, "threads": 1}}
    path = tmp_path / f"cfg-{num_workers}-{checkpoint_every}-{saveckp_freq}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _train(cfg, out, **env):
    return subprocess.run([sys.executable, "-m", "cribo.cli", "train", "--config", str(cfg), "--output-dir", str(out)],
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=300)


def _assert_same_state(a, b):
    for key in ("student", "teacher", "dino_loss"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs"
    assert torch.equal(a["centroids_queue_cpu"], b["centroids_queue_cpu"])
    assert torch.equal(a["cpv_queue_cpu"], b["cpv_queue_cpu"])
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        for name in sa:
            assert torch.equal(torch.as_tensor(sa[name]), torch.as_tensor(sb[name])), f"optimizer {name} differs"
    assert a["epoch"] == b["epoch"] == 2 and a["global_step"] == b["global_step"] == 8


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    root = write_voc(tmp / "voc", {"train": [f"t{i}" for i in range(12)], "val": ["v0"]})  # 4 steps / epoch
    out = tmp / "straight"
    # the reference also keeps per-epoch snapshots: the resumed runs below, which keep none, must
    # still match it bit for bit, so keeping snapshots cannot have perturbed the training
    done = _train(_config(tmp, root, num_workers=0, checkpoint_every=0, saveckp_freq=1), out)
    assert done.returncode == 0, done.stderr
    return root, load_checkpoint(out / "checkpoint.pth"), out


def test_saveckp_freq_keeps_a_copy_of_each_epoch_end_checkpoint(reference):
    _, final, out = reference
    kept = sorted(p.name for p in out.glob("checkpoint*.pth"))
    assert kept == ["checkpoint.pth", "checkpoint0001.pth", "checkpoint0002.pth"]
    assert not list(out.glob(".checkpoint*.tmp-*"))
    first, last = load_checkpoint(out / "checkpoint0001.pth"), load_checkpoint(out / "checkpoint0002.pth")
    assert (first["epoch"], first["global_step"]) == (1, 4) and (last["epoch"], last["global_step"]) == (2, 8)
    for name in final["teacher"]:
        assert torch.equal(last["teacher"][name], final["teacher"][name]), f"teacher.{name} differs"
    # the first snapshot is an earlier state, not the final one copied twice
    assert any(not torch.equal(first["teacher"][n], final["teacher"][n]) for n in final["teacher"])


def test_sigkill_twice_then_resume_is_bitwise_identical(tmp_path, reference):
    root, straight, _ = reference
    # other worker count than the reference: augmentations are seeded per sample, not per worker
    cfg = _config(tmp_path, root, num_workers=1, checkpoint_every=1)
    out = tmp_path / "killed"
    first = _train(cfg, out, CRIBO_TEST_SIGNAL_AT_STEP="2")  # in epoch 0, after step 2
    assert first.returncode == -signal.SIGKILL
    assert load_checkpoint(out / "checkpoint.pth")["global_step"] == 2
    second = _train(cfg, out, CRIBO_TEST_SIGNAL_AT_STEP="6")  # resumed, then killed in epoch 1
    assert second.returncode == -signal.SIGKILL and "step 2/4" in second.stdout
    assert load_checkpoint(out / "checkpoint.pth")["global_step"] == 6
    last = _train(cfg, out)
    assert last.returncode == 0, last.stderr
    assert "epoch 1/2, step 2/4 (exact)" in last.stdout
    _assert_same_state(straight, load_checkpoint(out / "checkpoint.pth"))


def test_sigterm_checkpoints_exits_and_resumes_exactly(tmp_path, reference):
    root, straight, _ = reference
    cfg = _config(tmp_path, root, num_workers=0, checkpoint_every=0)  # only the signal checkpoints mid-epoch
    out = tmp_path / "terminated"
    stopped = _train(cfg, out, CRIBO_TEST_SIGNAL_AT_STEP="3", CRIBO_TEST_SIGNAL="TERM")
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr
    assert "checkpoint written at epoch 0, step 3" in stopped.stdout
    ckpt = load_checkpoint(out / "checkpoint.pth")
    assert (ckpt["epoch"], ckpt["step_in_epoch"]) == (0, 3)
    done = _train(cfg, out)
    assert done.returncode == 0, done.stderr
    _assert_same_state(straight, load_checkpoint(out / "checkpoint.pth"))


WRITER = """
import sys, torch
from cribo.train.checkpoint import save_checkpoint
save_checkpoint({"version": torch.tensor(1)}, sys.argv[1])
print("first written", flush=True)
save_checkpoint({"version": torch.tensor(2), "payload": torch.ones(2 ** 26)}, sys.argv[1])  # 256 MB
"""


def test_sigkill_while_writing_leaves_the_previous_checkpoint(tmp_path):
    target = tmp_path / "checkpoint.pth"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "first written"
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".checkpoint.pth.tmp-*")):  # the second write has begun
        assert proc.poll() is None, "the writer finished before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.001)
    proc.kill()
    proc.wait()
    assert int(load_checkpoint(target)["version"]) == 1
    # the next save removes the dead writer's temporary file
    from cribo.train.checkpoint import save_checkpoint

    save_checkpoint({"version": torch.tensor(3)}, target)
    assert int(load_checkpoint(target)["version"]) == 3 and not list(tmp_path.glob(".checkpoint.pth.tmp-*"))
