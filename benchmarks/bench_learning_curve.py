"""Learning curves: in-context mIoU of pretrained runs against training wall-clock minutes and optimizer steps.

Usage (from the repository root, with the package importable):

    python benchmarks/bench_learning_curve.py --config config/config.yaml --runs cribo dino \\
        --mode budgets --epochs 2 4 8 16 32 --parallel 2 --floors
    python benchmarks/bench_learning_curve.py --config config/config.yaml --runs cribo dino \\
        --mode snapshots --epochs 32 --every 2 --parallel 2 --floors
    python benchmarks/bench_learning_curve.py --config config/config.yaml --runs cribo dino --quick --floors

Modes:

- ``budgets``: one complete training per (run, budget), each with its own learning-rate, weight-decay and
  teacher-momentum schedules over that many epochs: the honest meaning of "trained for N epochs".
- ``snapshots``: one training per run over ``--epochs`` with ``train.saveckp_freq = --every``; each kept
  ``checkpoint<epoch:04d>.pth`` is evaluated. Cheaper, but an intermediate snapshot stopped mid-schedule:
  its learning rate and teacher momentum had not annealed, so it is not what a run of that length gives.

Training: each run is a ``cribo train`` process (``train.threads=1``, ``OMP_NUM_THREADS=1``), ``--parallel`` of
them side by side (queued budget by budget, so the runs of a budget train together), because small models scale
badly across threads; ``--dry-run`` prints the trainings and their folders. The
minutes are the sum of the runs' own ``epoch_seconds`` (``log.txt``): time inside the training loop, measured
while ``--parallel`` runs shared the machine (process start-up and checkpoint writes are left out).

Evaluation (in this process, through the library): the frozen teacher backbone's features of the memory split
(``evaluate.incontext.memory_passes`` passes, augmented when ``memory_augment``) and of the validation split at
``evaluate.image_size``, then in-context retrieval at fraction 1 with the config's ``k``, ``temperature`` and
``memory_size`` (:func:`cribo.eval.protocol.run_incontext`), as the workflow's ``eval_incontext`` rule computes
it. Each evaluation also writes its JSON row under ``<work-dir>/rows/``.

Output in ``--out-dir`` (default ``benchmarks/results``): ``learning_curve.csv`` (one row per evaluated
checkpoint, the floors included with ``mode = floor``), ``learning_curve.png`` (mIoU against minutes and against
steps, one line per run, the floors as horizontal lines) and ``learning_curve.json`` (the exact command line, the
settings and the machine). Trainings go to ``--work-dir`` (default ``results/learning_curve``); a rerun resumes
or reuses finished trainings there (their folders carry the run id).

``--quick``: a smoke run in minutes: a generated 16/4-image toy at 32 px, a 2-block ViT of width 32, batch 4,
budgets of 1 and 2 epochs (snapshots: 2 epochs, every epoch); outputs default to ``results/learning_curve-quick``
so a smoke run never overwrites the committed numbers.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import copy
import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

import cribo
from cribo.config import (ConfigError, atomic_write_text, deep_merge, git_sha, load_yaml, resolve_runs, run_id,
                          validate_run_config)

REPO = Path(__file__).resolve().parents[1]
COLUMNS = ["run", "method", "mode", "epochs", "schedule_epochs", "steps", "images_seen", "train_minutes", "miou",
           "pixel_accuracy", "run_id", "checkpoint"]
FLOOR_METHODS = ("random", "pixels")
NO_SNAPSHOTS = ("random", "pixels", "supervised")  # trained outside the engine, or not at all
SNAPSHOT_NOTE = ("snapshots: intermediate checkpoints of one run over {epochs} epochs; their learning-rate, "
                 "weight-decay and teacher-momentum schedules had not annealed, so a snapshot at N epochs is not "
                 "what an N-epoch run gives")
BUDGET_NOTE = "budgets: one complete training per budget, each with its own schedules over its epochs"

# --quick: small enough for a test, the same code path as the real benchmark
QUICK_TOY = {"num_train": 16, "num_val": 4, "image_size": 32, "seed": 0}
QUICK_RUN = {"model": {"arch": "vit_tiny", "patch_size": 8, "img_size": 32, "depth": 2, "embed_dim": 32,
                       "num_heads": 2, "drop_path_rate": 0.0},
             # a faster teacher and a larger rate than the toy's: eight steps should move the features
             "dino": {"out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16, "local_crops_number": 0,
                      "warmup_teacher_temp_epochs": 0, "momentum_teacher": 0.9},
             "cribo": {"num_clusters": 4, "object_out_dim": 32, "queue_size": 8},
             "optim": {"batch_size": 4, "warmup_epochs": 0, "lr": 0.05},
             "train": {"num_workers": 0, "log_every": 1}}
QUICK_EVAL = {"image_size": 32, "batch_size": 16}
QUICK_BUDGETS, QUICK_SNAPSHOT_EPOCHS, QUICK_EVERY = [1, 2], 2, 1


@dataclass
class Training:
    """One ``cribo train`` process: a run at one budget (or the snapshot run, or a floor)."""

    run: str
    cfg: dict
    out_dir: Path

    @property
    def method(self) -> str:
        return self.cfg["method"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="config/config.yaml", help="workflow config (with 'runs')")
    parser.add_argument("--runs", nargs="+", default=["cribo", "dino"], help="runs of the config to train")
    parser.add_argument("--mode", choices=["budgets", "snapshots"], default="budgets")
    parser.add_argument("--epochs", type=int, nargs="+", default=None,
                        help="budgets: the epoch budgets (default 2 4 8 16 32); snapshots: one number, the length "
                             "of the run (default 32)")
    parser.add_argument("--every", type=int, default=2, help="snapshots: keep and evaluate a checkpoint every N epochs")
    parser.add_argument("--parallel", type=int, default=2, help="training processes side by side (1 thread each)")
    parser.add_argument("--floors", action="store_true",
                        help="also evaluate the config's random and pixels runs (horizontal lines in the PNG)")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny generated toy, tiny ViT, 1-2 epochs")
    parser.add_argument("--dry-run", action="store_true", help="print the trainings (run ids, folders) and stop")
    parser.add_argument("--out-dir", default=None, help="CSV, PNG and JSON (default benchmarks/results)")
    parser.add_argument("--work-dir", default=None, help="trainings and rows (default results/learning_curve)")
    args = parser.parse_args(argv)
    if args.epochs is None:
        args.epochs = [2, 4, 8, 16, 32] if args.mode == "budgets" else [32]
    if args.quick:
        args.epochs = list(QUICK_BUDGETS) if args.mode == "budgets" else [QUICK_SNAPSHOT_EPOCHS]
        args.every = QUICK_EVERY
    suffix = "-quick" if args.quick else ""
    args.out_dir = Path(args.out_dir or ("results/learning_curve-quick" if args.quick else "benchmarks/results"))
    args.work_dir = Path(args.work_dir or f"results/learning_curve{suffix}")
    if args.mode == "snapshots" and len(args.epochs) != 1:
        parser.error(f"--mode snapshots takes one --epochs value (the run's length), got {args.epochs}")
    if min(args.epochs) < 1 or args.every < 1 or args.parallel < 1:
        parser.error("--epochs, --every and --parallel must be at least 1")
    return args


def load_workflow_config(path: str | Path) -> dict:
    """The workflow config with the workflow schema's defaults filled in, as the Snakefile sees it."""
    from snakemake.utils import validate

    cfg = load_yaml(path)
    if "runs" not in cfg:
        raise ConfigError(f"{path} has no 'runs' section; give a workflow config such as config/config.yaml")
    try:
        validate(cfg, str(REPO / "workflow" / "schemas" / "config.schema.yaml"), set_default=True)
    except Exception as err:  # snakemake's WorkflowError carries the schema message
        raise ConfigError(f"{path}: {err}") from None
    return cfg


