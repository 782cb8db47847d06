"""The two no-training reference "methods" of the tables: ``random`` and ``pixels``.

``random``: the untrained backbone of the run's seed, the floor every learned method must beat.
``pixels``: no network, only the training-set mean colour used to centre raw RGB patches.
Each writes a checkpoint with the same ``method``/``config``/``teacher`` keys as a trained run.
"""

from __future__ import annotations

import sys

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from cribo.data.images import UnlabeledImages, list_pretrain_images
from cribo.data.segmentation import IMAGENET_MEAN, IMAGENET_STD
from cribo.method.views import eval_transform
from cribo.models.backbones import build_backbone


def random_backbone_state(cfg: dict) -> dict:
    """``{"teacher": backbone.* weights, "epoch": 0}`` of the backbone the run's seed initialises."""
    torch.manual_seed(cfg["seed"])
    backbone = build_backbone(cfg["model"], drop_path_rate=0.0)
    return {"teacher": {f"backbone.{k}": v for k, v in backbone.state_dict().items()}, "epoch": 0}


@torch.no_grad()
def pixel_mean_state(cfg: dict) -> dict:
    """``{"teacher": {"pixel_mean": 3}, "epoch": 0}``: mean normalised colour of the pretraining images."""
    paths = list_pretrain_images(cfg["data"]["root"], cfg["data"]["split"])
    dataset = UnlabeledImages(paths, eval_transform(cfg["model"]["img_size"], IMAGENET_MEAN, IMAGENET_STD))
    loader = DataLoader(dataset, batch_size=64, num_workers=cfg["train"]["num_workers"])
    total, count = torch.zeros(3, dtype=torch.float64), 0
    for images in tqdm(loader, desc="pixel mean", disable=not cfg["train"]["progress"], file=sys.stdout):
        total += images.double().sum(dim=(0, 2, 3))
        count += images.shape[0] * images.shape[2] * images.shape[3]
    return {"teacher": {"pixel_mean": (total / count).float()}, "epoch": 0}


UNTRAINED = {"random": random_backbone_state, "pixels": pixel_mean_state}
