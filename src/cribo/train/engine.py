"""The pretraining entry point: one function per method, the training loop readable top to bottom.

``train(cfg, output_dir)`` writes ``output_dir/checkpoint.pth`` (official CrIBo key layout plus
what exact resumption needs: every rank's RNG states, the position in the epoch, the resolved
config, git SHA, package versions, world size; written atomically at the end of every epoch, every
``train.checkpoint_every`` steps, and on SIGTERM/SIGUSR1), ``config.yaml`` (the resolved run
config), ``provenance.json``, ``log.txt`` (one JSON line per epoch, like the official code's),
``log_steps.jsonl`` and ``dvclive/`` (one record every ``train.log_every`` steps). An existing
``checkpoint.pth`` is resumed from its recorded step: with the same number of processes the
continuation is bit-identical to an uninterrupted run on CPU (data order and augmentations are
functions of (seed, epoch, index), see :mod:`cribo.train.sampling`).

Launch: a plain process, ``torchrun`` or ``srun`` (see :mod:`cribo.train.distributed`). Precision:
``optim.precision`` (fp32, fp16 with loss scaling, bf16, auto); clustering, retrieval and losses
always run in fp32.

Methods:
- ``cribo``: DINO plus object-level cross-view and cross-image bootstrapping
  (:mod:`cribo.method.cribo`);
- ``dino``: global [CLS] self-distillation (student, EMA teacher, centring and sharpening);
- ``random``: the untrained backbone of the run's seed;
- ``pixels``: no network, only the training-set mean colour used to centre raw RGB patches.
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
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from cribo.config import atomic_write_text, provenance, write_run_config
from cribo.data.images import UnlabeledImages, list_pretrain_images
from cribo.data.segmentation import IMAGENET_MEAN, IMAGENET_STD
from cribo.method.cribo import ClusteringSettings, ObjectNet, cribo_step
from cribo.method.dino import DINOLoss
from cribo.method.losses import CrIBoLoss, LossWeights
from cribo.method.memory_bank import ObjectMemoryBank
from cribo.method.schedules import cosine_schedule, linear_warmup_then_constant
from cribo.method.views import CrIBoViews, DINOViews, eval_transform
from cribo.models.backbones import build_vit
from cribo.models.heads import DINOHead, cancel_last_layer_gradients
from cribo.train.checkpoint import load_checkpoint, save_checkpoint
from cribo.train.distributed import (DistInfo, all_gather_objects, all_gather_variable, barrier, cleanup,
                                     init_distributed, is_distributed)
from cribo.train.official_format import (bank_from_official, bank_to_official, loss_from_official,
                                         loss_to_official, model_from_official, model_to_official)
from cribo.train.sampling import ResumableEpochSampler

CHECKPOINT_NAME = "checkpoint.pth"


class MultiCropWrapper(nn.Module):
    """Backbone + head over a list of crops: crops of equal size go through the backbone together.

    ``forward(list of V tensors B x 3 x S_v x S_v) -> (V*B) x K`` head outputs, crop-major.
    """

    def __init__(self, backbone: nn.Module, head: DINOHead):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, crops: list[torch.Tensor]) -> torch.Tensor:
        sizes = torch.tensor([c.shape[-1] for c in crops])
        # Boundaries between runs of equal-sized crops (globals first, then locals).
        ends = torch.cumsum(torch.unique_consecutive(sizes, return_counts=True)[1], 0).tolist()
        start, cls_tokens = 0, []
        for end in ends:
            cls_tokens.append(self.backbone(torch.cat(crops[start:end])))
            start = end
        return self.head(torch.cat(cls_tokens))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def param_groups(model: nn.Module) -> list[dict]:
    """Weight decay on weight matrices only; biases and norm parameters are not decayed."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if name.endswith(".bias") or param.ndim == 1 else decay).append(param)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, device: torch.device) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`; the fused kernel where torch has one (one pass per tensor, not several)."""
    return torch.optim.AdamW(param_groups(model), fused=device.type in ("cpu", "cuda"))


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
    dist_info = init_distributed(cfg["train"]["device"])
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
        trainer = {"dino": train_self_distillation, "cribo": train_self_distillation,
                   "random": save_random, "pixels": fit_pixel_mean}[cfg["method"]]
        trainer(cfg, output_dir, dist_info)
    finally:
        barrier()
        cleanup()
    return output_dir / CHECKPOINT_NAME


