"""Control for issue 13: the official CrIBo training loop on the embedded toy, evaluated by our in-context code.

It separates the toy from our implementation: if the official ``train_one_epoch`` (its networks, clustering,
bank retrieval, cycle check, losses, EMA and schedules), fed the same toy views with the same settings, ends
where our CrIBo run ends, then what the toy tables show is the method at this budget, not our re-implementation.

Nothing of the official repository is part of this project: point ``--official`` at a clone of
https://github.com/arnaud-lebailly/CrIBo (``einops``, which it needs, comes with ``make install``); it is imported from there. Its GPU calls are
redirected to the CPU (``.cuda()`` is the identity, one gloo process stands in for DDP). The official code hard-codes
its DINOHead width (2048 / 256); here the head is built with the toy's ``hidden_dim`` / ``bottleneck_dim`` so that
both implementations train the same network. The views are ours (:class:`cribo.method.views.CrIBoViews`: the
official augmentations with positions maps in the official layout), so both see the same pixels.

Usage::

    python benchmarks/official_on_toy.py --official /path/to/CrIBo --config config/config.yaml --run cribo \\
        [--epochs 12] [--work-dir results/official_on_toy]

Writes ``<work-dir>/checkpoint.pth`` (our layout: the official teacher translated by
:func:`cribo.train.official_format.model_from_official`), the in-context row ``<work-dir>/incontext.json`` and
prints in-context mIoU and pixel accuracy at fraction 1.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import time
from functools import partial
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]


def redirect_cuda_to_cpu() -> None:
    torch.Tensor.cuda = lambda self, *a, **k: self
    nn.Module.cuda = lambda self, *a, **k: self
    torch.cuda.synchronize = lambda *a, **k: None
    plain_tensor = torch.tensor

    def cpu_tensor(*a, device=None, **k):
        return plain_tensor(*a, device="cpu" if device == "cuda" else device, **k)

    torch.tensor = cpu_tensor


class SingleProcessDDP(nn.Module):
    """What the official loop uses of DDP on one process: ``.module`` and the forward."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *a, **k):
        return self.module(*a, **k)


