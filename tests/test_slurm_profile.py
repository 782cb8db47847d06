"""The sbatch lines that snakemake-executor-plugin-slurm builds for our SLURM profile's rules,
computed with the plugin's own submit-string code (no cluster needed)."""

from pathlib import Path
from types import SimpleNamespace

import yaml
from snakemake_executor_plugin_slurm.submit_string import get_submit_command
from snakemake_executor_plugin_slurm.utils import set_gres_string

PROFILE = Path(__file__).resolve().parents[1] / "profiles" / "slurm" / "profile.yaml"


class _Resources(dict):
    __getattr__ = dict.__getitem__


def _sbatch(rule: str) -> str:
    profile = yaml.safe_load(PROFILE.read_text())
    resources = _Resources({**profile["default-resources"], **profile["set-resources"].get(rule, {})})
    job = SimpleNamespace(resources=resources, threads=profile["set-threads"].get(rule, 1), name=rule)
    params = {"run_uuid": "uuid", "slurm_logfile": "log", "comment_str": rule, "account": "", "partition": "",
              "workdir": "/work"}
    return get_submit_command(job, params) + set_gres_string(job)


def test_pretrain_asks_for_eight_gpus_and_one_task():
    line = _sbatch("pretrain")
    assert "--gpus=8" in line and "--cpus-per-gpu=8" in line and "--mem 256000" in line and "-t 72h" in line
    # one task: torchrun starts the 8 processes; --ntasks-per-gpu would start 8 torchruns
    assert "--ntasks-per-gpu" not in line and "--ntasks" not in line and "--gres" not in line


def test_extract_one_gpu_and_cpu_rules_one_task():
    assert "--gpus=1" in _sbatch("extract") and "--ntasks-per-gpu" not in _sbatch("extract")
    line = _sbatch("eval_incontext")
    assert "--ntasks=1" in line and "--cpus-per-task=8" in line and "--gpus" not in line and "--mem 64000" in line


def test_profile_never_sets_tasks_on_a_gpu_rule_and_polls_with_squeue():
    profile = yaml.safe_load(PROFILE.read_text())
    for rule, res in profile["set-resources"].items():
        if res.get("gpu") or "gpu" in str(res.get("gres", "")):
            assert "tasks" not in res and "tasks_per_gpu" not in res, rule
    assert "tasks" not in profile["default-resources"]
    assert profile["slurm-status-command"] == "squeue"  # sacct hangs the plugin without slurmdbd


def _sbatch_srun(train: dict) -> str:
    """The sbatch line of rule pretrain_srun for a run with these train settings."""
    from cribo.train.launch_layout import launch_layout

    profile = yaml.safe_load(PROFILE.read_text())
    layout = launch_layout(train)
    resources = _Resources({**profile["default-resources"], **layout["resources"],
                            **profile["set-resources"]["pretrain_srun"]})
    resources.setdefault("gres", "")
    job = SimpleNamespace(resources=resources, threads=profile["set-threads"]["pretrain_srun"], name="pretrain_srun")
    params = {"run_uuid": "uuid", "slurm_logfile": "log", "comment_str": "pretrain_srun", "account": "",
              "partition": "", "workdir": "/work"}
    return get_submit_command(job, params) + set_gres_string(job)


def test_two_nodes_of_four_gpus_from_the_run_config():
    line = _sbatch_srun({"nodes": 2, "gpus_per_node": 4, "launcher": "auto"})
    # per-node GPUs (gres), one task per GPU on each node, no per-job --gpus and no tasks per GPU
    assert "--nodes=2" in line and "--ntasks-per-node=4" in line and "--gres=gpu:4" in line
    assert "--gpus=" not in line and "--ntasks-per-gpu" not in line and "-t 72h" in line


def test_srun_layout_on_one_node_with_two_cpu_tasks():
    line = _sbatch_srun({"nodes": 1, "launcher": "srun", "tasks_per_node": 2})
    assert "--nodes=1" in line and "--ntasks-per-node=2" in line and "gpu" not in line


def test_launch_layouts_and_their_errors():
    import pytest

    from cribo.config import ConfigError
    from cribo.train.launch_layout import launch_layout

    single = launch_layout({"nodes": 1, "gpus_per_node": None, "launcher": "auto"})
    assert single == {"launcher": "torchrun", "resources": {}}
    assert launch_layout({"nodes": 1, "gpus_per_node": 4})["resources"] == {"gpu": 4}
    multi = launch_layout({"nodes": 3, "gpus_per_node": 8})
    assert multi["launcher"] == "srun"
    assert multi["resources"] == {"nodes": 3, "tasks_per_node": 8, "mpi": "srun", "gres": "gpu:8"}
    with pytest.raises(ConfigError, match="single-node"):
        launch_layout({"nodes": 2, "gpus_per_node": 4, "launcher": "torchrun"})
    with pytest.raises(ConfigError, match="one process per GPU"):
        launch_layout({"nodes": 2, "gpus_per_node": 4, "tasks_per_node": 2})
    with pytest.raises(ConfigError, match="at least 2 processes"):
        launch_layout({"nodes": 2, "gpus_per_node": 1})
