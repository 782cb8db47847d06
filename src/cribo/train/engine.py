"""The pretraining engine: any method, the training loop readable top to bottom.

``train(cfg, output_dir)`` writes ``output_dir/checkpoint.pth`` (the method's official-style key
layout plus what exact resumption needs: every rank's RNG states, the position in the epoch, the
resolved config, git SHA, package versions, world size; written atomically at the end of every
epoch, every ``train.checkpoint_every`` steps, and on SIGTERM/SIGUSR1; every ``train.saveckp_freq``
epochs a copy is kept as ``checkpoint<epoch:04d>.pth``, as DINO does), ``config.yaml`` (the
resolved run config), ``provenance.json``, ``log.txt`` (one JSON line per epoch, like the official
code's), ``log_steps.jsonl`` and ``dvclive/`` (one record every ``train.log_every`` steps). An
existing ``checkpoint.pth`` is resumed from its recorded step (:func:`resume`): with the same
number of processes the continuation is bit-identical to an uninterrupted run on CPU (data order
and augmentations are functions of (seed, epoch, index), see :mod:`cribo.train.sampling`).

Launch: a plain process, ``torchrun`` or ``srun`` (see :mod:`cribo.train.distributed`). Precision:
``optim.precision`` (fp32, fp16 with loss scaling, bf16, auto); clustering, retrieval and losses
always run in fp32.

Methods are :class:`cribo.method.base.Method` classes looked up by name (``dino``, ``cribo``,
``byol``, ``orl``); the engine never branches on the name. ``random`` and ``pixels`` train nothing
(:mod:`cribo.method.untrained`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from cribo.config import atomic_write_text, provenance, write_run_config
from cribo.data.images import list_pretrain_images
from cribo.method.base import Method, build_method
from cribo.method.schedules import cosine_schedule
from cribo.method.untrained import UNTRAINED
from cribo.train.checkpoint import check_resume_settings, copy_checkpoint, load_checkpoint, save_checkpoint
from cribo.train.host_memory import FragmentationGuard, keep_freed_host_memory
from cribo.train.distributed import (DistInfo, all_gather_objects, barrier, cleanup, init_distributed,
                                     is_distributed)
from cribo.train.sampling import ResumableEpochSampler
from cribo.train.step_logs import drop_logged_steps_from

CHECKPOINT_NAME = "checkpoint.pth"


def snapshot_name(epochs_done: int) -> str:
    """The kept copy of the checkpoint after ``epochs_done`` epochs (DINO's ``checkpoint0008.pth``)."""
    return f"checkpoint{epochs_done:04d}.pth"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def clip_gradients(model: nn.Module, max_norm: float) -> None:
    """Per-parameter norm clipping, as DINO and CrIBo do (not one global norm)."""
    for param in model.parameters():
        if param.grad is not None:
            norm = param.grad.detach().norm(2)
            scale = max_norm / (norm + 1e-6)
            if scale < 1:
                param.grad.mul_(scale)


def _log_line(output_dir: Path, record: dict, name: str = "log.txt") -> None:
    with open(output_dir / name, "a") as fh:
        fh.write(json.dumps(record) + "\n")


def _base_state(cfg: dict, method: str, dist_info: DistInfo) -> dict:
    return {"method": method, "config": cfg, "args": cfg, "provenance": provenance(dist_info.world_size)}


def train(cfg: dict, output_dir: str | Path) -> Path:
    """Run (or resume) the pretraining described by the validated run config ``cfg``."""
    output_dir = Path(output_dir)
    check_resume_settings(output_dir / CHECKPOINT_NAME, cfg)  # before config.yaml is (over)written
    dist_info = init_distributed(cfg["train"]["device"])
    if cfg["train"]["keep_freed_host_memory"] and dist_info.device.type == "cpu":
        # before the first large tensor (the setting applies to later allocations); on GPUs the large
        # tensors live in CUDA's caching allocator, and host memory is left to glibc's defaults
        keep_freed_host_memory()
    if cfg["train"]["threads"]:
        # train.threads is the job's budget: torchrun's processes on this node share it
        torch.set_num_threads(max(1, cfg["train"]["threads"] // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    # Each rank draws its own augmentations and dropout (the official code seeds all ranks alike).
    seed_everything(cfg["seed"] + dist_info.rank)
    if dist_info.is_main:
        # what the scheduler gave us: the first thing to check when a cluster job misbehaves
        env = " ".join(f"{k}={os.environ[k]}" for k in ("SLURM_JOB_ID", "SLURM_NTASKS", "CUDA_VISIBLE_DEVICES")
                       if k in os.environ)
        print(f"launch: {dist_info.world_size} process(es), cuda devices visible: {torch.cuda.device_count()} "
              f"{env}".rstrip(), flush=True)
        output_dir.mkdir(parents=True, exist_ok=True)
        write_run_config(cfg, output_dir / "config.yaml")
        atomic_write_text(output_dir / "provenance.json", json.dumps(provenance(dist_info.world_size), indent=2))
    try:
        if cfg["method"] in UNTRAINED:
            state = _base_state(cfg, cfg["method"], dist_info)
            state.update(UNTRAINED[cfg["method"]](cfg))
            if dist_info.is_main:
                save_checkpoint(state, output_dir / CHECKPOINT_NAME)
        elif cfg["method"] == "supervised":  # the toy's ceiling: a labelled trainer outside the engine
            from cribo.train.supervised import train_supervised

            train_supervised(cfg, output_dir, dist_info)
        else:
            train_method(build_method(cfg, dist_info.device), cfg, output_dir, dist_info)
    finally:
        barrier()
        cleanup()
    return output_dir / CHECKPOINT_NAME


def autocast_factory(precision: str, device: torch.device):
    """``precision`` (fp32 | fp16 | bf16 | auto) -> (context-manager factory for the forwards, resolved name).

    ``auto`` is bf16 on a GPU that supports it, fp16 on other GPUs and fp32 on CPU.
    """
    if precision == "auto":
        if device.type != "cuda":
            precision = "fp32"
        else:
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise RuntimeError("optim.precision=bf16 but this GPU does not support bfloat16; use fp16 or auto")
    if precision == "fp32":
        return contextlib.nullcontext, precision
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return (lambda: torch.autocast(device.type, dtype=dtype)), precision


def rng_state(device: torch.device) -> dict:
    """Every RNG this process draws from (torch CPU and CUDA, numpy, Python), as checkpoint-safe types."""
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.empty(0, dtype=torch.uint8),
            "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)), "numpy_pos": int(np_state[2]),
            "numpy_has_gauss": int(np_state[3]), "numpy_gauss": float(np_state[4]),
            "python": list(random.getstate()[1])}


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state["cuda"].numel():
        torch.cuda.set_rng_state(state["cuda"], device)
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_has_gauss"], state["numpy_gauss"]))
    random.setstate((3, tuple(state["python"]), None))


class StopRequest:
    """Turns SIGTERM / SIGUSR1 (Slurm time limit, preemption, ``scancel``) into a checkpoint and exit.

    The handler only sets a flag; the loop checks it between steps, so the checkpoint is always of
    a whole step. In a multi-process run the flags are OR-reduced so that every rank stops at the
    same step (saving gathers every rank's RNG state).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.signum = 0
        self._previous = {}
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. embedded use): no handler
                pass

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def requested(self, device: torch.device) -> int:
        flag = torch.tensor([self.signum], device=device)
        if is_distributed():
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item())

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class MetricsLogger:
    """Rank 0's per-step metrics: JSON lines (``log_steps.jsonl``) and dvclive (``dvclive/``)."""

    def __init__(self, output_dir: Path, enabled: bool, resume: bool):
        self.output_dir, self.live = output_dir, None
        self.enabled = enabled
        if enabled:
            from dvclive import Live

            # dvcyaml=None: the project's dvc.yaml declares the plots; dvclive must not rewrite it
            self.live = Live(str(output_dir / "dvclive"), resume=resume, save_dvc_exp=False, dvcyaml=None,
                             report=None)

    def log_step(self, step: int, record: dict) -> None:
        if not self.enabled:
            return
        _log_line(self.output_dir, {"step": step, **record}, "log_steps.jsonl")
        self.live.step = step
        for key, value in record.items():
            if isinstance(value, (int, float)) and value == value and key not in ("epoch",):
                self.live.log_metric(f"train/{key}", value)
        self.live.next_step()

    def log_epoch(self, record: dict) -> None:
        if not self.enabled:
            return
        _log_line(self.output_dir, record)
        for key, value in record.items():
            if isinstance(value, (int, float)) and value == value and not isinstance(value, bool):
                self.live.summary[f"epoch/{key}"] = value
        self.live.make_summary()

    def close(self) -> None:
        if self.live is not None:
            self.live.end()


@torch.no_grad()
def update_teacher(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]], momentum: float) -> None:
    """EMA of the teacher: ``t <- m * t + (1 - m) * s`` for every ``(student s, teacher t)`` parameter pair.

    One fused pass per tensor (``torch._foreach_lerp_``, ``t + (1 - m) * (s - t)``) instead of a
    multiply pass and an add pass; the two orders of operations agree to float rounding.
    """
    pairs = list(pairs)
    if pairs:
        torch._foreach_lerp_([t for _, t in pairs], [s.detach() for s, _ in pairs], 1.0 - float(momentum))