def official_teacher_and_clustering(student: nn.Module, teacher: nn.Module, clustering_class, official):
    """The official ``main``'s set-up: the teacher starts as the student and is frozen; the clustering of its args."""
    teacher.load_state_dict(student.state_dict(), strict=False)
    for p in teacher.parameters():
        p.requires_grad = False
    return clustering_class(official, n_tokens=official.n_tokens, n_heads=1, sinkhorn_lambda=official.sinkhorn_lambda,
                            sinkhorn_iterations=official.sinkhorn_iterations, student_temp=official.student_temp,
                            pos_alpha=official.pos_alpha)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--official", required=True, help="clone of the official CrIBo repository")
    parser.add_argument("--config", default="config/config.yaml")
    parser.add_argument("--run", default="cribo", help="the run of the config whose settings are mirrored")
    parser.add_argument("--epochs", type=int, default=None, help="default: the run's optim.epochs")
    parser.add_argument("--work-dir", default="results/official_on_toy")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    sys.path[:0] = [str(Path(args.official).resolve())]
    redirect_cuda_to_cpu()
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    dist.init_process_group("gloo", rank=0, world_size=1)
    import main_cribo
    from cribo_utils.parser import get_args_parser
    from main_cribo import Clustering, CrIBoLoss, DINOHead, train_one_epoch, utils, vits

    main_cribo.pin_workers_iterator = lambda *a, **k: None

    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_learning_curve import InContextEvaluator, load_workflow_config, prepare_data
    from cribo.config import resolve_runs
    from cribo.data.images import UnlabeledImages, list_pretrain_images
    from cribo.data.registry import get_spec
    from cribo.method.views import CrIBoViews
    from cribo.train.checkpoint import save_checkpoint
    from cribo.train.official_format import model_from_official

    workflow_cfg = load_workflow_config(args.config)
    cfg = resolve_runs(workflow_cfg, args.config)[args.run]
    model, dino, cribo_cfg, optim = cfg["model"], cfg["dino"], cfg["cribo"], cfg["optim"]
    epochs = args.epochs or optim["epochs"]
    root = Path(cfg["data"]["root"])
    prepare_data(workflow_cfg, root, quick=False)

    alpha = cribo_cfg["pos_alpha"]
    official = get_args_parser().parse_args([
        "--arch", "vit_tiny", "--patch_size", str(model["patch_size"]),
        "--out_dim", str(dino["out_dim"]), "--out_dim_c", str(cribo_cfg["object_out_dim"]),
        "--n_tokens", str(cribo_cfg["num_clusters"]), "--queue_size", str(cribo_cfg["queue_size"]),
        "--batch_size_per_gpu", str(optim["batch_size"]), "--epochs", str(epochs),
        "--warmup_teacher_temp_epochs", str(dino["warmup_teacher_temp_epochs"]),
        "--pos_alpha", str(alpha), str(alpha), "--momentum_teacher", str(dino["momentum_teacher"]),
        "--freeze_last_layer", str(dino["freeze_last_layer"]), "--clip_grad", str(optim["clip_grad"]),
        "--drop_path_rate", str(model["drop_path_rate"])])
    official.gpu, official.rank, official.world_size = "cpu", 0, 1
    official.norm_last_layer = dino["norm_last_layer"]

    torch.manual_seed(cfg["seed"])
    # img_size: the position table of our ViT (the official default, 224, would be interpolated at every step)
    vit = partial(vits.VisionTransformer, img_size=[model["img_size"]], patch_size=model["patch_size"],
                  embed_dim=model["embed_dim"],
                  depth=model["depth"], num_heads=model["num_heads"], mlp_ratio=4, qkv_bias=True,
                  norm_layer=partial(nn.LayerNorm, eps=1e-6))
    head = partial(DINOHead, model["embed_dim"], dino["out_dim"], cribo_cfg["object_out_dim"], use_bn=False,
                   hidden_dim=dino["hidden_dim"], bottleneck_dim=dino["bottleneck_dim"])
    student = utils.MultiCropWrapperDINO(vit(drop_path_rate=model["drop_path_rate"], is_teacher=False),
                                         head(norm_last_layer=dino["norm_last_layer"]), "last")
    teacher = utils.MultiCropWrapperDINO(vit(), head(), "last")
    clustering = official_teacher_and_clustering(student, teacher, Clustering, official)
    loss = CrIBoLoss(out_dim=dino["out_dim"], out_dim_c=cribo_cfg["object_out_dim"], ncrops=2,
                     warmup_teacher_temp=dino["warmup_teacher_temp"], warmup_teacher_temp_c=dino["warmup_teacher_temp"],
                     teacher_temp=dino["teacher_temp"], teacher_temp_c=dino["teacher_temp"],
                     warmup_teacher_temp_epochs=dino["warmup_teacher_temp_epochs"], nepochs=epochs,
                     student_temp_c=official.student_temp_c, args=official)
    embed = model["embed_dim"]
    queue = official.queue_size
    cls_queue = torch.rand(2, queue, embed)
    cpv_queue = official.n_tokens * torch.ones(queue, dtype=torch.int)
    centroids_queue = torch.rand(2, official.n_tokens * queue, embed)

    spec = get_spec(cfg["data"]["dataset"], str(root))
    views = CrIBoViews(model["img_size"], tuple(dino["global_crops_scale"]))
    dataset = UnlabeledImages(list_pretrain_images(root, spec.train_split), transform=views)
    loader = torch.utils.data.DataLoader(dataset, batch_size=optim["batch_size"], shuffle=True, drop_last=True,
                                         generator=torch.Generator().manual_seed(cfg["seed"]))
    student_ddp = SingleProcessDDP(student)
    optimizer = torch.optim.AdamW(utils.get_params_groups(student_ddp))
    lr = utils.cosine_scheduler(optim["lr"] * optim["batch_size"] / 256.0, optim["min_lr"], epochs, len(loader),
                                warmup_epochs=optim["warmup_epochs"])
    wd = utils.cosine_scheduler(optim["weight_decay"], optim["weight_decay_end"], epochs, len(loader))
    momentum = utils.cosine_scheduler(dino["momentum_teacher"], 1, epochs, len(loader))

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    for epoch in range(epochs):
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            stats = train_one_epoch(student_ddp, teacher, teacher, loss, loader, optimizer, lr, wd, momentum, epoch,
                                    None, clustering, official, centroids_queue, cls_queue, cpv_queue)
        print(f"official epoch {epoch + 1}/{epochs} ({time.time() - started:.0f} s): "
              + ", ".join(f"{k} {v:.3f}" for k, v in stats.items() if k in ("d_loss", "s_loss", "nn_loss",
                                                                            "bootstrap_centroid_ratio")), flush=True)
    ckpt = {"method": "cribo", "config": cfg, "epoch": epochs, "global_step": epochs * len(loader),
            "teacher": model_from_official(teacher.state_dict()), "official_control": str(args.official)}
    save_checkpoint(ckpt, work / "checkpoint.pth")
    evaluate = InContextEvaluator(workflow_cfg, str(root), False, work, workflow_cfg.get("experiment", "toy"))
    out = evaluate(work / "checkpoint.pth", f"{args.run} (official loop)", "incontext")
    print(f"official CrIBo loop, {epochs} epochs ({time.time() - started:.0f} s): in-context mIoU {out['miou']:.2f}, "
          f"pixel accuracy {out['pixel_accuracy']:.2f}", flush=True)


if __name__ == "__main__":
    main()
