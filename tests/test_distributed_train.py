"""Launching `cribo train` as torchrun and srun would: rank/world from the environment, two gloo
processes, identical memory banks, one checkpoint; and the mixed-precision paths on CPU."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import yaml

from cribo.cli import main
from cribo.train.checkpoint import load_checkpoint
from cribo.train.distributed import first_slurm_host, read_launch_env

from conftest import write_voc


def test_launch_env_from_torchrun_srun_or_nothing():
    assert read_launch_env({}).launcher == "single"
    env = read_launch_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "29400"})
    assert (env.launcher, env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port) == \
        ("torchrun", 3, 8, 1, "n1", 29400)
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "1234",
             "SLURM_JOB_NODELIST": "gpu[03-05,09]"}
    env = read_launch_env(slurm)
    assert (env.launcher, env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port) == \
        ("srun", 5, 8, 1, "gpu03", 20000 + 1234)
    # the batch script itself (ntasks 8, but a single process of a step of one task) is not a rank
    assert read_launch_env({**slurm, "SLURM_STEP_NUM_TASKS": "1"}).launcher == "single"
    assert read_launch_env({**slurm, "MASTER_ADDR": "login2", "MASTER_PORT": "2222"}).master_port == 2222
    assert first_slurm_host("node7,node8") == "node7"


def _config(tmp_path, **optim):
    root = write_voc(tmp_path / "voc", {"train": [f"t{i}" for i in range(8)], "val": ["v0"]})
    cfg = {"method": "cribo", "data": {"dataset": "voc", "root": str(root), "split": "train"},
           "model": {"arch": "vit_tiny", "patch_size": 8, "img_size": 32, "depth": 1, "embed_dim": 32, "num_heads": 2},
           "dino": {"out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16, "warmup_teacher_temp_epochs": 0},
           "cribo": {"num_clusters": 4, "object_out_dim": 32, "queue_size": 6},
           "optim": {"epochs": 2, "batch_size": 2, "warmup_epochs": 0, **optim},
           "train": {"device": "cpu", "num_workers": 0, "progress": False, "log_every": 1, "threads": 1}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _check_two_rank_run(out, outputs):
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [entry["epoch"] for entry in log] == [0, 1]  # 8 images / (2 x 2 processes) = 2 steps per epoch
    for entry in log:
        a, b = entry["bank_checksums"]
        assert a == b  # the replicated memory banks are identical on both ranks
        t0, t1 = entry["teacher_checksums"]
        assert t0 == t1  # and so are the teachers (same initial weights, EMA of the synchronised student)
        assert all(entry[k] == entry[k] and abs(entry[k]) < 1e6 for k in ("loss", "global", "cross_view", "cross_image"))
    ckpt = load_checkpoint(out / "checkpoint.pth")
    assert ckpt["world_size"] == 2 and len(ckpt["rng_states"]) == 2
    assert not torch.equal(ckpt["rng_states"][0]["torch"], ckpt["rng_states"][1]["torch"])  # own seed per rank
    assert len(list(out.glob("*.pth"))) == 1 and not list(out.glob(".*tmp*"))
    assert sum("checkpoint:" in text for text in outputs) == 1  # rank 0 alone reports


@pytest.mark.slow
def test_torchrun_two_gloo_processes(tmp_path):
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "cribo.cli", "train", "--config", str(_config(tmp_path)),
                           "--output-dir", str(out), "--nproc-per-node", "2", "--summary", str(out / "summary.json")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "torch.distributed.run --standalone --nproc_per_node=2" in done.stdout
    _check_two_rank_run(out, [done.stdout])
    assert json.loads((out / "summary.json").read_text())["method"] == "cribo"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_srun_style_two_tasks(tmp_path):
    """What `srun --ntasks=2 cribo train ...` gives each task: SLURM_PROCID/NTASKS/LOCALID, no torchrun."""
    cfg, out = _config(tmp_path), tmp_path / "run"
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_RANK"))}
    base.update(SLURM_NTASKS="2", SLURM_JOB_ID="77", SLURM_JOB_NODELIST="localhost", MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(_free_port()))
    procs = [subprocess.Popen([sys.executable, "-m", "cribo.cli", "train", "--config", str(cfg), "--output-dir", str(out)],
                              env={**base, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    _check_two_rank_run(out, outputs)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_on_cpu(tmp_path, precision):
    out = tmp_path / "run"
    cfg = _config(tmp_path, epochs=1, precision=precision, clip_grad=1.0)
    assert main(["train", "--config", str(cfg), "--output-dir", str(out)]) == 0
    ckpt = load_checkpoint(out / "checkpoint.pth")
    assert ckpt["precision"] == precision
    assert ("fp16_scaler" in ckpt) == (precision == "fp16")  # only fp16 needs loss scaling
    assert all(torch.isfinite(v).all() for v in ckpt["teacher"].values())
    assert all(p.dtype == torch.float32 for p in ckpt["teacher"].values())  # fp32 master weights