def build_optimizer(cfg: dict, param_groups: list[dict], device: torch.device) -> torch.optim.Optimizer:
    """AdamW (DINO, CrIBo) or SGD with momentum (BYOL, ORL); lr and weight decay are set per step."""
    optim_cfg = cfg["optim"]
    if optim_cfg["optimizer"] == "sgd":
        return torch.optim.SGD(param_groups, lr=0.0, momentum=optim_cfg["sgd_momentum"])
    # the fused kernel where torch has one: one pass per tensor instead of several
    return torch.optim.AdamW(param_groups, fused=device.type in ("cpu", "cuda"))


def train_method(method: Method, cfg: dict, output_dir: Path, dist_info: DistInfo) -> None:
    """Any :class:`~cribo.method.base.Method`: online network, EMA target, schedules, exact resume,
    the method's own checkpoint layout."""
    device, optim_cfg = dist_info.device, cfg["optim"]

    # ============ data ============
    dataset = method.dataset(list_pretrain_images(cfg["data"]["root"], cfg["data"]["split"]))
    sampler = ResumableEpochSampler(len(dataset), optim_cfg["batch_size"], dist_info.rank, dist_info.world_size,
                                    seed=cfg["seed"])
    workers = cfg["train"]["num_workers"]
    # its own generator: creating an iterator would otherwise draw from the global RNG (whose
    # state the checkpoint restores), so a resumed run would drift from an uninterrupted one
    loader = DataLoader(dataset, batch_size=optim_cfg["batch_size"], sampler=sampler, drop_last=True,
                        num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                        generator=torch.Generator().manual_seed(cfg["seed"]))
    steps_per_epoch = sampler.steps_per_epoch
    epochs = optim_cfg["epochs"]

    # ============ student and teacher ============
    # the same initial weights on every rank (the teacher is copied before DDP would sync the
    # student), then the other ranks switch to their own streams for drop path; rank 0 simply
    # continues its stream, so a single-process run draws exactly what it always drew
    torch.manual_seed(cfg["seed"])
    student, teacher = method.build_networks()
    if dist_info.rank > 0:
        seed_everything(cfg["seed"] + dist_info.rank)
    student_ddp = student
    if dist_info.world_size > 1:
        if device.type == "cuda" and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in student.modules()):
            # batch statistics over the global batch, as ORL/BYOL's SyncBN (CUDA only in torch)
            student = method.student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
            teacher = method.teacher = nn.SyncBatchNorm.convert_sync_batchnorm(teacher)
        student_ddp = nn.parallel.DistributedDataParallel(
            student, device_ids=[dist_info.local_rank] if device.type == "cuda" else None)
    amp, precision = autocast_factory(optim_cfg["precision"], device)
    # fp16 needs loss scaling (the official setting); bf16 has fp32's range and does not
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    # ============ method state, optimizer and schedules (computed up front, indexed by global step) ============
    method.setup_training(epochs, steps_per_epoch, cfg["seed"])
    optimizer = build_optimizer(cfg, method.param_groups(), device)
    # Short runs skip the warm-up, as the official code does for epochs <= 2.
    warmup = min(optim_cfg["warmup_epochs"], epochs) if epochs > 2 else 0
    total_batch = optim_cfg["batch_size"] * dist_info.world_size
    peak_lr = optim_cfg["lr"] * total_batch / 256.0
    schedules = Schedules(
        lr=cosine_schedule(peak_lr, optim_cfg["min_lr"], epochs, steps_per_epoch, warmup_epochs=warmup,
                           start_warmup_value=peak_lr * optim_cfg["warmup_start_ratio"]),
        wd=cosine_schedule(optim_cfg["weight_decay"], optim_cfg["weight_decay_end"], epochs, steps_per_epoch),
        momentum=cosine_schedule(method.ema_momentum(), 1.0, epochs, steps_per_epoch))

    # ============ checkpoint: the method's layout + what exact resumption needs ============
    ckpt_path = output_dir / CHECKPOINT_NAME

    def save(epochs_done: int, step_in_epoch: int) -> None:
        rng_states = all_gather_objects(rng_state(device))  # collective: every rank calls save()
        if not dist_info.is_main:
            return
        state = _base_state(cfg, method.name, dist_info)
        state.update(method.checkpoint_state(), evaluated_network=method.evaluated_network)
        state.update(optimizer=optimizer.state_dict(), epoch=epochs_done, step_in_epoch=step_in_epoch,
                     global_step=epochs_done * steps_per_epoch + step_in_epoch,
                     world_size=dist_info.world_size, rng_states=rng_states, precision=precision,
                     num_images=len(dataset),
                     sampler={"seed": sampler.seed, "epoch": epochs_done, "start_batch": step_in_epoch})
        if scaler.is_enabled():
            state["fp16_scaler"] = scaler.state_dict()
        save_checkpoint(state, ckpt_path)

    start_epoch, start_step = 0, 0
    if ckpt_path.exists():
        start_epoch, start_step = resume(ckpt_path, method, optimizer, scaler, cfg, dist_info, steps_per_epoch)

    # ============ training ============
    show = dist_info.is_main and cfg["train"]["progress"]
    logger = MetricsLogger(output_dir, dist_info.is_main, resume=start_epoch > 0 or start_step > 0)
    stopper = StopRequest()
    every = cfg["train"]["checkpoint_every"]
    snapshot_every = cfg["train"]["saveckp_freq"]
    if dist_info.is_main:
        print(f"training {method.name} on {dist_info.world_size} process(es), device {device}, precision {precision}, "
              f"{steps_per_epoch} steps/epoch x {epochs} epochs, {total_batch} images per step", flush=True)
    # the host memory train() keeps for the next step: bound what its fragmentation may take
    kept = cfg["train"]["keep_freed_host_memory"] and device.type == "cpu"
    memory_guard = FragmentationGuard() if kept else None
    try:
        for epoch in range(start_epoch, epochs):
            sampler.set_epoch(epoch)
            if epoch == start_epoch and start_step:
                sampler.skip_batches(start_step)

            def after_step(step_in_epoch: int) -> None:
                if memory_guard is not None:
                    memory_guard.after_step()
                if every and step_in_epoch % every == 0 and step_in_epoch < steps_per_epoch:
                    save(epoch, step_in_epoch)
                _test_signal_hook(epoch * steps_per_epoch + step_in_epoch)
                signum = stopper.requested(device)
                if signum:
                    save(epoch, step_in_epoch)
                    if dist_info.is_main:
                        print(f"signal {signum}: checkpoint written at epoch {epoch}, step {step_in_epoch}; "
                              "rerun the same command to resume", flush=True)
                    raise SystemExit(128 + signum)

            stats = train_one_epoch(method, student_ddp, loader, optimizer, scaler, schedules, epoch, cfg, amp, show,
                                    logger, start_step if epoch == start_epoch else 0, after_step)
            if dist_info.world_size > 1:
                stats.update(check_replicas(method))
            save(epoch + 1, 0)
            if dist_info.is_main and snapshot_every and (epoch + 1) % snapshot_every == 0:
                # a copy of the file just written: the resume state as well as the weights
                copy_checkpoint(ckpt_path, output_dir / snapshot_name(epoch + 1))
            logger.log_epoch({"epoch": epoch, **stats})
    finally:
        stopper.restore()
        logger.close()


