"""DVC experiments drive the Snakemake DAG without stale results (workflow.md §2.3, pitfall 1).

Two experiments queued from the same commit with different pretraining seeds run in DVC's
temporary workspaces, where the persisted results folder is restored from DVC's cache and
Snakemake has no metadata: they must report different metrics, each those of its own settings.
The project is copied into a scratch git + DVC repository with a tiny configuration (one
untrained run, 24 generated images, in-context and overclustering only).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

TINY = {
    "experiment": "dvctest",
    "dataset": {"name": "toyscenes", "toyscenes": {"num_train": 24, "num_val": 6, "image_size": 32, "seed": 0}},
    "pretrain": {"seed": 0, "model": {"arch": "vit_tiny", "patch_size": 8, "img_size": 32, "depth": 1},
                 "train": {"device": "cpu", "num_workers": 0}},
    "runs": {"random": {"method": "random"}},
    "ablations": {},
    "evaluate": {"image_size": 32, "batch_size": 32, "figures": False,
                 "incontext": {"fractions": [1.0], "seeds": [0], "memory_passes": 1, "memory_augment": False},
                 "overcluster": {"clusters": ["classes"], "seeds": 1, "restarts": 1, "iterations": 5},
                 "linear": {"protocols": []}, "finetune": {"decoders": []}},
}


def _run(cmd, cwd, env, timeout=900):
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


@pytest.mark.skipif(shutil.which("git") is None, reason="git is needed for DVC experiments")
def test_queued_experiments_with_different_seeds_report_different_metrics(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("Snakefile", "workflow", "config", "dvc.yaml", ".dvcignore"):
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, repo / name)
    shutil.copytree(ROOT / "src" / "cribo", repo / "src" / "cribo", ignore=shutil.ignore_patterns("__pycache__"))
    (repo / "config" / "config.yaml").write_text(yaml.safe_dump(TINY, sort_keys=False))
    (repo / ".gitignore").write_text(".snakemake/\nlogs/\nresources/\nresults/*\n!results/tables/\n")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "GIT_AUTHOR_NAME": "t",
           "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
           "DVC_NO_ANALYTICS": "1"}
    _run(["git", "init", "-q", "-b", "main"], repo, env)
    _run([str(BIN / "dvc"), "init", "-q"], repo, env)
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-q", "-m", "tiny"], repo, env)
    dvc = str(BIN / "dvc")
    for seed in (1, 2):
        _run([dvc, "exp", "run", "--queue", "-n", f"seed{seed}", "-S", f"config/config.yaml:pretrain.seed={seed}"],
             repo, env)
    _run([dvc, "exp", "run", "--run-all", "--jobs", "1"], repo, env, timeout=1500)
    shown = json.loads(_run([dvc, "exp", "show", "--json"], repo, env))
    metrics = {}
    for commit in shown:
        for exp in (commit.get("experiments") or []):
            for rev in exp.get("revs") or []:
                data = rev.get("data") or {}
                params = data.get("params", {}).get("config/config.yaml", {}).get("data", {})
                values = data.get("metrics", {}).get("results/tables/metrics.json", {}).get("data", {})
                if values:
                    metrics[params["pretrain"]["seed"]] = values
    assert set(metrics) == {1, 2}, shown
    miou = {seed: m["incontext_miou"]["dvctest"]["random"]["toyscenes_f1.0"] for seed, m in metrics.items()}
    assert miou[1] != miou[2], miou  # stale results would repeat one experiment's numbers
    # and `dvc metrics diff` between the two experiments shows the change
    diff = _run([dvc, "metrics", "diff", "seed1", "seed2", "--json"], repo, env)
    assert "incontext_miou" in diff
