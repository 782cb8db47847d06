"""Image classification on user-provided ImageFolder data: linear on frozen features, and
semi-supervised fine-tuning on a labelled subset (ORL's ImageNet / Places205 / iNat18 protocols).

Data: ``ROOT/train/<class>/*`` and ``ROOT/val/<class>/*`` (the layout ``cribo data check imagenet``
verifies); Places205 and iNat18 in the same layout. Classes are the sorted train folder names.

- ``linear`` (``../shared/research/orl.md`` §4, the multi-head configs' optimiser): frozen backbone
  in eval mode (BN statistics frozen); its global feature (ResNet: res5 average-pooled, 2048-d; ViT:
  [CLS]) -> BatchNorm without affine parameters -> fully connected layer; SGD with Nesterov momentum
  0.9, lr 0.01, weight decay 1e-4, batch 256, lr x 0.1 at the given epochs (ImageNet 28 epochs with
  steps 8/16/24; Places205 14 with 4/8/12; iNat18 84 with 24/48/72). Which of the multi-head
  configs' layers ORL reported is not recorded; we report the last one.
- ``semi``: the backbone and a linear head fine-tuned end to end on the images of a subset list
  (the 1 % / 10 % lists), 20 epochs, batch 256, lr x 0.2 at epochs 12 and 16, SGD momentum 0.9,
  the head's lr ``head_lr_mult`` times the backbone's; the official grid is lr in {0.001, 0.01, 0.1}
  x head multiplier in {1, 10, 100}, weight decay 5e-4 (1 %) or 1e-4 (10 %): one run per point.

Training augmentation: random resized crop 224 and horizontal flip; evaluation: resize 256, centre
crop 224 (at another crop size, the same 256 / 224 ratio); ImageNet normalisation. Metrics: top-1 and top-5 accuracy (%) on val.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from cribo.data.segmentation import DataError

IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png"}


def topk_accuracy(logits: torch.Tensor, targets: torch.Tensor, ks=(1, 5)) -> dict[int, float]:
    """Percent of rows of ``logits`` (``N x C``) whose target is among the ``k`` largest scores."""
    k_max = min(max(ks), logits.shape[1])
    top = logits.topk(k_max, dim=1).indices  # N x k
    hits = top == targets[:, None]
    return {k: 100.0 * hits[:, :min(k, k_max)].any(dim=1).float().mean().item() for k in ks}


def image_folder(root: str | Path, split: str):
    """``(paths, labels, classes)`` of ``ROOT/split/<class>/*``; classes from ``ROOT/train``."""
    root = Path(root)
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir()) if (root / "train").is_dir() else []
    if not classes:
        raise DataError(f"no class folders in {root / 'train'}; the layout is ROOT/train/<class>/*.JPEG "
                        "(`cribo data check imagenet --root ROOT`)")
    folder = root / split
    if not folder.is_dir():
        raise DataError(f"split folder {folder} not found")
    paths, labels = [], []
    for index, name in enumerate(classes):
        for path in sorted((folder / name).glob("*")) if (folder / name).is_dir() else []:
            if path.suffix.lower() in IMAGE_SUFFIXES:
                paths.append(path)
                labels.append(index)
    return paths, labels, classes


def resolve_subset_list(spec: str, downloads: str | Path = "resources/downloads", mirror: str | None = None,
                        progress: bool = True) -> Path:
    """The file of a subset list: an official one by name (``1percent``, ``10percent``: downloaded into
    ``downloads`` once, resumable, its sha256 verified), or the path of the user's own list."""
    from cribo.data.registry import IMAGENET_SUBSETS

    official = IMAGENET_SUBSETS.get(spec)
    if official is None:
        path = Path(spec)
        if not path.is_file():
            raise DataError(f"subset list {spec!r} is neither an official list ({', '.join(IMAGENET_SUBSETS)}) nor a "
                            "file; pass one of those names (downloaded and verified) or the path of your own list")
        return path
    from cribo.data.download import download

    url = f"{mirror.rstrip('/')}/{official.filename}" if mirror else official.url
    path = download(url, Path(downloads) / official.filename, size=official.num_bytes,
                    checksum=f"sha256:{official.sha256}", progress=progress)
    names = read_subset_list(path)
    if len(names) != official.images:  # the checksum makes this unreachable unless the registry is wrong
        raise DataError(f"{path} lists {len(names)} images, the registry says {official.images}")
    return path


def read_subset_list(path: str | Path) -> list[str]:
    """Image file names of a subset list: one per line, optionally ``<class>/<name> <label>``; only the
    base name is kept (``n01440764_10026.JPEG``)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"subset list not found: {path}")
    return [Path(line.split()[0]).name for line in path.read_text().splitlines() if line.strip()]


def apply_subset(paths: list[Path], labels: list[int], names: list[str], list_path: str) -> tuple[list, list]:
    """Keep the listed images; every listed name must exist in the training folder."""
    position = {p.name: i for i, p in enumerate(paths)}
    missing = [n for n in names if n not in position]
    if missing:
        raise DataError(f"{len(missing)} of the {len(names)} images of {list_path} are not in the training folder "
                        f"(e.g. {', '.join(missing[:3])}); is the list for this dataset, and is the train/ tree "
                        "complete (`cribo data check imagenet`)?")
    keep = sorted(position[n] for n in set(names))
    return [paths[i] for i in keep], [labels[i] for i in keep]


class _Images(torch.utils.data.Dataset):
    def __init__(self, paths, labels, train: bool, size: int = 224, resize: int | None = None):
        from torchvision.transforms import v2

        from cribo.data.segmentation import IMAGENET_MEAN, IMAGENET_STD

        self.paths, self.labels = paths, labels
        resize = resize or round(size * 256 / 224)  # the protocol's 256 -> 224 ratio at any crop size
        geometry = [v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()] if train else \
            [v2.Resize(resize, antialias=True), v2.CenterCrop(size)]
        self.transform = v2.Compose([v2.PILToTensor(), *geometry, v2.ToDtype(torch.float32, scale=True),
                                     v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        from cribo.data.segmentation import load_rgb

        return self.transform(load_rgb(self.paths[index])), self.labels[index]


def global_feature(backbone, images: torch.Tensor) -> torch.Tensor:
    """``B x D``: a ViT's [CLS] token, else the spatial map average-pooled (ResNet: res5, 2048-d)."""
    vit = getattr(backbone, "vit", None)
    if vit is not None:
        return vit.forward_features(images)[:, 0]
    return backbone(images).mean(dim=(1, 2))


class Classifier(nn.Module):
    """Backbone -> global feature -> (linear mode: BN without affine) -> fc."""

    def __init__(self, backbone, num_classes: int, frozen: bool):
        super().__init__()
        self.backbone, self.frozen = backbone, frozen
        self.norm = nn.BatchNorm1d(backbone.embed_dim, affine=False) if frozen else nn.Identity()
        self.fc = nn.Linear(backbone.embed_dim, num_classes)
        nn.init.normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)
        if frozen:
            for p in backbone.parameters():
                p.requires_grad = False

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:
            self.backbone.eval()
        return self

    def forward(self, images):
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            feats = global_feature(self.backbone, images)
        return self.fc(self.norm(feats.float()))


def train_classifier(backbone, root: str | Path, *, mode: str, epochs: int, steps: tuple[int, ...],
                     lr: float, weight_decay: float, gamma: float, batch_size: int = 256,
                     head_lr_mult: float = 1.0, subset_list: str | None = None, image_size: int = 224,
                     seed: int = 0, device="cpu", num_workers: int = 0, progress: bool = True,
                     rank: int = 0, world_size: int = 1) -> dict | None:
    """Train ``mode`` (``linear`` or ``semi``) and return top-1 / top-5 on val with the settings.

    Several processes (``world_size > 1``, the process group initialised by the caller): the model is
    wrapped in DistributedDataParallel (BatchNorm made SyncBN on GPUs), ``batch_size`` stays the
    global batch and each process reads its share of every epoch (a DistributedSampler); rank 0
    evaluates and returns the result, the other processes return None.
    """
    if mode not in ("linear", "semi"):
        raise ValueError(f"mode {mode!r}: choose linear or semi")
    if batch_size % world_size:
        raise ValueError(f"the global batch ({batch_size}) must split evenly over {world_size} processes")
    paths, labels, classes = image_folder(root, "train")
    if subset_list:
        paths, labels = apply_subset(paths, labels, read_subset_list(subset_list), subset_list)
    val_paths, val_labels, _ = image_folder(root, "val")
    torch.manual_seed(seed)
    model = Classifier(backbone, len(classes), frozen=mode == "linear").to(device)
    trained = model  # what the training steps call: the model, or its DDP wrapper
    if world_size > 1:
        gpu = torch.device(device)
        if gpu.type == "cuda":  # torch has no SyncBN on CPU
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        trained = nn.parallel.DistributedDataParallel(model, device_ids=[gpu.index] if gpu.type == "cuda" else None)
    head = list(model.fc.parameters())
    groups = [{"params": head, "lr": lr * head_lr_mult}]
    if mode == "semi":
        groups.append({"params": [p for p in model.backbone.parameters() if p.requires_grad], "lr": lr})
    for g in groups:
        g["initial_lr"] = g["lr"]
    optimizer = torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=weight_decay, nesterov=mode == "linear")
    train_set = _Images(paths, labels, True, image_size)
    sampler = None
    if world_size > 1:
        sampler = torch.utils.data.DistributedSampler(train_set, num_replicas=world_size, rank=rank, shuffle=True,
                                                      seed=seed, drop_last=len(paths) > batch_size)
    loader = torch.utils.data.DataLoader(train_set, batch_size=batch_size // world_size, shuffle=sampler is None,
                                         sampler=sampler, num_workers=num_workers,
                                         drop_last=len(paths) > batch_size,
                                         generator=torch.Generator().manual_seed(seed))
    loss_fn = nn.CrossEntropyLoss()
    started = time.time()
    for epoch in range(epochs):
        factor = gamma ** sum(epoch >= s for s in steps)
        for g in optimizer.param_groups:
            g["lr"] = g["initial_lr"] * factor
        if sampler is not None:
            sampler.set_epoch(epoch)
        trained.train()
        for images, targets in tqdm(loader, desc=f"{mode} epoch {epoch + 1}/{epochs}",
                                    disable=not progress or rank > 0, file=sys.stdout, mininterval=5):
            loss = loss_fn(trained(images.to(device)), targets.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    if rank > 0:
        return None
    model.eval()
    val_loader = torch.utils.data.DataLoader(_Images(val_paths, val_labels, False, image_size), batch_size=batch_size,
                                             num_workers=num_workers)
    logits, targets = [], []
    with torch.no_grad():
        for images, t in val_loader:
            logits.append(model(images.to(device)).float().cpu())
            targets.append(t)
    accuracy = topk_accuracy(torch.cat(logits), torch.cat(targets))
    return {"top1": accuracy[1], "top5": accuracy[5], "mode": mode, "epochs": epochs, "steps": list(steps),
            "lr": lr, "head_lr_mult": head_lr_mult, "weight_decay": weight_decay, "gamma": gamma,
            "batch_size": batch_size, "subset_list": subset_list, "train_images": len(paths),
            "num_classes": len(classes), "image_size": image_size, "train_seconds": round(time.time() - started, 1),
            "final_loss": float(loss.detach()) if epochs and len(loader) else None}