def save_random(cfg: dict, output_dir: Path, dist_info: DistInfo) -> None:
    """The untrained backbone: the floor every learned method must beat."""
    torch.manual_seed(cfg["seed"])
    backbone = build_vit(cfg["model"], drop_path_rate=0.0)
    state = _base_state(cfg, "random", dist_info)
    state.update(teacher={f"backbone.{k}": v for k, v in backbone.state_dict().items()}, epoch=0)
    if dist_info.is_main:
        save_checkpoint(state, output_dir / CHECKPOINT_NAME)


@torch.no_grad()
def fit_pixel_mean(cfg: dict, output_dir: Path, dist_info: DistInfo) -> None:
    """Mean normalised colour of the pretraining images, to centre the raw-pixel features."""
    paths = list_pretrain_images(cfg["data"]["root"], cfg["data"]["split"])
    dataset = UnlabeledImages(paths, eval_transform(cfg["model"]["img_size"], IMAGENET_MEAN, IMAGENET_STD))
    loader = DataLoader(dataset, batch_size=64, num_workers=cfg["train"]["num_workers"])
    total, count = torch.zeros(3, dtype=torch.float64), 0
    for images in tqdm(loader, desc="pixel mean", disable=not cfg["train"]["progress"], file=sys.stdout):
        total += images.double().sum(dim=(0, 2, 3))
        count += images.shape[0] * images.shape[2] * images.shape[3]
    state = _base_state(cfg, "pixels", dist_info)
    state.update(teacher={"pixel_mean": (total / count).float()}, epoch=0)
    if dist_info.is_main:
        save_checkpoint(state, output_dir / CHECKPOINT_NAME)


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