def _test_signal_hook(global_step: int) -> None:
    """For the resume tests: ``CRIBO_TEST_SIGNAL_AT_STEP=N`` sends this process ``CRIBO_TEST_SIGNAL``
    (KILL by default, or TERM) once ``N`` steps are done, so that a hard kill lands at a known step."""
    if os.environ.get("CRIBO_TEST_SIGNAL_AT_STEP") == str(global_step):
        os.kill(os.getpid(), getattr(signal, "SIG" + os.environ.get("CRIBO_TEST_SIGNAL", "KILL")))


def resume(ckpt_path: Path, method: Method, optimizer, scaler, cfg: dict, dist_info: DistInfo,
           steps_per_epoch: int) -> tuple[int, int]:
    """Load ``ckpt_path`` into the method, optimizer and scaler; returns ``(epoch, step_in_epoch)`` to start at.

    With the same number of processes the RNG states are restored (bit-exact continuation);
    otherwise the run reseeds and finishes on whole epochs.
    """
    ckpt = load_checkpoint(ckpt_path)
    if ckpt.get("method") != method.name:
        raise ValueError(f"{ckpt_path} is a {ckpt.get('method')!r} checkpoint, this run is {method.name!r}; "
                         "use another --output-dir or delete the checkpoint")
    method.load_checkpoint_state(ckpt)
    optimizer.load_state_dict(ckpt["optimizer"])
    if scaler.is_enabled() and "fp16_scaler" in ckpt:
        scaler.load_state_dict(ckpt["fp16_scaler"])
    start_epoch, start_step = int(ckpt["epoch"]), int(ckpt.get("step_in_epoch", 0))
    if dist_info.is_main:  # steps logged after this checkpoint are about to run again
        drop_logged_steps_from(ckpt_path.parent, start_epoch * steps_per_epoch + start_step, start_epoch)
    saved_world = int(ckpt.get("world_size", 1))
    if saved_world == dist_info.world_size and "rng_states" in ckpt:
        set_rng_state(ckpt["rng_states"][dist_info.rank], dist_info.device)
        exact = "exact"
    else:  # another world size: the data order and RNG streams cannot continue exactly
        seed_everything(cfg["seed"] + dist_info.rank + 7919 * (start_epoch * steps_per_epoch + start_step))
        exact = f"not bit-exact: saved by {saved_world} processes, resumed by {dist_info.world_size}"
        if start_step:
            start_epoch, start_step = start_epoch + 1, 0  # finish on a whole epoch
    if dist_info.is_main:
        print(f"resuming from {ckpt_path} at epoch {start_epoch}/{cfg['optim']['epochs']}, step "
              f"{start_step}/{steps_per_epoch} ({exact})", flush=True)
    return start_epoch, start_step


