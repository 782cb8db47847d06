"""``method: supervised``: the ceiling beside the floors, the same backbone trained on the labels.

The toy tables need a reference above the learned methods as much as the ``random`` and
``pixels`` floors below them: without it a reader cannot tell whether 40 % mIoU is most of what
the data allows or a small part. This run trains the run's ViT with a 1 x 1 convolution on its
last-layer patch tokens against the training split's segmentation masks (pixel cross-entropy,
ignore label left out), for the same epochs, batch size and learning-rate schedule as the
self-supervised runs, so that it gets the same budget. Only the backbone is kept: every protocol
then treats it like any other checkpoint (the decoder is thrown away, as a pretraining head is).

Views: a paired random resized crop (the global-crop scale of the run) and flip of image and mask,
then the same colour jitter and grayscale as the self-supervised views, so that the ceiling sees
no cleaner images than the methods it bounds. Runs in one process (a reference, not a method to
scale); the checkpoint is written atomically at the end of every epoch and a rerun resumes from
the last whole epoch.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from cribo.config import provenance
from cribo.data.registry import get_spec
from cribo.data.segmentation import segmentation_dataset
from cribo.eval.linear import LinearHead, PairedCropFlip
from cribo.method.schedules import cosine_schedule
from cribo.method.views import colour_transforms
from cribo.models.backbones import build_vit
from cribo.train.checkpoint import load_checkpoint, save_checkpoint

CHECKPOINT_NAME = "checkpoint.pth"


class LabelledViews:
    """``(PIL image, H x W mask) -> (3 x S x S float, S x S long)``: paired crop and flip, then colour."""

    def __init__(self, size: int, scale: tuple[float, float], jitter: tuple[float, float, float, float]):
        self.crop = PairedCropFlip(size, scale=scale)
        self.colour = colour_transforms(jitter)

    def __call__(self, image, mask):
        x, m = self.crop(image, mask)  # normalised float
        mean, std = self.crop.mean, self.crop.std
        # colour transforms act on [0, 1] images: undo the normalisation around them
        x = self.colour((x * std + mean).clamp(0, 1))
        return (x - mean) / std, m.long()


def train_supervised(cfg: dict, output_dir: Path, dist_info) -> None:
    """Backbone + linear patch classifier on the training masks; writes ``checkpoint.pth``."""
    if dist_info.world_size > 1:
        raise ValueError("method supervised runs in one process (it is the toy's reference, not a method "
                         "to scale); launch it without --nproc-per-node / srun tasks")
    device, model_cfg, optim_cfg = dist_info.device, cfg["model"], cfg["optim"]
    data_cfg = cfg["data"]
    spec = get_spec(data_cfg["dataset"], data_cfg["root"])
    views = LabelledViews(model_cfg["img_size"], tuple(cfg["dino"]["global_crops_scale"]),
                          tuple(cfg["dino"]["color_jitter"]))
    dataset = segmentation_dataset(spec, data_cfg["root"], data_cfg["split"] or spec.train_split, views)
    generator = torch.Generator().manual_seed(cfg["seed"])
    loader = DataLoader(dataset, batch_size=optim_cfg["batch_size"], shuffle=True, drop_last=True,
                        num_workers=cfg["train"]["num_workers"], generator=generator,
                        persistent_workers=cfg["train"]["num_workers"] > 0)
    if len(loader) == 0:
        raise ValueError(f"optim.batch_size {optim_cfg['batch_size']} is larger than the {len(dataset)} "
                         f"training images of {data_cfg['root']}; lower it")
    epochs, steps = optim_cfg["epochs"], len(loader)

    torch.manual_seed(cfg["seed"])
    backbone = build_vit(model_cfg).to(device)
    head = LinearHead(backbone.embed_dim, spec.num_classes).to(device)
    model = nn.ModuleDict({"backbone": backbone, "head": head})
    optimizer = torch.optim.AdamW(model.parameters(), weight_decay=optim_cfg["weight_decay"])
    warmup = min(optim_cfg["warmup_epochs"], epochs) if epochs > 2 else 0
    lr_schedule = cosine_schedule(optim_cfg["lr"] * optim_cfg["batch_size"] / 256.0, optim_cfg["min_lr"], epochs,
                                  steps, warmup_epochs=warmup)

    ckpt_path = output_dir / CHECKPOINT_NAME
    start_epoch = 0
    if ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path)
        if ckpt.get("method") != "supervised":
            raise ValueError(f"{ckpt_path} is a {ckpt.get('method')!r} checkpoint, this run is 'supervised'; "
                             "use another --output-dir or delete the checkpoint")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng_state"])
        generator.set_state(ckpt["loader_rng_state"])
        start_epoch = int(ckpt["epoch"])
        print(f"resuming supervised training at epoch {start_epoch}/{epochs}", flush=True)

    log = (output_dir / "log.txt").open("a")
    try:
        for epoch in range(start_epoch, epochs):
            model.train()
            started, total, seen = time.time(), 0.0, 0
            bar = tqdm(loader, desc=f"epoch {epoch + 1}/{epochs}", disable=not (dist_info.is_main and
                       cfg["train"]["progress"]), file=sys.stdout, mininterval=5)
            for i, (images, masks) in enumerate(bar):
                for group in optimizer.param_groups:
                    group["lr"] = float(lr_schedule[epoch * steps + i])
                images, masks = images.to(device), masks.to(device)
                tokens = backbone.forward_features(images)[:, backbone.num_prefix_tokens:]
                h = w = images.shape[-1] // model_cfg["patch_size"]
                logits = head(tokens.reshape(len(images), h, w, -1), images.shape[-1])
                loss = F.cross_entropy(logits, masks, ignore_index=spec.ignore_index)
                if not math.isfinite(loss.item()):
                    raise FloatingPointError(f"supervised loss is {loss.item()} at epoch {epoch} step {i}")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if optim_cfg["clip_grad"] > 0:
                    nn.utils.clip_grad_norm_(model.parameters(), optim_cfg["clip_grad"])
                optimizer.step()
                total, seen = total + loss.item(), seen + 1
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
            state = {"method": "supervised", "config": cfg, "args": cfg, "provenance": provenance(1), "epoch": epoch + 1, "model": model.state_dict(),
                     "teacher": {f"backbone.{k}": v for k, v in backbone.state_dict().items()},
                     "optimizer": optimizer.state_dict(), "rng_state": torch.get_rng_state(),
                     "loader_rng_state": generator.get_state(), "world_size": 1}
            save_checkpoint(state, ckpt_path)
            record = {"epoch": epoch, "loss": total / max(seen, 1), "lr": float(lr_schedule[epoch * steps + steps - 1]),
                      "epoch_seconds": round(time.time() - started, 2)}
            log.write(json.dumps(record) + "\n")
            log.flush()
    finally:
        log.close()
