"""COCO detection and instance segmentation: Mask R-CNN R50-FPN fine-tuned from our backbone.

The detector is torchvision's ``maskrcnn_resnet50_fpn_v2`` built without any pretrained weights
(``../shared/research/orl.md`` §4: trainable BatchNorm everywhere, BN in the FPN, a 4conv1fc box
head and a BN mask head; it differs from detectron2's R_50_FPN by its 2-conv RPN head and the
absence of PreciseBN), with our ResNet-50 loaded into ``backbone.body`` (the torchvision key
layout: ``conv1``, ``bn1``, ``layer1``-``layer4``). The 1x schedule: 90k iterations at batch 16,
SGD lr 0.02 (momentum 0.9, weight decay 1e-4), divided by 10 at 60k and 80k, after a linear
warm-up over 1000 iterations from lr / 1000 (detectron2's default); multi-scale training with the
short side drawn from 640-800 (step 32), tested at 800. Several processes (``cribo eval detect
--nproc-per-node N``: torchrun, or srun tasks) each take a slice of every global batch under
DistributedDataParallel, with SyncBN on GPUs (``cribo.cli``). Box and mask AP (AP, AP50, AP75) come
from pycocotools' ``COCOeval`` on the validation annotations.

Data: any COCO-format instance file (``images``, ``annotations`` with polygon or RLE
``segmentation``, ``categories``); crowd annotations are left out of training. The toy scenes
ship one per split (``annotations/instances_{train,val}.json``).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm import tqdm

SHORT_SIDES_1X = tuple(range(640, 801, 32))  # 640, 672, ..., 800


class DetectionDataError(ValueError):
    pass


def sampling_kwargs(rpn_batch_per_image: int = 256, roi_batch_per_image: int = 512, proposals_train: int = 2000,
                    proposals_test: int = 1000) -> dict:
    """torchvision's builder arguments for the detector's sampling sizes: anchors sampled per image for
    the RPN losses, RoI-head proposals sampled per image for the box and mask losses, and proposals
    kept per image in training and at test. The defaults are the 1x recipe's, which are torchvision's.

    The toy scenes (64 px, 2-3 objects) need far fewer: at the 1x sizes an iteration samples 512
    RoIs per image through the 4conv1fc box head, most of the ~6 s a CPU iteration takes at 64 px,
    and the test pass runs the box head on 1,000 proposals per image. ``proposals_*`` sets both
    the pre-NMS (per level) and the post-NMS count, which the 1x recipe keeps equal."""
    for name, value in (("rpn_batch_per_image", rpn_batch_per_image), ("roi_batch_per_image", roi_batch_per_image),
                        ("proposals_train", proposals_train), ("proposals_test", proposals_test)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    return {"rpn_batch_size_per_image": rpn_batch_per_image, "box_batch_size_per_image": roi_batch_per_image,
            "rpn_pre_nms_top_n_train": proposals_train, "rpn_post_nms_top_n_train": proposals_train,
            "rpn_pre_nms_top_n_test": proposals_test, "rpn_post_nms_top_n_test": proposals_test}


def build_detector(num_classes: int, backbone_state: dict | None = None, *, min_size=SHORT_SIDES_1X,
                   test_size: int = 800, max_size: int = 1333, **detector_kwargs) -> nn.Module:
    """Mask R-CNN R50-FPN v2 for ``num_classes`` object classes (+ background), randomly
    initialised, then ``backbone_state`` (a torchvision-layout ResNet-50 state dict) loaded strictly
    into its ResNet. ``min_size``: the training short sides (one drawn per batch); ``test_size``
    is used in eval mode. ``detector_kwargs`` go to torchvision's builder (e.g. fewer RPN proposals
    for tests)."""
    from torchvision.models.detection import maskrcnn_resnet50_fpn_v2

    # without pretrained weights torchvision trains every layer and keeps BatchNorm trainable
    model = maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=num_classes + 1,
                                     min_size=min_size, max_size=max_size, **detector_kwargs)
    model.test_size = test_size
    if backbone_state is not None:
        state = {k: v for k, v in backbone_state.items() if not k.startswith("fc.")}
        missing, unexpected = model.backbone.body.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise DetectionDataError(f"the backbone weights do not fit the detector's ResNet-50: missing {missing[:5]}, "
                                     f"unexpected {unexpected[:5]}")
    return model


def resnet50_state_from_checkpoint(ckpt: dict, source: str) -> dict:
    """The ResNet-50 weights of any checkpoint ``cribo`` reads, or a clear error naming what it holds."""
    from cribo.models.backbones import ResNetFeatures, backbone_from_checkpoint

    backbone = backbone_from_checkpoint(ckpt, source)
    if not isinstance(backbone, ResNetFeatures) or backbone.arch != "resnet50":
        what = getattr(backbone, "arch", None) or type(backbone).__name__
        raise DetectionDataError(f"{source}: detection needs a ResNet-50 backbone (Mask R-CNN R50-FPN), but the "
                                 f"checkpoint holds {what}; evaluate ViTs with the dense protocols, or import a "
                                 "ResNet-50 with `cribo import-baseline`")
    return backbone.resnet.state_dict()


class CocoInstances(torch.utils.data.Dataset):
    """Images and instance targets of a COCO-format file: ``(image 3 x H x W in [0, 1], target)``,
    target = ``boxes`` (N x 4 xyxy), ``labels`` (N, contiguous 1..K), ``masks`` (N x H x W uint8),
    ``image_id``. Category ids are mapped to 1..K in increasing id order."""

    def __init__(self, annotation_file: str | Path, image_root: str | Path, train: bool = True):
        from pycocotools.coco import COCO

        annotation_file = Path(annotation_file)
        if not annotation_file.is_file():
            raise DetectionDataError(f"COCO instance file not found: {annotation_file}")
        with _quiet():
            self.coco = COCO(str(annotation_file))
        self.image_root = Path(image_root)
        self.category_ids = sorted(self.coco.getCatIds())
        self.label_of = {c: i + 1 for i, c in enumerate(self.category_ids)}
        ids = sorted(self.coco.getImgIds())
        if train:  # images without a usable object add nothing to the losses
            ids = [i for i in ids if self._annotations(i)]
        self.ids = ids

    def _annotations(self, image_id: int) -> list[dict]:
        anns = self.coco.loadAnns(self.coco.getAnnIds(imgIds=image_id, iscrowd=False))
        return [a for a in anns if a["bbox"][2] >= 1 and a["bbox"][3] >= 1]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int):
        image_id = self.ids[index]
        info = self.coco.loadImgs(image_id)[0]
        path = self.image_root / info["file_name"]
        if not path.is_file():
            raise DetectionDataError(f"image {path} named by the COCO file is missing")
        with Image.open(path) as img:
            image = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
        anns = self._annotations(image_id)
        boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                              for a in anns], dtype=torch.float32).reshape(-1, 4)
        masks = torch.from_numpy(np.stack([self.coco.annToMask(a) for a in anns])) if anns else \
            torch.zeros((0, info["height"], info["width"]), dtype=torch.uint8)
        labels = torch.tensor([self.label_of[a["category_id"]] for a in anns], dtype=torch.int64)
        return image, {"boxes": boxes, "labels": labels, "masks": masks, "image_id": image_id}


def collate(batch):
    return tuple(zip(*batch))


class _quiet:
    """Silence pycocotools' prints (it writes progress to stdout)."""

    def __enter__(self):
        import io

        self._stdout, sys.stdout = sys.stdout, io.StringIO()

    def __exit__(self, *exc):
        sys.stdout = self._stdout