def train_self_distillation(cfg: dict, output_dir: Path, dist_info: DistInfo) -> None:
    """DINO or CrIBo: student, EMA teacher, schedules, exact resume, official-layout checkpoints."""
    method = cfg["method"]
    device, model_cfg, dino_cfg, optim_cfg = dist_info.device, cfg["model"], cfg["dino"], cfg["optim"]
    cribo_cfg = cfg["cribo"]

    # ============ data ============
    if method == "dino":
        views = DINOViews(global_size=model_cfg["img_size"], local_size=dino_cfg["local_crop_size"],
                          num_local_crops=dino_cfg["local_crops_number"],
                          global_scale=tuple(dino_cfg["global_crops_scale"]),
                          local_scale=tuple(dino_cfg["local_crops_scale"]))
    else:  # CrIBo: two global views with their original-image position maps, no local crops
        views = CrIBoViews(model_cfg["img_size"], tuple(dino_cfg["global_crops_scale"]))
    dataset = UnlabeledImages(list_pretrain_images(cfg["data"]["root"], cfg["data"]["split"]), views)
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
    object_dim = cribo_cfg["object_out_dim"] if method == "cribo" else None

    def make(drop_path: float) -> nn.Module:
        backbone = build_vit(model_cfg, drop_path_rate=drop_path)
        head = DINOHead(backbone.embed_dim, dino_cfg["out_dim"], hidden_dim=dino_cfg["hidden_dim"],
                        bottleneck_dim=dino_cfg["bottleneck_dim"], norm_last_layer=dino_cfg["norm_last_layer"],
                        object_out_dim=object_dim)
        return (MultiCropWrapper if method == "dino" else ObjectNet)(backbone, head).to(device)

    # the same initial weights on every rank (the teacher is copied before DDP would sync the
    # student), then the other ranks switch to their own streams for drop path; rank 0 simply
    # continues its stream, so a single-process run draws exactly what it always drew
    torch.manual_seed(cfg["seed"])
    student = make(model_cfg["drop_path_rate"])
    teacher = make(0.0)
    if dist_info.rank > 0:
        seed_everything(cfg["seed"] + dist_info.rank)
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad = False
    student_ddp = student
    if dist_info.world_size > 1:
        student_ddp = nn.parallel.DistributedDataParallel(
            student, device_ids=[dist_info.local_rank] if device.type == "cuda" else None)
    amp, precision = autocast_factory(optim_cfg["precision"], device)
    # fp16 needs loss scaling (the official setting); bf16 has fp32's range and does not
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    # ============ loss, optimizer and schedules (computed up front, indexed by global step) ============
    # Short runs skip the warm-ups, as the official code does for epochs <= 2.
    warmup = min(optim_cfg["warmup_epochs"], epochs) if epochs > 2 else 0
    temp_warmup = min(dino_cfg["warmup_teacher_temp_epochs"], epochs) if epochs > 2 else 0
    teacher_temps = linear_warmup_then_constant(dino_cfg["warmup_teacher_temp"], dino_cfg["teacher_temp"],
                                                temp_warmup, epochs)
    bank = None
    if method == "dino":
        loss_fn = DINOLoss(dino_cfg["out_dim"], teacher_temps, student_temp=dino_cfg["student_temp"],
                           center_momentum=dino_cfg["center_momentum"]).to(device)
    else:
        weights = cribo_cfg["loss_weights"]
        loss_fn = CrIBoLoss(dino_cfg["out_dim"], object_dim, teacher_temps, student_temp=dino_cfg["student_temp"],
                            center_momentum=dino_cfg["center_momentum"],
                            weights=LossWeights(weights["global"], weights["cross_view"], weights["cross_image"]),
                            cross_image_norm=cribo_cfg["cross_image_norm"],
                            cross_image_start_epoch=cribo_cfg["cross_image_start_epoch"]).to(device)
        if cribo_cfg["memory_bank"]:
            # the same initial contents on every rank (ranks have different seeds, the banks must not)
            bank = ObjectMemoryBank(cribo_cfg["queue_size"], cribo_cfg["num_clusters"], student.backbone.embed_dim,
                                    device=device, generator=torch.Generator().manual_seed(cfg["seed"]))
    optimizer = build_optimizer(student, device)
    total_batch = optim_cfg["batch_size"] * dist_info.world_size
    lr_schedule = cosine_schedule(optim_cfg["lr"] * total_batch / 256.0, optim_cfg["min_lr"], epochs,
                                  steps_per_epoch, warmup_epochs=warmup)
    wd_schedule = cosine_schedule(optim_cfg["weight_decay"], optim_cfg["weight_decay_end"], epochs, steps_per_epoch)
    momentum_schedule = cosine_schedule(dino_cfg["momentum_teacher"], 1.0, epochs, steps_per_epoch)

    # ============ the method's step: batch -> dict of losses (key "loss" is optimised) ============
    if method == "dino":
        def step(batch, epoch):
            crops = [c.to(device, non_blocking=True) for c in batch]
            with torch.no_grad(), amp():  # only the two global views pass through the teacher
                teacher_out = teacher(crops[:2]).float().chunk(2)
            with amp():
                student_out = student_ddp(crops).float().chunk(len(crops))
            return {"loss": loss_fn(list(student_out), list(teacher_out), epoch)}
    else:
        settings = ClusteringSettings(cribo_cfg["num_clusters"], cribo_cfg["pos_alpha"], cribo_cfg["sinkhorn_lambda"],
                                      cribo_cfg["sinkhorn_iterations"], cribo_cfg["clustering_rounds"],
                                      cribo_cfg["hard_assignment"], cribo_cfg["update_marginal"],
                                      cribo_cfg["cycle_check"], cribo_cfg["top_k"])

        def step(batch, epoch):
            views_, positions = batch
            views_ = [v.to(device, non_blocking=True) for v in views_]
            positions = [p.to(device, non_blocking=True) for p in positions]
            return cribo_step(student_ddp, teacher, loss_fn, bank, views_, positions, epoch, settings,
                              gather=all_gather_variable, amp=amp)

    # ============ checkpoint: official layout + what exact resumption needs ============
    ckpt_path = output_dir / CHECKPOINT_NAME

    def save(epochs_done: int, step_in_epoch: int) -> None:
        rng_states = all_gather_objects(rng_state(device))  # collective: every rank calls save()
        if not dist_info.is_main:
            return
        state = _base_state(cfg, method, dist_info)
        state.update(student=model_to_official(student.state_dict(), ddp_prefix=True),
                     teacher=model_to_official(teacher.state_dict(), ddp_prefix=False),
                     optimizer=optimizer.state_dict(), dino_loss=loss_to_official(loss_fn.state_dict()),
                     epoch=epochs_done, step_in_epoch=step_in_epoch,
                     global_step=epochs_done * steps_per_epoch + step_in_epoch,
                     world_size=dist_info.world_size, rng_states=rng_states, precision=precision,
                     sampler={"seed": sampler.seed, "epoch": epochs_done, "start_batch": step_in_epoch})
        if bank is not None:
            state.update(bank_to_official(bank))
        if scaler.is_enabled():
            state["fp16_scaler"] = scaler.state_dict()
        save_checkpoint(state, ckpt_path)

    # ============ resume ============
    start_epoch, start_step = 0, 0
    if ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path)
        if ckpt.get("method") != method:
            raise ValueError(f"{ckpt_path} is a {ckpt.get('method')!r} checkpoint, this run is {method!r}; "
                             "use another --output-dir or delete the checkpoint")
        student.load_state_dict(model_from_official(ckpt["student"]))
        teacher.load_state_dict(model_from_official(ckpt["teacher"]))
        optimizer.load_state_dict(ckpt["optimizer"])
        loss_fn.load_state_dict(loss_from_official(ckpt["dino_loss"], method))
        if bank is not None:
            bank_from_official(bank, ckpt["centroids_queue_cpu"], ckpt["cpv_queue_cpu"])
        if scaler.is_enabled() and "fp16_scaler" in ckpt:
            scaler.load_state_dict(ckpt["fp16_scaler"])
        start_epoch, start_step = int(ckpt["epoch"]), int(ckpt.get("step_in_epoch", 0))
        saved_world = int(ckpt.get("world_size", 1))
        if saved_world == dist_info.world_size and "rng_states" in ckpt:
            set_rng_state(ckpt["rng_states"][dist_info.rank], device)
            exact = "exact"
        else:  # another world size: the data order and RNG streams cannot continue exactly
            seed_everything(cfg["seed"] + dist_info.rank + 7919 * (start_epoch * steps_per_epoch + start_step))
            exact = f"not bit-exact: saved by {saved_world} processes, resumed by {dist_info.world_size}"
            if start_step:
                start_epoch, start_step = start_epoch + 1, 0  # finish on a whole epoch
        if dist_info.is_main:
            print(f"resuming from {ckpt_path} at epoch {start_epoch}/{epochs}, step {start_step}/{steps_per_epoch} "
                  f"({exact})", flush=True)
        del ckpt

    # ============ training ============
    show = dist_info.is_main and cfg["train"]["progress"]
    logger = MetricsLogger(output_dir, dist_info.is_main, resume=start_epoch > 0 or start_step > 0)
    stopper = StopRequest()
    every = cfg["train"]["checkpoint_every"]
    if dist_info.is_main:
        print(f"training {method} on {dist_info.world_size} process(es), device {device}, precision {precision}, "
              f"{steps_per_epoch} steps/epoch x {epochs} epochs, {total_batch} images per step", flush=True)
    try:
        for epoch in range(start_epoch, epochs):
            sampler.set_epoch(epoch)
            if epoch == start_epoch and start_step:
                sampler.skip_batches(start_step)

            def after_step(step_in_epoch: int) -> None:
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

            stats = train_one_epoch(step, student, teacher, loader, optimizer, scaler, lr_schedule, wd_schedule,
                                    momentum_schedule, epoch, cfg, show, logger, start_step if epoch == start_epoch else 0,
                                    after_step)
            if dist_info.world_size > 1:
                stats.update(check_replicas(teacher, bank))
            save(epoch + 1, 0)
            logger.log_epoch({"epoch": epoch, **stats})
    finally:
        stopper.restore()
        logger.close()