def data_root(workflow_cfg: dict, run_cfgs: dict[str, dict], work_dir: Path, quick: bool) -> Path:
    """The dataset folder the runs read: the quick toy, or the one the workflow config points at."""
    return work_dir / "quick-toyscenes" if quick else Path(next(iter(run_cfgs.values()))["data"]["root"])


def prepare_data(workflow_cfg: dict, root: Path, quick: bool) -> None:
    """Generate the toy if it is missing (the generator is deterministic); a real dataset must be prepared."""
    from cribo.data.toyscenes import generate

    ds = workflow_cfg["dataset"]
    if quick:
        generate(root, workers=1, progress=False, **QUICK_TOY)
    elif ds["name"] == "toyscenes" and not root.exists():
        print(f"generating the config's toy scenes into {root}", flush=True)
        generate(root, progress=False, **ds.get("toyscenes", {}))
    elif not root.exists():
        raise FileNotFoundError(f"dataset folder {root} of {ds['name']} does not exist; prepare it first "
                                f"(snakemake --cores 2 {root}/.prepared.json)")


def plan(args: argparse.Namespace, workflow_cfg: dict) -> tuple[list[Training], list[Training], str]:
    """(trainings of the curve, trainings of the floors, dataset root)."""
    resolved = resolve_runs(workflow_cfg, args.config)
    missing = [r for r in args.runs if r not in resolved]
    if missing:
        raise ConfigError(f"{args.config}: no run(s) named {', '.join(missing)}; its runs are {', '.join(resolved)}")
    floors = [next((n for n, c in resolved.items() if c["method"] == m), None) for m in FLOOR_METHODS] \
        if args.floors else []
    if args.floors and None in floors:
        raise ConfigError(f"{args.config}: --floors needs a run with method random and one with method pixels, "
                          "e.g. runs: {random: {method: random}, pixels: {method: pixels}}")
    no_snapshots = [r for r in args.runs if resolved[r]["method"] in NO_SNAPSHOTS]
    if args.mode == "snapshots" and no_snapshots:
        raise ConfigError(f"run(s) {', '.join(no_snapshots)} (method "
                          f"{', '.join(sorted({resolved[r]['method'] for r in no_snapshots}))}) keep no "
                          "per-epoch snapshots (train.saveckp_freq is an engine option); use --mode budgets for them")
    root = str(data_root(workflow_cfg, resolved, args.work_dir, args.quick))
    snapshot_every = args.every if args.mode == "snapshots" else 0

    def training(name: str, epochs: int | None, saveckp_freq: int) -> Training:
        cfg = copy.deepcopy(resolved[name])
        if args.quick:
            cfg = deep_merge(cfg, QUICK_RUN)
        cfg["data"]["root"] = root
        if epochs is not None:
            cfg["optim"]["epochs"] = epochs
        cfg["train"].update(threads=1, progress=False, saveckp_freq=saveckp_freq)
        cfg = validate_run_config(cfg, f"{args.config} (runs.{name}, benchmark settings)")
        folder = f"{name}-{run_id(cfg)}" + (f"-snapshots{saveckp_freq}" if saveckp_freq else "")
        return Training(name, cfg, args.work_dir / "runs" / folder)

    # budget-major: the runs of one budget train side by side and share the machine alike
    curve = [training(name, epochs, snapshot_every) for epochs in sorted(args.epochs) for name in args.runs]
    return curve, [training(name, None, 0) for name in floors], root


