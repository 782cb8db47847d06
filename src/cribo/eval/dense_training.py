"""Iteration-based segmentation training and sliding-window evaluation (the mmseg-style protocols).

Used by the ``mmseg`` linear probe (frozen backbone, 1 x 1 conv) and by fine-tuning (backbone
unfrozen, linear or mask-transformer decoder). What mmsegmentation's runner did for the paper,
written in plain PyTorch (``evaluation.md`` §2.2, §3):

- a fixed number of iterations over an endlessly reshuffled training set (seeded);
- poly learning rate ``(lr - min_lr) * (1 - t / T) ** power + min_lr`` (power 0.9, min_lr = lr / 10
  as the official launcher sets it), optionally layer-wise decayed over the backbone's blocks;
- loss: cross-entropy on logits bilinearly upsampled to the crop, ignore label 255;
- evaluation: sliding windows (crop 512, stride 480), overlapping logits averaged, resized to the
  original mask resolution, one confusion matrix over the split.

Mixed precision (``precision``: fp32, fp16, bf16 or auto, as in pretraining) autocasts the model's
forwards, training and sliding-window inference alike; the loss is taken on float32 logits and fp16
gradients go through a ``GradScaler``. ``auto`` is fp32 on CPU, so CPU numbers do not depend on it.

A state file (``state_path``) is written atomically every ``checkpoint_every`` iterations and
read back on restart, so a killed fine-tuning run resumes at its last saved iteration (the data
order of the interrupted pass is redrawn from the seed and the iteration).
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from cribo.data.seg_transforms import sliding_windows
from cribo.eval.decoders import SegmentationModel
from cribo.eval.metrics import ConfusionMeter


def poly_lr(iteration: int, total: int, lr: float, min_lr: float, power: float = 0.9) -> float:
    """Learning rate at ``iteration`` of ``total`` (mmengine ``PolyLR`` with ``eta_min = min_lr``)."""
    return (lr - min_lr) * (1 - min(iteration, total) / total) ** power + min_lr


def layer_id(name: str, num_layers: int) -> int:
    """Depth of a backbone parameter: 0 for the embeddings, i + 1 for block i, L + 1 for the rest."""
    if name.startswith(("cls_token", "pos_embed", "patch_embed", "reg_token", "channel_mean")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_layers + 1


def param_groups(model: SegmentationModel, weight_decay: float, layer_decay: float = 1.0) -> list[dict]:
    """Optimizer groups with an ``lr_scale`` each: backbone parameters at depth l of L get
    ``layer_decay ** (L + 1 - l)``, the decoder 1; no weight decay on biases and 1-D parameters."""
    vit = getattr(model.backbone, "vit", None)
    num_layers = len(vit.blocks) if vit is not None else 0
    groups: dict[tuple[float, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("backbone."):
            inner = name.split(".", 2)[2] if vit is not None else name.split(".", 1)[1]
            scale = layer_decay ** (num_layers + 1 - layer_id(inner, num_layers))
        else:
            scale = 1.0
        decay = p.ndim > 1 and not name.endswith(".bias")
        groups.setdefault((scale, decay), []).append(p)
    return [{"params": ps, "lr_scale": scale, "weight_decay": weight_decay if decay else 0.0}
            for (scale, decay), ps in sorted(groups.items())]


def make_optimizer(name: str, groups: list[dict], lr: float):
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    raise ValueError(f"unknown optimizer {name!r}; choose sgd, adam or adamw")


@torch.no_grad()
def slide_logits(model, image: torch.Tensor, num_classes: int, crop: int, stride: int,
                 batch: int = 8, autocast=contextlib.nullcontext) -> torch.Tensor:
    """Average logits of the sliding windows over one ``3 x H x W`` image -> ``C x H x W``.

    ``autocast``: a context-manager factory wrapped around each forward (mixed precision).
    """
    _, height, width = image.shape
    boxes = sliding_windows(height, width, crop, stride)
    total = torch.zeros(num_classes, height, width, device=image.device)
    count = torch.zeros(1, height, width, device=image.device)
    for start in range(0, len(boxes), batch):
        chunk = boxes[start:start + batch]
        crops = torch.stack([image[:, t:b, l:r] for t, l, b, r in chunk])  # all windows share one size
        with autocast():
            logits = model(crops)
        logits = logits.float()
        for (t, l, b, r), out in zip(chunk, logits):
            total[:, t:b, l:r] += out
            count[:, t:b, l:r] += 1
    return total / count


@torch.no_grad()
def evaluate_sliding(model, dataset, num_classes: int, *, crop: int, stride: int, device,
                     ignore_index: int = 255, progress: bool = False, autocast=contextlib.nullcontext) -> dict:
    """mIoU of ``model`` over ``dataset`` (items: ``3 x h x w`` image, ``H x W`` original mask)."""
    model.eval()
    meter = ConfusionMeter(num_classes, ignore_index)
    for index in tqdm(range(len(dataset)), desc="sliding-window evaluation", disable=not progress,
                      file=sys.stdout, mininterval=5):
        image, mask = dataset[index]
        logits = slide_logits(model, image.to(device), num_classes, crop, stride, autocast=autocast)
        logits = F.interpolate(logits[None], size=tuple(mask.shape), mode="bilinear", align_corners=False)[0]
        meter.update(logits.argmax(0).cpu().numpy(), mask.numpy())
    return meter.compute("identity")


def _endless(dataset, batch_size: int, seed: int, num_workers: int, start_pass: int):
    """Batches forever, each pass over ``dataset`` in an order drawn from (seed, pass)."""
    pass_index = start_pass
    while True:
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=len(dataset) >= batch_size,
                            num_workers=num_workers, generator=torch.Generator().manual_seed(seed * 100003 + pass_index))
        yield from loader
        pass_index += 1


def train_dense(model: SegmentationModel, train_set, val_set, num_classes: int, *, iterations: int,
                batch_size: int, optimizer: str = "adam", lr: float = 0.01, weight_decay: float = 0.01,
                min_lr: float | None = None, power: float = 0.9, layer_decay: float = 1.0, crop: int = 512,
                stride: int = 480, seed: int = 0, device="cpu", num_workers: int = 0, ignore_index: int = 255,
                precision: str = "fp32", state_path: str | Path | None = None, checkpoint_every: int = 1000,
                progress: bool = True) -> dict:
    """Train ``model`` for ``iterations`` steps on ``train_set`` and score ``val_set`` with sliding windows.

    ``train_set`` yields ``(3 x crop x crop, crop x crop)`` pairs; ``val_set`` yields ``(3 x h x w,
    H x W)`` pairs. ``precision``: fp32 | fp16 | bf16 | auto (bf16 or fp16 on a GPU, fp32 on CPU).
    Returns the metrics of :meth:`ConfusionMeter.compute` plus the loss curve and settings.
    """
    from cribo.train.checkpoint import load_checkpoint, save_checkpoint
    from cribo.train.engine import autocast_factory

    torch.manual_seed(seed)
    device = torch.device(device)
    model = model.to(device)
    autocast, precision = autocast_factory(precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    min_lr = lr / 10 if min_lr is None else min_lr
    opt = make_optimizer(optimizer, param_groups(model, weight_decay, layer_decay), lr)
    settings = {"iterations": iterations, "batch_size": batch_size, "optimizer": optimizer, "lr": lr,
                "weight_decay": weight_decay, "min_lr": min_lr, "power": power, "layer_decay": layer_decay,
                "crop": crop, "stride": stride, "seed": seed, "precision": precision}
    start, losses = 0, []
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    if state_path is not None and Path(state_path).is_file():
        state = load_checkpoint(state_path)
        if state.get("settings") == settings:
            model.load_state_dict(state["model"], strict=False)
            opt.load_state_dict(state["optimizer"])
            if state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
            start, losses = int(state["iteration"]), list(state["losses"])
            torch.set_rng_state(state["rng"])
            print(f"resumed from {state_path} at iteration {start}/{iterations}")
        else:
            print(f"ignoring {state_path}: written with other settings")
    started = time.time()
    batches = _endless(train_set, batch_size, seed, num_workers, start_pass=start)
    model.train()
    bar = tqdm(range(start, iterations), desc="segmentation training", disable=not progress, file=sys.stdout,
               mininterval=5, initial=start, total=iterations)
    for iteration in bar:
        rate = poly_lr(iteration, iterations, lr, min_lr, power)
        for group in opt.param_groups:
            group["lr"] = rate * group["lr_scale"]
        images, masks = next(batches)
        with autocast():
            logits = model(images.to(device))
        loss = F.cross_entropy(logits.float(), masks.to(device).long(), ignore_index=ignore_index)
        if torch.isfinite(loss):  # not finite: every pixel of the batch ignored
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)  # fp16: skipped when the scaled gradients overflowed
            scaler.update()
            losses.append(round(loss.item(), 5))
        done = iteration + 1
        if state_path is not None and (done % checkpoint_every == 0) and done < iterations:
            save_checkpoint({"settings": settings, "iteration": done, "losses": losses, "rng": torch.get_rng_state(),
                             "model": {k: v for k, v in model.state_dict().items() if k in trainable},
                             "optimizer": opt.state_dict(), "scaler": scaler.state_dict()}, state_path)
    train_seconds = time.time() - started
    metrics = evaluate_sliding(model, val_set, num_classes, crop=crop, stride=stride, device=device,
                               ignore_index=ignore_index, progress=progress, autocast=autocast)
    if state_path is not None:
        Path(state_path).unlink(missing_ok=True)
    return {**metrics, **settings, "train_loss_first": losses[:1], "train_loss_last": losses[-1:],
            "train_loss": losses[:: max(1, len(losses) // 50)], "train_seconds": round(train_seconds, 2)}
