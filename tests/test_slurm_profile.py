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