def run_training(job: Training) -> Training:
    """``cribo train`` in its own single-threaded process; its output goes to ``<out_dir>/train.log``."""
    job.out_dir.mkdir(parents=True, exist_ok=True)
    config_path = job.out_dir / "benchmark-config.yaml"
    atomic_write_text(config_path, yaml.safe_dump(job.cfg, sort_keys=False))
    # the child imports the same cribo as this process, whichever checkout that is
    package_parent = str(Path(cribo.__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [package_parent, os.environ.get("PYTHONPATH")]))}
    log = job.out_dir / "train.log"
    with open(log, "a") as fh:
        done = subprocess.run([sys.executable, "-m", "cribo.cli", "train", "--config", str(config_path),
                               "--output-dir", str(job.out_dir)], stdout=fh, stderr=subprocess.STDOUT, env=env)
    if done.returncode:
        tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
        raise RuntimeError(f"training {job.run} ({job.out_dir}) failed with exit code {done.returncode}; "
                           f"see {log}:\n{tail}")
    return job


def train_all(jobs: list[Training], parallel: int) -> None:
    with concurrent.futures.ThreadPoolExecutor(max_workers=parallel) as pool:
        for job in pool.map(run_training, jobs):
            what = "untrained" if job.method in FLOOR_METHODS else f"{job.cfg['optim']['epochs']} epochs"
            print(f"trained {job.run} ({what}) -> {job.out_dir}", flush=True)


def epoch_seconds(run_dir: Path) -> dict[int, float]:
    """``{epoch: seconds}`` from the run's ``log.txt`` (the last record of an epoch, should it have been resumed)."""
    seconds = {}
    log = run_dir / "log.txt"
    if log.is_file():
        for line in log.read_text().splitlines():
            record = json.loads(line)
            seconds[int(record["epoch"])] = float(record["epoch_seconds"])
    return seconds


