"""Linear segmentation probe on a frozen backbone: the Leopart / NeCo protocol (``leopart``).

A 1 x 1 convolution maps last-layer patch tokens to class logits, trained with cross-entropy
(ignore label 255) while the backbone stays frozen in eval mode (``evaluation.md`` §2.1):

- input 448 x 448; training crops: paired random resized crop (scale 0.8-1, bilinear image,
  nearest mask) and horizontal flip 0.5; validation: plain resize (aspect ratio not kept);
- logits at 100 x 100 (``mask_size``), ground truth nearest-resized to the same size;
- SGD, momentum 0.9, weight decay 1e-4, lr 0.01, x0.1 at epoch 20 of 25; seed 400;
- mIoU with the identity mapping over the dataset's confusion matrix, at ``mask_size``.

Leopart upsamples the tokens to 100 x 100 and then applies the 1 x 1 convolution; here the
convolution runs on the token grid and its logits are upsampled. Both maps are linear and the
bilinear weights of a pixel sum to one, so the two orders give the same logits (tested), at a
fraction of the cost.

The ``mmseg`` protocol (CrIBo's own, ``evaluation.md`` §2.2) trains the same 1 x 1 convolution on
the frozen backbone's tokens with mmseg's pipeline (:mod:`cribo.data.seg_transforms`: random resize
0.5-2 of (2048, 512), 512 crops, flip, photometric distortion) for a fixed number of iterations
(Adam, poly lr), and scores sliding windows (512 / stride 480) at the original mask resolution
(:mod:`cribo.eval.dense_training`). The two protocols give numbers several points apart: a row
always names its protocol.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from cribo.data.segmentation import IMAGENET_MEAN, IMAGENET_STD, ResizePair
from cribo.eval.metrics import ConfusionMeter


class PairedCropFlip:
    """Training transform: paired random resized crop to ``size`` (scale 0.8-1) and flip, then normalise."""

    def __init__(self, size: int, scale=(0.8, 1.0), ratio=(3 / 4, 4 / 3)):
        self.size, self.scale, self.ratio = size, scale, ratio
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __call__(self, image: Image.Image, mask: np.ndarray):
        from torchvision.transforms import RandomResizedCrop

        top, left, height, width = RandomResizedCrop.get_params(image, list(self.scale), list(self.ratio))
        image = image.resize((self.size, self.size), Image.BILINEAR, box=(left, top, left + width, top + height))
        mask = np.asarray(Image.fromarray(mask).resize((self.size, self.size), Image.NEAREST,
                                                       box=(left, top, left + width, top + height)))
        x = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)
        m = torch.from_numpy(np.array(mask, dtype=np.uint8))
        if torch.rand(()) < 0.5:
            x, m = x.flip(-1), m.flip(-1)
        return (x / 255.0 - self.mean) / self.std, m


class LinearHead(nn.Module):
    """``B x h x w x D`` tokens -> ``B x C x S x S`` logits: a 1 x 1 convolution, then bilinear upsampling."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, num_classes, kernel_size=1)
        nn.init.normal_(self.conv.weight, std=0.01)
        nn.init.zeros_(self.conv.bias)

    def forward(self, tokens: torch.Tensor, size: int) -> torch.Tensor:
        logits = self.conv(tokens.permute(0, 3, 1, 2))
        return F.interpolate(logits, size=(size, size), mode="bilinear", align_corners=False)


