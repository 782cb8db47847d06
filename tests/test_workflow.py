"""The Snakemake DAG: dry runs, config validation, and what a failed rule leaves behind.

Each test copies the workflow into a temporary folder so it never touches the project's results.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _workdir(tmp_path, **changes) -> Path:
    for name in ("Snakefile", "workflow", "config", "profiles"):
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp_path / name)
    cfg = yaml.safe_load((ROOT / "config" / "ci.yaml").read_text())
    for dotted, value in changes.items():
        node = cfg
        *parents, leaf = dotted.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    (tmp_path / "config" / "test.yaml").write_text(yaml.safe_dump(cfg))
    return tmp_path


def _snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run([str(BIN / "snakemake"), "--configfile", "config/test.yaml", *args],
                          cwd=workdir, env=env, capture_output=True, text=True, timeout=600)


def test_dry_run_plans_every_stage_even_with_committed_tables(tmp_path):
    workdir = _workdir(tmp_path)
    # a fresh clone holds the git-tracked tables of another run; they must not short-circuit the DAG
    shutil.copytree(ROOT / "results" / "tables", workdir / "results" / "tables")
    out = _snakemake(workdir, "-n")
    assert out.returncode == 0, out.stderr
    text = out.stdout + out.stderr
    # ci.yaml merged into config.yaml: random, pixels, supervised, dino, cribo, byol, orl + 1 ablation of
    # cribo, trained, + 1 imported baseline (a random ResNet-50): 9 evaluated; 2 splits each; one in-context
    # job per run (every fraction and seed) and one overclustering job per run (every K); linear protocols
    # leopart + mmseg -> 2 rows per run; one fine-tuning decoder (mask); SVM for svm.runs (cribo and the
    # baseline): 2 splits, 1 full + k=2 x 2 selections per run; classification for the same two (linear, and
    # the toy's 10 % list at two grid points) on the toy's classification view; detection for the baseline
    # only; ORL stage 2 in 2 shards
    for rule, count in (("download_toyscenes", 1), ("run_config", 8), ("pretrain", 8), ("init_weights", 1),
                        ("import_baseline", 1), ("extract", 18), ("eval_incontext", 9), ("eval_overcluster", 9),
                        ("eval_linear", 18), ("eval_finetune", 9), ("extract_global", 4), ("eval_svm", 2),
                        ("eval_svm_lowshot", 4), ("toy_image_folder", 1), ("eval_classify", 6), ("eval_detect", 1), ("orl_proposals", 2),
                        ("orl_correspondence", 1),
                        ("table", 1)):
        assert any(line.split() == [rule, str(count)] for line in text.splitlines()), (rule, text[-2000:])


def test_orl_protocols_overlay_adds_only_their_rules_to_the_embedded_default(tmp_path):
    # config/toy_orl_protocols.yaml on top of config/config.yaml (not ci.yaml): SVM and classification for
    # the six runs it names, nothing for pixels or the ablation, and detection for the random ResNet-50
    # baseline it adds (which the dense protocols also take: 9 in-context jobs for 8 runs + 1 baseline)
    workdir = _workdir(tmp_path)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    out = subprocess.run([str(BIN / "snakemake"), "-n", "-p", "--configfile", "config/config.yaml",
                          "config/toy_orl_protocols.yaml"], cwd=workdir, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr
    lines = (out.stdout + out.stderr).splitlines()
    # 6 runs x 2 splits; 6 x (1 full SVM + K = 4 x 2 cost selections); 6 x (linear + one semi point)
    for rule, count in (("extract_global", 12), ("eval_svm", 6), ("eval_svm_lowshot", 12), ("toy_image_folder", 1),
                        ("eval_classify", 12), ("pretrain", 8), ("eval_incontext", 9), ("init_weights", 1),
                        ("import_baseline", 1), ("eval_detect", 1)):
        assert any(line.split() == [rule, str(count)] for line in lines), (rule, lines[-60:])
    detect = next(line for line in lines if "cribo eval detect " in line)
    for flag in ("--iterations 300 ", "--roi-batch-per-image 32 ", "--rpn-batch-per-image 64 ",
                 "--proposals-train 100 ", "--proposals-test 100 ", "--run-name random_r50 "):
        assert flag in detect, (flag, detect)


def test_workflow_config_typo_names_the_key(tmp_path):
    out = _snakemake(_workdir(tmp_path, evaluate__incontext__temprature=0.1), "-n")
    assert out.returncode != 0
    assert "temprature" in out.stderr + out.stdout


@pytest.mark.parametrize("protocol", ["svm", "classify"])
def test_protocol_runs_naming_no_run_is_refused(tmp_path, protocol):
    out = _snakemake(_workdir(tmp_path, **{f"evaluate__{protocol}__runs": ["cribo", "crib0"]}), "-n")
    assert out.returncode != 0
    assert f"evaluate.{protocol}.runs names crib0" in out.stderr + out.stdout


def test_classification_rows_use_official_lists_by_name_and_files_by_stem(tmp_path):
    # on a user's ImageNet: the official 1 % list is passed by name (the CLI downloads and verifies it),
    # a list file by its path; the rows are named after the list
    workdir = _workdir(tmp_path, evaluate__classify__dataset="imagenet", evaluate__classify__root="/data/in1k",
                       evaluate__classify__runs=["cribo"], evaluate__classify__subsets=["1percent", "lists/my-5pc.txt"])
    out = _snakemake(workdir, "-n", "-p")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "--subset-list 1percent " in text and "--subset-list lists/my-5pc.txt " in text
    # ci.yaml's two-point grid (lr 0.01 and 0.1, head x1): one row per list and point
    for lst in ("1percent", "my-5pc"):
        assert f"/semi-{lst}-lr0.01-x1.json" in text and f"/semi-{lst}-lr0.1-x1.json" in text
    assert "--lr 0.1 --head-lr-mult 1" in text and "/linear.json" in text
    assert "toy_image_folder" not in text and "--data-root /data/in1k" in text
    assert "--nproc-per-node 0 " in text  # one CPU process here; the SLURM profile gives the rule 8 GPUs


@pytest.mark.parametrize("lr, mult, expected", [
    ([0.001, 0.01, 0.1], [1, 10, 100], 9),  # the official grid (the schema's default)
    (0.01, 1, 1),  # one point: the short name semi-<list>
])
def test_semi_supervised_grid_makes_one_row_per_point(tmp_path, lr, mult, expected):
    workdir = _workdir(tmp_path, evaluate__classify__runs=["cribo"], evaluate__classify__semi__lr=lr,
                       evaluate__classify__semi__head_lr_mult=mult)
    out = _snakemake(workdir, "-n", "-p")
    assert out.returncode == 0, out.stderr
    semi = {m for m in re.findall(r"/(semi-[A-Za-z0-9._-]+)\.json", out.stdout)}
    assert len(semi) == expected, sorted(semi)
    if expected == 9:
        assert "semi-10percent-lr0.001-x100" in semi and "--lr 0.001 --head-lr-mult 100" in out.stdout
    else:
        assert semi == {"semi-10percent"}


def test_run_config_typo_names_the_key_and_the_file(tmp_path):
    out = _snakemake(_workdir(tmp_path, pretrain__optim__lrate=0.1), "-n")
    assert out.returncode != 0
    text = out.stderr + out.stdout
    assert "'lrate'" in text and "config/test.yaml" in text


@pytest.mark.slow
def test_failed_pretrain_leaves_no_completion_marker_and_no_table(tmp_path):
    # 8 training images cannot fill a batch of 32: the DINO run fails, the baselines succeed
    workdir = _workdir(tmp_path, dataset__toyscenes__num_train=8, dataset__toyscenes__num_val=4,
                       runs={"random": {"method": "random"}, "dino": {"method": "dino"}}, ablations={})
    # these two runs only: the test config replaces the embedded default instead of adding its runs,
    # and the image-level protocols (SVM, detection of an imported baseline) stay off
    cfg = yaml.safe_load((workdir / "config" / "test.yaml").read_text())
    for key in ("baselines", "orl"):
        cfg.pop(key, None)
    for key in ("svm", "detect", "classify"):
        cfg["evaluate"].pop(key, None)
    for name in ("test.yaml", "config.yaml"):
        (workdir / "config" / name).write_text(yaml.safe_dump(cfg))
    out = _snakemake(workdir, "--cores", "2", "--keep-going")
    assert out.returncode != 0
    summaries = {p.parent.parent.name: p for p in workdir.glob("results/ci/*/pretrain/summary.json")}
    runs = subprocess.run([str(BIN / "cribo"), "config", "runs", "--config", "config/test.yaml"], cwd=workdir,
                          capture_output=True, text=True, check=True).stdout.split("\n")
    ids = dict(line.split("\t")[:2] for line in runs if line)
    assert ids["random"] in summaries and ids["dino"] not in summaries
    assert not (workdir / "results" / "tables" / "incontext.csv").exists()
    log = (workdir / "logs" / "ci" / ids["dino"] / "pretrain.log").read_text()
    assert "fewer than one global batch" in log
    assert json.loads(summaries[ids["random"]].read_text())["method"] == "random"


def test_new_dataset_gives_new_feature_paths_even_for_data_independent_runs(tmp_path):
    # the random run's checkpoint does not depend on the data; its features and rows do
    def feature_dirs(workdir):
        out = _snakemake(workdir, "-n")
        assert out.returncode == 0, out.stderr
        return {line.split("output: ")[1] for line in out.stdout.splitlines() if "/features/" in line and "output:" in line}

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = feature_dirs(_workdir(tmp_path / "a"))
    b = feature_dirs(_workdir(tmp_path / "b", dataset__toyscenes__num_train=300))
    assert a and b and not a & b


def test_dataset_stages_plan_downloads_then_prepare(tmp_path):
    # not in the default target: asked for by their marker, they plan one download per archive
    out = _snakemake(_workdir(tmp_path), "-n", "resources/coco-things12/.prepared.json",
                     "resources/checked/imagenet.json")
    assert out.returncode == 0, out.stderr
    text = out.stdout + out.stderr
    for rule, count in (("download_archive", 3), ("prepare_dataset", 1), ("check_user_dataset", 1)):
        assert any(line.split() == [rule, str(count)] for line in text.splitlines()), (rule, text[-2000:])
    assert "cribo data prepare coco-things12 --raw resources/raw --out resources/coco-things12" in text


def test_real_dataset_config_waits_for_the_prepared_marker(tmp_path):
    workdir = _workdir(tmp_path, dataset__name="voc", dataset__root="resources/voc")
    out = _snakemake(workdir, "-n")
    assert out.returncode == 0, out.stderr
    text = out.stdout + out.stderr
    assert any(line.split() == ["prepare_dataset", "1"] for line in text.splitlines()), text[-2000:]
    assert any(line.split() == ["download_archive", "2"] for line in text.splitlines()), text[-2000:]


def test_pretraining_on_coco_waits_for_the_coco_images(tmp_path):
    coco = {"data": {"dataset": "coco", "root": "resources/coco/train2017", "split": None}}
    workdir = _workdir(tmp_path, dataset__name="voc", dataset__root="resources/voc",
                       runs={"dino": {"method": "dino", **coco}, "random": {"method": "random"}}, ablations={})
    out = _snakemake(workdir, "-n")
    assert out.returncode == 0, out.stderr
    text = out.stdout + out.stderr
    # voc (VOC tar + SBD) and coco (train2017 + val2017): 4 archives, 2 prepared datasets
    assert any(line.split() == ["download_archive", "4"] for line in text.splitlines()), text[-3000:]
    assert any(line.split() == ["prepare_dataset", "2"] for line in text.splitlines()), text[-3000:]


def test_baseline_weights_enter_the_dag_as_runs(tmp_path):
    # replaces ci.yaml's baselines (its random ResNet-50, which detection, the SVM and classification then no longer name)
    workdir = _workdir(tmp_path, baselines={"dino_tiny": {"weights": "weights/dino.pth", "method": "dino",
                                                          "pretrain": "imagenet"}}, evaluate__detect__runs=[],
                       evaluate__svm__runs=["cribo"], evaluate__classify__runs=["cribo"])
    (workdir / "weights").mkdir()
    (workdir / "weights" / "dino.pth").write_bytes(b"placeholder: the dry run only plans")
    out = _snakemake(workdir, "-n")
    assert out.returncode == 0, out.stderr
    text = out.stdout + out.stderr
    # 8 trained runs (config.yaml's and ci.yaml's, + the ablation) + the baseline: one import, no pretraining
    # of it, its features and rows like the others (one in-context job per run)
    for rule, count in (("import_baseline", 1), ("pretrain", 8), ("extract", 18), ("eval_incontext", 9)):
        assert any(line.split() == [rule, str(count)] for line in text.splitlines()), (rule, text[-3000:])


def test_released_checkpoints_named_in_baselines_are_fetched_by_the_import(tmp_path):
    # replaces ci.yaml's baselines, so detection, the SVM and classification (which name its random ResNet-50) leave it out
    workdir = _workdir(tmp_path, baselines=["cribo_vits16_coco", "dino_vits16"], evaluate__detect__runs=[],
                       evaluate__svm__runs=["cribo"], evaluate__classify__runs=["cribo"])
    out = _snakemake(workdir, "-n", "-p")
    assert out.returncode == 0, out.stderr
    text = out.stdout + out.stderr
    assert any(line.split() == ["import_baseline", "2"] for line in text.splitlines()), text[-3000:]
    assert "--from-catalogue cribo_vits16_coco --catalogue config/checkpoints.yaml" in text
    assert "--from-catalogue dino_vits16" in text and "--method dino" in text and "--pretrain-data imagenet" in text


def test_srun_layout_spells_out_the_task_geometry(tmp_path):
    # the Slurm plugin's job step strips SLURM_NTASKS & co. from the rule's environment, so the rule's
    # srun must be given the nodes and tasks itself (a bare srun started one task on the CI's Slurm)
    workdir = _workdir(tmp_path, runs={"cribo": {"method": "cribo",
                                                 "train": {"nodes": 2, "gpus_per_node": 4}}})
    out = _snakemake(workdir, "-n", "-p", "--cores", "3")
    assert out.returncode == 0, out.stderr
    assert "srun --nodes 2 --ntasks-per-node 4 --cpus-per-task 1 cribo train --config" in out.stdout


def test_detection_on_coco_waits_for_the_prepared_instances(tmp_path):
    coco = "resources/coco-instances"
    workdir = _workdir(tmp_path, evaluate__detect__train_ann=f"{coco}/annotations/instances_train2017.json",
                       evaluate__detect__val_ann=f"{coco}/annotations/instances_val2017.json",
                       evaluate__detect__train_images=f"{coco}/train2017", evaluate__detect__val_images=f"{coco}/val2017")
    out = _snakemake(workdir, "-n", "-p")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    # download (images + annotations_trainval2017.zip) -> prepare coco-instances -> eval_detect
    assert "cribo data prepare coco-instances" in text and "cribo data download coco_annotations" in text
    assert f"--train-ann {coco}/annotations/instances_train2017.json" in text