def _test_signal_hook(global_step: int) -> None:
    """For the resume tests: ``CRIBO_TEST_SIGNAL_AT_STEP=N`` sends this process ``CRIBO_TEST_SIGNAL``
    (KILL by default, or TERM) once ``N`` steps are done, so that a hard kill lands at a known step."""
    if os.environ.get("CRIBO_TEST_SIGNAL_AT_STEP") == str(global_step):
        os.kill(os.getpid(), getattr(signal, "SIG" + os.environ.get("CRIBO_TEST_SIGNAL", "KILL")))


def check_replicas(teacher: nn.Module, bank: ObjectMemoryBank | None) -> dict[str, list[float]]:
    """Checksums of the teacher and the memory bank on every rank; raises if they differ.

    Both must be replicas: the teacher follows the (DDP-synchronised) student, the bank receives
    the same all-gathered objects everywhere. A difference would be silent otherwise.
    """
    with torch.no_grad():
        local = {"teacher_checksums": float(sum(p.double().sum().item() for p in teacher.parameters()))}
        if bank is not None:
            local["bank_checksums"] = float(bank.entries.double().sum().item()) + float(bank.counts.sum()) + bank.head
    gathered = all_gather_objects(local)
    out = {key: [g[key] for g in gathered] for key in local}
    for key, values in out.items():
        if any(v != values[0] for v in values):
            raise RuntimeError(f"{key.split('_')[0]} differs across ranks ({values}); this is a bug, please report it")
    return out