def _downsample_masks(masks: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(masks[:, None].float(), size=(size, size), mode="nearest")[:, 0].long()


@torch.no_grad()
def evaluate_linear(backbone, head: LinearHead, loader, num_classes: int, mask_size: int, device,
                    ignore_index: int = 255) -> dict:
    head.eval()
    meter = ConfusionMeter(num_classes, ignore_index)
    for images, masks in loader:
        logits = head(backbone(images.to(device)).float(), mask_size)
        meter.update(logits.argmax(1).cpu().numpy(), _downsample_masks(masks, mask_size).numpy())
    return meter.compute("identity")


def train_linear(backbone, train_set, val_set, num_classes: int, *, epochs: int = 25, drop_at: int = 20,
                 lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 1e-4, batch_size: int = 60,
                 mask_size: int = 100, seed: int = 400, device="cpu", num_workers: int = 0,
                 ignore_index: int = 255, progress: bool = True) -> dict:
    """Train the linear head on ``train_set`` (yielding augmented ``(image, mask)``), score ``val_set``.

    Returns the metrics of :meth:`ConfusionMeter.compute` plus ``train_loss`` per epoch and settings.
    """
    torch.manual_seed(seed)
    backbone = backbone.to(device).eval()
    for p in backbone.parameters():
        p.requires_grad = False
    head = LinearHead(backbone.embed_dim, num_classes).to(device)
    optimizer = torch.optim.SGD(head.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=drop_at, gamma=0.1)
    loader = DataLoader(train_set, batch_size=batch_size, shuffle=True, drop_last=False, num_workers=num_workers,
                        generator=torch.Generator().manual_seed(seed))
    losses = []
    started = time.time()
    for epoch in range(epochs):
        head.train()
        total, count = 0.0, 0
        for images, masks in tqdm(loader, desc=f"linear epoch {epoch + 1}/{epochs}", disable=not progress,
                                  file=sys.stdout, mininterval=5):
            with torch.no_grad():
                tokens = backbone(images.to(device)).float()
            logits = head(tokens, mask_size)
            target = _downsample_masks(masks, mask_size).to(device)
            loss = F.cross_entropy(logits, target, ignore_index=ignore_index)
            if not torch.isfinite(loss):  # every pixel ignored in the batch
                continue
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, count = total + loss.item() * len(images), count + len(images)
        scheduler.step()
        losses.append(total / max(count, 1))
    val_loader = DataLoader(val_set, batch_size=batch_size, num_workers=num_workers)
    metrics = evaluate_linear(backbone, head, val_loader, num_classes, mask_size, device, ignore_index)
    return {**metrics, "train_loss": losses, "protocol_name": "leopart", "epochs": epochs, "drop_at": drop_at,
            "lr": lr, "batch_size": batch_size, "mask_size": mask_size, "seed": seed,
            "train_seconds": time.time() - started}


def leopart_datasets(root, spec, image_size: int):
    """Training (augmented) and validation datasets of the protocol for a VOC-layout dataset."""
    from cribo.data.segmentation import segmentation_dataset

    train = segmentation_dataset(spec, root, spec.train_split, transform=PairedCropFlip(image_size))
    val = segmentation_dataset(spec, root, spec.val_split, transform=ResizePair(image_size))
    return train, val


def mmseg_datasets(root, spec, *, crop: int, scale, ratio_range=(0.5, 2.0), cat_max_ratio: float = 0.75,
                   normalisation: str = "imagenet", photometric: bool = True):
    """Training and validation datasets of the mmseg protocols for a VOC-layout dataset."""
    from cribo.data.seg_transforms import MmsegTestTransform, MmsegTrainTransform
    from cribo.data.segmentation import segmentation_dataset

    train_tf = MmsegTrainTransform(crop, scale, ratio_range, cat_max_ratio, spec.ignore_index, normalisation,
                                   photometric)
    train = segmentation_dataset(spec, root, spec.train_split, transform=train_tf)
    val = segmentation_dataset(spec, root, spec.val_split, transform=MmsegTestTransform(scale, normalisation))
    return train, val


def train_linear_mmseg(backbone, train_set, val_set, num_classes: int, **kwargs) -> dict:
    """The ``mmseg`` linear protocol: a 1 x 1 conv on the frozen backbone, trained by :func:`train_dense`.

    ``kwargs`` go to :func:`cribo.eval.dense_training.train_dense` (iterations, batch_size, lr, ...).
    """
    from cribo.eval.decoders import LinearDecoder, SegmentationModel
    from cribo.eval.dense_training import train_dense

    torch.manual_seed(kwargs.get("seed", 0))  # the head's initialisation is part of the seeded run
    model = SegmentationModel(backbone, LinearDecoder(backbone.embed_dim, num_classes), freeze_backbone=True)
    result = train_dense(model, train_set, val_set, num_classes, **kwargs)
    return {**result, "protocol_name": "mmseg"}