def lr_at(iteration: int, base_lr: float, steps: tuple[int, ...], warmup: int, warmup_factor: float = 1e-3) -> float:
    """Step schedule with linear warm-up: ``base_lr * 0.1 ** (steps passed)``, ramped from
    ``warmup_factor`` over the first ``warmup`` iterations."""
    lr = base_lr * 0.1 ** sum(iteration >= s for s in steps)
    if iteration < warmup:
        alpha = iteration / warmup
        lr *= warmup_factor * (1 - alpha) + alpha
    return lr


def train_detector(model: nn.Module, dataset: CocoInstances, *, iterations: int, batch_size: int = 16,
                   lr: float = 0.02, steps: tuple[int, ...] = (60000, 80000), warmup: int = 1000,
                   weight_decay: float = 1e-4, seed: int = 0, device="cpu", num_workers: int = 0,
                   state_path: str | Path | None = None, checkpoint_every: int = 1000,
                   progress: bool = True, rank: int = 0, world_size: int = 1) -> dict:
    """Iteration-based training (SGD, step schedule); resumable from ``state_path``.

    The data order is a function of (seed, epoch), so a resumed run sees the same batches; each
    batch's short side is drawn by torchvision's transform from the global RNG, seeded per
    iteration (and per process). Returns the last losses and the mean time per iteration.

    Several processes (``world_size > 1``, ``model`` wrapped in DistributedDataParallel by the
    caller): ``batch_size`` is the global batch, as detectron2's ``IMS_PER_BATCH``; process ``rank``
    takes its ``batch_size / world_size`` slice of each batch and DDP averages the gradients. Rank 0
    writes the state; every process resumes from it.
    """
    if batch_size % world_size:
        raise ValueError(f"the global batch ({batch_size}) must split evenly over {world_size} processes")
    local = batch_size // world_size
    if world_size > 1 and len(dataset) < batch_size:
        raise ValueError(f"{len(dataset)} training images cannot fill one global batch of {batch_size} over "
                         f"{world_size} processes; lower --batch-size")
    bare = getattr(model, "module", model)  # the detector itself, under DDP or not
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    start = 0
    if state_path is not None and Path(state_path).is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        bare.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start = int(state["iteration"])
    per_epoch = max(1, len(dataset) // batch_size)
    losses, seconds = {}, []
    bar = tqdm(total=iterations, initial=start, desc="detect", disable=not progress or rank > 0, file=sys.stdout,
               mininterval=5)
    iteration = start
    while iteration < iterations:
        epoch, offset = divmod(iteration, per_epoch)
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed * 100003 + epoch)).tolist()
        for b in range(offset, per_epoch):
            if iteration >= iterations:
                break
            started = time.perf_counter()
            torch.manual_seed((seed * 1000003 + iteration) * world_size + rank)
            first = b * batch_size + rank * local
            items = [dataset[i] for i in order[first:first + local]]
            images = [x.to(device) for x, _ in items]
            targets = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()} for _, t in items]
            for group in optimizer.param_groups:
                group["lr"] = lr_at(iteration, lr, steps, warmup)
            loss_dict = model(images, targets)
            loss = sum(loss_dict.values())
            if not torch.isfinite(loss):
                raise FloatingPointError(f"detection loss is {loss.item()} at iteration {iteration}: "
                                         "lower --lr or check the annotations")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            iteration += 1
            seconds.append(time.perf_counter() - started)
            losses = {k: float(v.detach()) for k, v in loss_dict.items()}
            bar.update(1)
            if rank == 0 and state_path is not None and (iteration % checkpoint_every == 0 or iteration == iterations):
                _save_state(state_path, bare, optimizer, iteration)
    bar.close()
    return {"losses": losses, "loss": sum(losses.values()) if losses else None, "iterations": iterations,
            "seconds_per_iteration": float(np.mean(seconds)) if seconds else None}


