"""Does data loading keep up with training? Loader images/s against CrIBo training-step images/s, CPU.

Two configurations:
- ``toy``: the embedded default (toy scenes at 112 px, two 96 px views, ViT-Ti/8 depth 4, batch 32);
- ``224``: ImageNet-like input (generated 500 x 375 JPEGs, two 224 px views, ViT-S/16, batch 16).

The loader is timed alone (CrIBo views: crops, flips, colour jitter, blur, solarisation, position
maps) with 0, 1 and 2 worker processes; the training step alone on batches already in memory
(teacher + clustering + bank + student + backward + AdamW + EMA). Loading keeps up when its rate
exceeds the step's; on a GPU node the step is ~100x faster and the number of workers per GPU is
what this ratio sizes.

Usage: python benchmarks/bench_dataloader.py [--config toy|224|both] [--steps 3]
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from cribo.config import validate_run_config
from cribo.data.images import UnlabeledImages, list_pretrain_images
from cribo.method.cribo import ClusteringSettings, ObjectNet, cribo_step
from cribo.method.losses import CrIBoLoss
from cribo.method.memory_bank import ObjectMemoryBank
from cribo.method.views import CrIBoViews
from cribo.models.backbones import build_vit
from cribo.models.heads import DINOHead
from cribo.train.sampling import ResumableEpochSampler

CONFIGS = {
    "toy": dict(model={"arch": "vit_tiny", "patch_size": 8, "img_size": 96, "depth": 4},
                dino={"out_dim": 4096, "hidden_dim": 1024, "bottleneck_dim": 256},
                cribo={"num_clusters": 8, "object_out_dim": 4096, "queue_size": 2000}, batch=32),
    "224": dict(model={"arch": "vit_small", "patch_size": 16, "img_size": 224},
                dino={"out_dim": 65536, "hidden_dim": 2048, "bottleneck_dim": 256},
                cribo={"num_clusters": 32, "object_out_dim": 65536, "queue_size": 2000}, batch=16),
}


def toy_images() -> list[Path]:
    roots = sorted(Path("resources").glob("toyscenes-*"))
    if not roots:
        raise SystemExit("no resources/toyscenes-*: run the DAG (make run) or `cribo data toyscenes` first")
    return list_pretrain_images(roots[0], "train")


def photo_like_images(folder: Path, n: int) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        # smooth random field + noise: JPEG-compresses and decodes like a photo, not like flat colour
        small = rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((500, 375), Image.BICUBIC)
        arr = np.clip(np.asarray(img).astype(int) + rng.integers(-12, 12, (375, 500, 3)), 0, 255).astype(np.uint8)
        path = folder / f"{i:05d}.jpg"
        Image.fromarray(arr).save(path, quality=90)
        paths.append(path)
    return paths


def loader_rate(paths, img_size, batch, workers, batches) -> float:
    dataset = UnlabeledImages(paths, CrIBoViews(img_size, (0.25, 1.0)))
    sampler = ResumableEpochSampler(len(dataset), batch, seed=0)
    loader = DataLoader(dataset, batch_size=batch, sampler=sampler, drop_last=True, num_workers=workers)
    it = iter(loader)
    next(it)  # worker start-up is paid once per run, not per batch
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * batch / (time.perf_counter() - start)


def step_rate(cfg, paths, steps) -> float:
    run = validate_run_config({"method": "cribo", "model": cfg["model"], "dino": cfg["dino"], "cribo": cfg["cribo"]})
    model, dino, cribo = run["model"], run["dino"], run["cribo"]

    def make():
        backbone = build_vit(model, drop_path_rate=0.1)
        head = DINOHead(backbone.embed_dim, dino["out_dim"], dino["hidden_dim"], dino["bottleneck_dim"],
                        object_out_dim=cribo["object_out_dim"])
        return ObjectNet(backbone, head)

    student, teacher = make(), make()
    teacher.load_state_dict(student.state_dict())
    loss_fn = CrIBoLoss(dino["out_dim"], cribo["object_out_dim"], [0.04] * 10)
    bank = ObjectMemoryBank(cribo["queue_size"], cribo["num_clusters"], student.backbone.embed_dim)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    settings = ClusteringSettings(cribo["num_clusters"], cribo["pos_alpha"])
    dataset = UnlabeledImages(paths, CrIBoViews(model["img_size"], (0.25, 1.0)))
    loader = DataLoader(dataset, batch_size=cfg["batch"], sampler=ResumableEpochSampler(len(dataset), cfg["batch"]))
    batches = [b for b, _ in zip(loader, range(steps + 1))]
    times = []
    for i, (views, positions) in enumerate(batches):
        start = time.perf_counter()
        out = cribo_step(student, teacher, loss_fn, bank, views, positions, epoch=1, settings=settings)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        with torch.no_grad():
            for p_s, p_t in zip(student.parameters(), teacher.parameters()):
                p_t.mul_(0.996).add_(p_s.detach(), alpha=0.004)
        if i:  # the first step warms up allocators and kernels
            times.append(time.perf_counter() - start)
    return cfg["batch"] / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", choices=["toy", "224", "both"], default="both")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        for name in (["toy", "224"] if args.config == "both" else [args.config]):
            cfg = CONFIGS[name]
            paths = toy_images() if name == "toy" else photo_like_images(Path(tmp), 8 * cfg["batch"])
            size = cfg["model"]["img_size"]
            loads = {w: loader_rate(paths, size, cfg["batch"], w, batches=4) for w in (0, 1, 2)}
            train = step_rate(cfg, paths, args.steps)
            print(f"[{name}] training step: {train:.1f} images/s (batch {cfg['batch']}, median of {args.steps})")
            for workers, rate in loads.items():
                print(f"[{name}] loader, {workers} worker(s): {rate:.1f} images/s = {rate / train:.1f}x the step rate")


if __name__ == "__main__":
    main()
