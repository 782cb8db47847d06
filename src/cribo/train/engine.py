"""The pretraining entry point: one function per method, the training loop readable top to bottom.

``train(cfg, output_dir)`` writes ``output_dir/checkpoint.pth`` (the last completed epoch, written
atomically), ``config.yaml`` (the resolved run config), ``provenance.json`` (git SHA, package
versions, world size), ``log.txt`` (one JSON line per epoch, like the official code's) and
``log_steps.jsonl`` (one line every ``train.log_every`` steps). An existing ``checkpoint.pth`` is
resumed from its recorded epoch.

Methods:
- ``cribo``: DINO plus object-level cross-view and cross-image bootstrapping
  (:mod:`cribo.method.cribo`);
- ``dino``: global [CLS] self-distillation (student, EMA teacher, centring and sharpening);
- ``random``: the untrained backbone of the run's seed;
- ``pixels``: no network, only the training-set mean colour used to centre raw RGB patches.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler
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
from cribo.train.distributed import DistInfo, all_gather_variable, barrier, cleanup, init_distributed

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
    import random

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


def clip_gradients(model: nn.Module, max_norm: float) -> None:
    """Per-parameter norm clipping, as DINO and CrIBo do (not one global norm)."""
    for param in model.parameters():
        if param.grad is not None:
            norm = param.grad.detach().norm(2)
            scale = max_norm / (norm + 1e-6)
            if scale < 1:
                param.grad.mul_(scale)


def _loader(dataset, cfg: dict, dist_info: DistInfo, shuffle_seed: int) -> DataLoader:
    batch = cfg["optim"]["batch_size"]
    if len(dataset) < batch * dist_info.world_size:
        raise ValueError(f"the pretraining set has {len(dataset)} images, fewer than one global batch "
                         f"({batch} x {dist_info.world_size} processes); lower optim.batch_size")
    if dist_info.world_size > 1:
        sampler = DistributedSampler(dataset, shuffle=True, seed=shuffle_seed, drop_last=True)
    else:
        sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(shuffle_seed))
    return DataLoader(dataset, batch_size=batch, sampler=sampler, drop_last=True,
                      num_workers=cfg["train"]["num_workers"], pin_memory=dist_info.device.type == "cuda",
                      persistent_workers=cfg["train"]["num_workers"] > 0)


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
        torch.set_num_threads(cfg["train"]["threads"])
    # Each rank draws its own augmentations and dropout (the official code seeds all ranks alike).
    seed_everything(cfg["seed"] + dist_info.rank)
    if dist_info.is_main:
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


def train_self_distillation(cfg: dict, output_dir: Path, dist_info: DistInfo) -> None:
    """DINO or CrIBo: student, EMA teacher, schedules, resume, one checkpoint per epoch."""
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
    loader = _loader(dataset, cfg, dist_info, shuffle_seed=cfg["seed"])
    steps_per_epoch = len(loader)
    epochs = optim_cfg["epochs"]

    # ============ student and teacher ============
    object_dim = cribo_cfg["object_out_dim"] if method == "cribo" else None

    def make(drop_path: float) -> nn.Module:
        backbone = build_vit(model_cfg, drop_path_rate=drop_path)
        head = DINOHead(backbone.embed_dim, dino_cfg["out_dim"], hidden_dim=dino_cfg["hidden_dim"],
                        bottleneck_dim=dino_cfg["bottleneck_dim"], norm_last_layer=dino_cfg["norm_last_layer"],
                        object_out_dim=object_dim)
        return (MultiCropWrapper if method == "dino" else ObjectNet)(backbone, head).to(device)

    student = make(model_cfg["drop_path_rate"])
    teacher = make(0.0)
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad = False
    student_ddp = student
    if dist_info.world_size > 1:
        student_ddp = nn.parallel.DistributedDataParallel(
            student, device_ids=[dist_info.local_rank] if device.type == "cuda" else None)

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
    optimizer = torch.optim.AdamW(param_groups(student))
    total_batch = optim_cfg["batch_size"] * dist_info.world_size
    lr_schedule = cosine_schedule(optim_cfg["lr"] * total_batch / 256.0, optim_cfg["min_lr"], epochs,
                                  steps_per_epoch, warmup_epochs=warmup)
    wd_schedule = cosine_schedule(optim_cfg["weight_decay"], optim_cfg["weight_decay_end"], epochs, steps_per_epoch)
    momentum_schedule = cosine_schedule(dino_cfg["momentum_teacher"], 1.0, epochs, steps_per_epoch)

    # ============ the method's step: batch -> dict of losses (key "loss" is optimised) ============
    if method == "dino":
        def step(batch, epoch):
            crops = [c.to(device, non_blocking=True) for c in batch]
            with torch.no_grad():  # only the two global views pass through the teacher
                teacher_out = teacher(crops[:2]).chunk(2)
            student_out = student_ddp(crops).chunk(len(crops))
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
                              gather=all_gather_variable)

    # ============ resume ============
    start_epoch = 0
    ckpt_path = output_dir / CHECKPOINT_NAME
    if ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path)
        student.load_state_dict(ckpt["student"])
        teacher.load_state_dict(ckpt["teacher"])
        optimizer.load_state_dict(ckpt["optimizer"])
        loss_fn.load_state_dict(ckpt["dino_loss"])
        if bank is not None:
            bank.load_state_dict(ckpt["memory_bank"])
        start_epoch = int(ckpt["epoch"])
        if dist_info.is_main:
            print(f"resuming from {ckpt_path} at epoch {start_epoch}/{epochs}", flush=True)

    # ============ training ============
    show = dist_info.is_main and cfg["train"]["progress"]
    for epoch in range(start_epoch, epochs):
        if isinstance(loader.sampler, DistributedSampler):
            loader.sampler.set_epoch(epoch)
        else:
            loader.sampler.generator.manual_seed(cfg["seed"] * 10_000 + epoch)
        log_step = (lambda record: _log_line(output_dir, record, "log_steps.jsonl")) if dist_info.is_main else None
        stats = train_one_epoch(step, student, teacher, loader, optimizer, lr_schedule, wd_schedule,
                                momentum_schedule, epoch, cfg, show, log_step)
        if dist_info.is_main:
            state = _base_state(cfg, method, dist_info)
            state.update(student=student.state_dict(), teacher=teacher.state_dict(),
                         optimizer=optimizer.state_dict(), dino_loss=loss_fn.state_dict(), epoch=epoch + 1)
            if bank is not None:
                state["memory_bank"] = bank.state_dict()
            save_checkpoint(state, ckpt_path)
            _log_line(output_dir, {"epoch": epoch, **stats})


def train_one_epoch(step, student, teacher, loader, optimizer, lr_schedule, wd_schedule, momentum_schedule,
                    epoch, cfg, show_progress, log_step=None) -> dict:
    """One pass over ``loader``; ``step(batch, epoch)`` returns the losses (and logged extras).

    Every ``train.log_every`` steps, ``log_step`` receives one record (losses, objects per image,
    cycle-consistent fraction, lr, weight decay, teacher momentum); returns the epoch's means.
    """
    steps = len(loader)
    freeze_epochs, clip = cfg["dino"]["freeze_last_layer"], cfg["optim"]["clip_grad"]
    bar = tqdm(loader, total=steps, desc=f"epoch {epoch + 1}/{cfg['optim']['epochs']}",
               disable=not show_progress, file=sys.stdout, mininterval=5)
    sums: dict[str, float] = {}
    start, seen = time.time(), 0
    for i, batch in enumerate(bar):
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
        loss.backward()
        if clip > 0:
            clip_gradients(student, clip)
        cancel_last_layer_gradients(student, epoch, freeze_epochs)
        optimizer.step()

        with torch.no_grad():  # EMA teacher
            m = momentum_schedule[it]
            for p_s, p_t in zip(student.parameters(), teacher.parameters()):
                p_t.mul_(m).add_(p_s.detach(), alpha=1 - m)

        values = {k: (v.item() if torch.is_tensor(v) else v) for k, v in out.items()}
        for key, value in values.items():
            if value == value:  # NaN marks "not measured this step"
                sums[key] = sums.get(key, 0.0) + value
        seen += 1
        if log_step is not None and it % cfg["train"]["log_every"] == 0:
            log_step({"step": it, "epoch": epoch, **values, "lr": float(lr_schedule[it]),
                      "wd": float(wd_schedule[it]), "momentum": float(momentum_schedule[it])})
        if show_progress:
            images = (i + 1) * _batch_size(batch)
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr_schedule[it]:.2e}",
                            img_s=f"{images / (time.time() - start):.0f}", refresh=False)
    last = epoch * steps + steps - 1
    return {**{k: v / seen for k, v in sums.items()}, "lr": float(lr_schedule[last]), "wd": float(wd_schedule[last]),
            "momentum": float(momentum_schedule[last]), "epoch_seconds": time.time() - start}


def _batch_size(batch) -> int:
    first = batch[0]
    while isinstance(first, (list, tuple)):
        first = first[0]
    return first.shape[0]