def checkpoints_to_evaluate(job: Training, mode: str, every: int) -> list[Path]:
    epochs = job.cfg["optim"]["epochs"]
    if job.method in FLOOR_METHODS or mode == "budgets":
        return [job.out_dir / "checkpoint.pth"]
    from cribo.train.engine import snapshot_name

    kept = [job.out_dir / snapshot_name(e) for e in range(every, epochs + 1, every)]
    if epochs % every:
        kept.append(job.out_dir / "checkpoint.pth")  # the end of the run, between two snapshots
    return kept


class InContextEvaluator:
    """In-context mIoU at fraction 1 of a checkpoint, with the workflow config's evaluation settings."""

    def __init__(self, workflow_cfg: dict, data_root: str, quick: bool, rows_dir: Path, experiment: str):
        from cribo.data.registry import get_spec

        self.eval_cfg = {**workflow_cfg["evaluate"], **(QUICK_EVAL if quick else {})}
        self.incontext = self.eval_cfg["incontext"]
        self.spec = get_spec(workflow_cfg["dataset"]["name"], data_root)
        self.root, self.rows_dir, self.experiment = data_root, rows_dir, experiment

    def __call__(self, checkpoint: Path, run: str, label: str) -> dict:
        from cribo.eval.features import extract_split
        from cribo.eval.protocol import make_row, run_incontext, write_row
        from cribo.models.backbones import backbone_from_checkpoint
        from cribo.train.checkpoint import file_sha256, load_checkpoint

        started = time.time()
        ckpt = load_checkpoint(checkpoint)
        backbone = backbone_from_checkpoint(ckpt, str(checkpoint)).eval()
        size, batch = self.eval_cfg["image_size"], self.eval_cfg["batch_size"]
        memory = extract_split(backbone, self.spec, self.root, self.spec.train_split, size, batch_size=batch,
                               passes=self.incontext["memory_passes"], augment=self.incontext["memory_augment"],
                               progress=False)
        queries = extract_split(backbone, self.spec, self.root, self.spec.val_split, size, batch_size=batch,
                                progress=False)
        result = run_incontext(memory, queries, fraction=1.0, seed=self.incontext["seeds"][0], k=self.incontext["k"],
                               temperature=self.incontext["temperature"], memory_size=self.incontext["memory_size"])
        row = make_row("incontext", result, checkpoint=str(checkpoint), checkpoint_sha256=file_sha256(checkpoint),
                       checkpoint_cfg=ckpt.get("config"), dataset=self.spec.name, split=self.spec.val_split,
                       class_names=list(self.spec.class_names), experiment=self.experiment, run_name=run,
                       started=started)
        write_row(row, self.rows_dir / f"{label}.json")
        return {"miou": row["miou"], "pixel_accuracy": row["pixel_accuracy"], "global_step": ckpt.get("global_step"),
                "epoch": ckpt.get("epoch", 0), "world_size": ckpt.get("world_size", 1)}


def curve_rows(jobs: list[Training], evaluate: InContextEvaluator, mode: str, every: int) -> list[dict]:
    rows = []
    for job in jobs:
        seconds = epoch_seconds(job.out_dir)
        for path in checkpoints_to_evaluate(job, mode, every):
            floor = job.method in FLOOR_METHODS
            label = f"{job.out_dir.name}-{path.stem}"
            out = evaluate(path, job.run, label)
            epochs = 0 if floor else int(out["epoch"])
            steps = 0 if floor else _steps(out, job, epochs)
            rows.append({
                "run": job.run, "method": job.method, "mode": "floor" if floor else mode, "epochs": epochs,
                "schedule_epochs": 0 if floor else job.cfg["optim"]["epochs"], "steps": steps,
                "images_seen": steps * job.cfg["optim"]["batch_size"] * int(out["world_size"]),
                "train_minutes": round(sum(s for e, s in seconds.items() if e < epochs) / 60.0, 3),
                "miou": out["miou"], "pixel_accuracy": out["pixel_accuracy"], "run_id": run_id(job.cfg),
                "checkpoint": str(path)})
            print(f"{job.run} epochs {epochs} steps {steps}: in-context mIoU {out['miou']:.2f}", flush=True)
    return rows