def train_one_epoch(step, student, teacher, loader, optimizer, scaler, lr_schedule, wd_schedule, momentum_schedule,
                    epoch, cfg, show_progress, logger: MetricsLogger, start_step: int = 0, after_step=None) -> dict:
    """One pass over ``loader`` (which starts at batch ``start_step``); returns the epoch's mean losses.

    ``step(batch, epoch)`` returns the losses (and logged extras); every ``train.log_every`` steps
    ``logger`` receives one record (losses, objects per image, cycle-consistent fraction, lr,
    weight decay, teacher momentum, images/s); ``after_step(step_in_epoch)`` runs after each update.
    """
    steps = start_step + len(loader)
    freeze_epochs, clip = cfg["dino"]["freeze_last_layer"], cfg["optim"]["clip_grad"]
    bar = tqdm(loader, total=len(loader), initial=0, desc=f"epoch {epoch + 1}/{cfg['optim']['epochs']}",
               disable=not show_progress, file=sys.stdout, mininterval=5)
    sums: dict[str, float] = {}
    start, seen, images = time.time(), 0, 0
    for i, batch in enumerate(bar, start=start_step):
        it = epoch * steps + i
        for j, group in enumerate(optimizer.param_groups):
            # plain floats: numpy scalars in the optimizer state would make the checkpoint unsafe to load
            group["lr"] = float(lr_schedule[it])
            if j == 0:  # only the weight matrices are decayed
                group["weight_decay"] = float(wd_schedule[it])

        out = step(batch, epoch)
        loss = out["loss"]
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"loss is {loss.item()} at epoch {epoch} step {i}; stopping")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if clip > 0:
            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
            clip_gradients(student, clip)
        cancel_last_layer_gradients(student, epoch, freeze_epochs)
        scaler.step(optimizer)
        scaler.update()

        with torch.no_grad():  # EMA teacher
            m = momentum_schedule[it]
            for p_s, p_t in zip(student.parameters(), teacher.parameters()):
                p_t.mul_(m).add_(p_s.detach(), alpha=1 - m)

        values = {k: (v.item() if torch.is_tensor(v) else v) for k, v in out.items()}
        for key, value in values.items():
            if value == value:  # NaN marks "not measured this step"
                sums[key] = sums.get(key, 0.0) + value
        seen += 1
        images += _batch_size(batch)
        rate = images / max(time.time() - start, 1e-9)
        if it % cfg["train"]["log_every"] == 0:
            logger.log_step(it, {"epoch": epoch, **values, "lr": float(lr_schedule[it]), "wd": float(wd_schedule[it]),
                                 "momentum": float(momentum_schedule[it]), "images_per_s": rate})
        if show_progress:
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr_schedule[it]:.2e}", img_s=f"{rate:.0f}", refresh=False)
        if after_step is not None:
            after_step(i + 1)
    last = epoch * steps + steps - 1
    return {**{k: v / max(seen, 1) for k, v in sums.items()}, "lr": float(lr_schedule[last]),
            "wd": float(wd_schedule[last]), "momentum": float(momentum_schedule[last]),
            "epoch_seconds": time.time() - start, "images_per_s": images / max(time.time() - start, 1e-9),
            "first_step": start_step}


def _batch_size(batch) -> int:
    first = batch[0]
    while isinstance(first, (list, tuple)):
        first = first[0]
    return first.shape[0]