def _save_state(path, model, optimizer, iteration: int) -> None:
    import os

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "iteration": iteration}, tmp)
    os.replace(tmp, path)


@torch.no_grad()
def predict(model: nn.Module, dataset: CocoInstances, device="cpu", batch_size: int = 2,
            mask_threshold: float = 0.5, progress: bool = True) -> tuple[list[dict], list[dict]]:
    """Box and mask detections of every image, in COCO result format (xywh boxes, RLE masks)."""
    from pycocotools import mask as mask_utils

    model.to(device).eval()
    model.transform.min_size = (getattr(model, "test_size", 800),)
    boxes_out, masks_out = [], []
    category_of = {label: cat for cat, label in dataset.label_of.items()}
    for start in tqdm(range(0, len(dataset), batch_size), desc="detect eval", disable=not progress, file=sys.stdout,
                      mininterval=5):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        outputs = model([x.to(device) for x, _ in items])
        for (_, target), out in zip(items, outputs):
            masks = (out["masks"][:, 0] >= mask_threshold).cpu().numpy().astype(np.uint8)
            for box, score, label, mask in zip(out["boxes"].cpu().tolist(), out["scores"].cpu().tolist(),
                                               out["labels"].cpu().tolist(), masks):
                base = {"image_id": target["image_id"], "category_id": category_of[label], "score": score}
                boxes_out.append({**base, "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]]})
                rle = mask_utils.encode(np.asfortranarray(mask))
                rle["counts"] = rle["counts"].decode("ascii")
                masks_out.append({**base, "segmentation": rle})
    return boxes_out, masks_out


def coco_ap(coco_gt, detections: list[dict], kind: str) -> dict:
    """AP, AP50, AP75 (percent) of ``detections`` against ``coco_gt`` (a pycocotools COCO), ``kind``
    ``bbox`` or ``segm``; no detection gives zeros."""
    from pycocotools.cocoeval import COCOeval

    if not detections:
        return {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
    with _quiet():
        coco_dt = coco_gt.loadRes(detections)
        evaluator = COCOeval(coco_gt, coco_dt, kind)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = [max(0.0, float(v)) * 100 for v in evaluator.stats[:3]]  # -1 (no ground truth) reads as 0
    return dict(zip(("AP", "AP50", "AP75"), stats))


def evaluate_detector(model: nn.Module, dataset: CocoInstances, device="cpu", batch_size: int = 2,
                      progress: bool = True) -> dict:
    boxes, masks = predict(model, dataset, device, batch_size, progress=progress)
    box_ap, mask_ap = coco_ap(dataset.coco, boxes, "bbox"), coco_ap(dataset.coco, masks, "segm")
    return {**{f"{k}_bb": v for k, v in box_ap.items()}, **{f"{k}_mk": v for k, v in mask_ap.items()},
            "detections": len(boxes)}