def _steps(evaluated: dict, job: Training, epochs: int) -> int:
    """The checkpoint's optimizer steps; a checkpoint that does not record them (method ``supervised``) ran
    ``epochs`` epochs of ``floor(training images / batch)`` steps (its loader drops the last partial batch)."""
    if evaluated["global_step"] is not None:
        return int(evaluated["global_step"])
    from cribo.data.images import list_pretrain_images
    from cribo.data.registry import get_spec

    data = job.cfg["data"]
    split = data.get("split") or get_spec(data["dataset"], data["root"]).train_split
    return epochs * (len(list_pretrain_images(data["root"], split)) // job.cfg["optim"]["batch_size"])


def plot(frame, png: Path, title: str) -> None:
    """Two panels, mIoU against training minutes and against optimizer steps; floors as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    curve, floors = frame[frame["mode"] != "floor"], frame[frame["mode"] == "floor"]
    for ax, x, xlabel in ((axes[0], "train_minutes", "training wall-clock (minutes)"),
                          (axes[1], "steps", "optimizer steps")):
        for run, group in curve.groupby("run", sort=False):
            group = group.sort_values(x)
            ax.plot(group[x], group["miou"], marker="o", label=f"{run} ({group['method'].iloc[0]})")
        for (_, floor), style in zip(floors.iterrows(), ("--", ":", "-.")):
            ax.axhline(floor["miou"], color="grey", linestyle=style, label=f"{floor['run']} (floor)")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("in-context mIoU at fraction 1 (%)")
    axes[1].legend(fontsize=8, loc="best")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    tmp = png.with_name(f".{png.name}.tmp-{os.getpid()}")
    try:
        fig.savefig(tmp, dpi=120, format="png")
        os.replace(tmp, png)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    import pandas as pd

    args = parse_args(argv)
    command = shlex.join(["python", "benchmarks/bench_learning_curve.py",
                          *(sys.argv[1:] if argv is None else argv)])
    try:
        workflow_cfg = load_workflow_config(args.config)
        curve, floors, root = plan(args, workflow_cfg)
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    note = SNAPSHOT_NOTE.format(epochs=args.epochs[0]) if args.mode == "snapshots" else BUDGET_NOTE
    print(note, flush=True)
    if args.dry_run:
        for job in floors + curve:
            what = "untrained" if job.method in FLOOR_METHODS else f"{job.cfg['optim']['epochs']} epochs"
            print(f"{job.run}: method {job.method}, {what}, run id {run_id(job.cfg)} -> {job.out_dir}")
        return 0
    started = time.time()
    try:
        prepare_data(workflow_cfg, Path(root), args.quick)
        train_all(floors + curve, args.parallel)
    except (FileNotFoundError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    import torch

    torch.set_num_threads(args.parallel)  # the trainings are done: evaluation has the machine
    evaluate = InContextEvaluator(workflow_cfg, root, args.quick, args.work_dir / "rows", workflow_cfg["experiment"])
    rows = curve_rows(floors + curve, evaluate, args.mode, args.every)
    frame = pd.DataFrame(rows, columns=COLUMNS)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    csv = args.out_dir / "learning_curve.csv"
    atomic_write_text(csv, frame.to_csv(index=False, float_format="%.4f"))
    title = (f"{args.config}: in-context mIoU (fraction 1) - {args.mode}"
             + (f", snapshots of one {args.epochs[0]}-epoch run (schedules not annealed)"
                if args.mode == "snapshots" else ", one complete run per budget")
             + (" - QUICK smoke run" if args.quick else ""))
    plot(frame, args.out_dir / "learning_curve.png", title)
    sidecar = {"command": command, "note": note, "mode": args.mode, "config": str(args.config),
               "runs": args.runs, "epochs": args.epochs, "every": args.every if args.mode == "snapshots" else None,
               "parallel": args.parallel, "quick": args.quick, "data_root": root,
               "evaluate": {**{k: evaluate.incontext[k] for k in ("k", "temperature", "memory_size",
                                                                 "memory_passes", "memory_augment")},
                            "fraction": 1.0, "seed": evaluate.incontext["seeds"][0],
                            "image_size": evaluate.eval_cfg["image_size"]},
               "train_minutes": "sum of the runs' epoch_seconds (log.txt), trainings sharing the machine "
                                f"{args.parallel} at a time, one thread each",
               "wall_time_s": round(time.time() - started, 1), "git_sha": git_sha(REPO),
               "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                           "torch": torch.__version__},
               "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    atomic_write_text(args.out_dir / "learning_curve.json", json.dumps(sidecar, indent=1) + "\n")
    print(f"{len(frame)} rows -> {csv}, {args.out_dir / 'learning_curve.png'}, {args.out_dir / 'learning_curve.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