def check_replicas(method: Method) -> dict[str, list[float]]:
    """Checksums of the teacher (and the method's other replicated state) on every rank; raises if they differ.

    The teacher follows the (DDP-synchronised) student, a memory bank receives the same
    all-gathered objects everywhere: they must be replicas, and a difference would be silent otherwise.
    """
    with torch.no_grad():
        local = {"teacher_checksums": float(sum(p.double().sum().item() for p in method.teacher.parameters())),
                 **method.replica_checksums()}
    gathered = all_gather_objects(local)
    out = {key: [g[key] for g in gathered] for key in local}
    for key, values in out.items():
        if any(v != values[0] for v in values):
            raise RuntimeError(f"{key.split('_')[0]} differs across ranks ({values}); this is a bug, please report it")
    return out


@dataclass(frozen=True)
class Schedules:
    """Per-step values indexed by the global step: learning rate, weight decay, EMA momentum of the teacher."""

    lr: np.ndarray
    wd: np.ndarray
    momentum: np.ndarray


def train_one_epoch(method: Method, online: nn.Module, loader, optimizer, scaler, schedules: Schedules, epoch: int,
                    cfg: dict, amp, show_progress: bool, logger: MetricsLogger, start_step: int = 0,
                    after_step=None) -> dict:
    """One pass over ``loader`` (which starts at batch ``start_step``); returns the epoch's mean losses.

    ``method.step`` returns the losses (and logged extras); every ``train.log_every`` steps
    ``logger`` receives one record (losses and extras, lr, weight decay, teacher momentum,
    images/s); ``after_step(step_in_epoch)`` runs after each update.
    """
    steps = start_step + len(loader)
    clip = cfg["optim"]["clip_grad"]
    bar = tqdm(loader, total=len(loader), initial=0, desc=f"epoch {epoch + 1}/{cfg['optim']['epochs']}",
               disable=not show_progress, file=sys.stdout, mininterval=5)
    sums: dict[str, float] = {}
    start, seen, images = time.time(), 0, 0
    for i, batch in enumerate(bar, start=start_step):
        it = epoch * steps + i
        for j, group in enumerate(optimizer.param_groups):
            # plain floats: numpy scalars in the optimizer state would make the checkpoint unsafe to load
            group["lr"] = float(schedules.lr[it])
            if j == 0:  # only the first group is decayed (the weight matrices, or everything)
                group["weight_decay"] = float(schedules.wd[it])

        out = method.step(online, batch, epoch, amp)
        loss = out["loss"]
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"loss is {loss.item()} at epoch {epoch} step {i}; stopping")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if clip > 0:
            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
            clip_gradients(method.student, clip)
        method.before_optimizer_step(epoch)
        scaler.step(optimizer)
        scaler.update()

        update_teacher(method.ema_pairs(), schedules.momentum[it])  # after the optimizer step

        values = {k: (v.item() if torch.is_tensor(v) else v) for k, v in out.items()}
        for key, value in values.items():
            if value == value:  # NaN marks "not measured this step"
                sums[key] = sums.get(key, 0.0) + value
        seen += 1
        images += _batch_size(batch)
        rate = images / max(time.time() - start, 1e-9)
        if it % cfg["train"]["log_every"] == 0:
            logger.log_step(it, {"epoch": epoch, **values, "lr": float(schedules.lr[it]), "wd": float(schedules.wd[it]),
                                 "momentum": float(schedules.momentum[it]), "images_per_s": rate})
        if show_progress:
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{schedules.lr[it]:.2e}", img_s=f"{rate:.0f}",
                            refresh=False)
        if after_step is not None:
            after_step(i + 1)
    last = epoch * steps + steps - 1
    return {**{k: v / max(seen, 1) for k, v in sums.items()}, "lr": float(schedules.lr[last]),
            "wd": float(schedules.wd[last]), "momentum": float(schedules.momentum[last]),
            "epoch_seconds": time.time() - start, "images_per_s": images / max(time.time() - start, 1e-9),
            "first_step": start_step}


def _batch_size(batch) -> int:
    first = batch[0]
    while isinstance(first, (list, tuple)):
        first = first[0]
    return first.shape[0]
