"""The official CrIBo training step at issue 14's shapes, on the views ``bench_train_step.py`` times ours on.

This is the yardstick of issue 14 (ours at >= 2x the official images/s). The official ``train_one_epoch``
(``main_cribo.py`` of https://github.com/tileb1/CrIBo) runs unmodified in fp32 (``fp16_scaler=None``): its
networks, clustering, bank retrieval with the cycle check, three losses, AdamW and EMA. Its GPU calls are
redirected to the CPU (``.cuda()`` is the identity, one gloo process stands in for DDP), as in
``official_on_toy.py``. The loader is a list of the same synthetic views and position maps as
``bench_train_step.synthetic_views`` draws (same generator, same seed); the queues start full of random entries, as
in the official ``main``. One difference from the official ``main`` is kept on purpose: the ViT is built for the
crop size (``img_size=[S]``), so the official step does not pay for interpolating its 224 px position table at every
step; that can only make the official step faster, so the ratio we quote is conservative.

Nothing of the official repository is part of this project: ``--official`` points at a clone of it
(``einops``, which it needs, comes with ``make install``), imported from there.

Step times come from the loader: the time between two batches handed out is one whole step (forward, backward,
AdamW, EMA and the official logging), the last one ends when ``train_one_epoch`` returns.

``--keep-freed-host-memory`` gives the official process the glibc setting our trainer makes by default
(:func:`cribo.train.host_memory.keep_freed_host_memory`: freed blocks stay in the heap, so a step does not
page-fault its ``rows x 65536`` tensors afresh). Without it the official code runs as it would on its own; with it
the two steps differ by their code only (the like-for-like comparison).

Usage: python benchmarks/bench_official_step.py --official /path/to/CrIBo [--preset issue] [--steps 5 --warmup 2]
       [--keep-freed-host-memory]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

BENCHMARKS = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHMARKS))
from bench_train_step import PRESETS, synthetic_views  # noqa: E402
from official_on_toy import SingleProcessDDP, official_teacher_and_clustering, redirect_cuda_to_cpu  # noqa: E402


class TimedBatches:
    """A list of batches that records when each is handed out (``train_one_epoch`` takes ``len`` of its iterator)."""

    def __init__(self, batches: list):
        self.batches = batches
        self.handed_out: list[float] = []
        self.cpu_handed_out: list[float] = []

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        self._next = 0
        return self  # the official loop takes ``len`` of the iterator too

    def __next__(self):
        if self._next == len(self.batches):
            raise StopIteration
        self.handed_out.append(time.perf_counter())
        self.cpu_handed_out.append(time.process_time())
        self._next += 1
        return self.batches[self._next - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official", required=True, help="clone of the official CrIBo repository")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="issue")
    parser.add_argument("--out-dim", type=int, default=65536)
    parser.add_argument("--epoch", type=int, default=1, help="the official loss's epoch (schedules only)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--keep-freed-host-memory", action="store_true",
                        help="the glibc setting our trainer makes (cribo.train.host_memory), for a like-for-like run")
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    torch.set_num_threads(args.threads)
    allocator = "glibc default"
    if args.keep_freed_host_memory:
        from cribo.train.host_memory import keep_freed_host_memory

        if not keep_freed_host_memory():
            sys.exit("--keep-freed-host-memory: this C library has no glibc mallopt; run without the flag")
        allocator = "freed memory kept (our trainer's setting)"

    official_dir = Path(args.official).resolve()
    if not (official_dir / "main_cribo.py").is_file():
        sys.exit(f"--official {args.official}: no main_cribo.py there; give a clone of github.com/tileb1/CrIBo")
    sys.path[:0] = [str(official_dir)]
    redirect_cuda_to_cpu()
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    dist.init_process_group("gloo", rank=0, world_size=1)
    import main_cribo
    from cribo_utils.parser import get_args_parser
    from main_cribo import Clustering, CrIBoLoss, DINOHead, train_one_epoch, utils, vits

    main_cribo.pin_workers_iterator = lambda *a, **k: None

    alpha = str(preset["pos_alpha"])
    official = get_args_parser().parse_args([
        "--arch", preset["arch"], "--patch_size", "16", "--out_dim", str(args.out_dim),
        "--out_dim_c", str(args.out_dim), "--n_tokens", str(preset["clusters"]),
        "--queue_size", str(preset["queue"]), "--batch_size_per_gpu", str(preset["batch"]),
        "--pos_alpha", alpha, alpha, "--use_fp16", "false"])
    official.gpu, official.rank, official.world_size = "cpu", 0, 1

    torch.manual_seed(0)
    size = preset["img"]
    backbone = vits.__dict__[preset["arch"]]
    student_vit = backbone(patch_size=16, drop_path_rate=official.drop_path_rate, is_teacher=False, img_size=[size])
    embed = student_vit.embed_dim
    student = utils.MultiCropWrapperDINO(
        student_vit, DINOHead(embed, official.out_dim, official.out_dim_c, use_bn=False,
                              norm_last_layer=official.norm_last_layer), official.which_features)
    teacher = utils.MultiCropWrapperDINO(backbone(patch_size=16, img_size=[size]),
                                         DINOHead(embed, official.out_dim, official.out_dim_c, False),
                                         official.which_features)
    clustering = official_teacher_and_clustering(student, teacher, Clustering, official)
    loss = CrIBoLoss(out_dim=official.out_dim, out_dim_c=official.out_dim_c, ncrops=2,
                     warmup_teacher_temp=official.warmup_teacher_temp,
                     warmup_teacher_temp_c=official.warmup_teacher_temp_c, teacher_temp=official.teacher_temp,
                     teacher_temp_c=official.teacher_temp_c,
                     warmup_teacher_temp_epochs=official.warmup_teacher_temp_epochs, nepochs=official.epochs,
                     student_temp_c=official.student_temp_c, args=official)
    queue = official.queue_size
    cls_queue = torch.rand(2, queue, embed)
    cpv_queue = official.n_tokens * torch.ones(queue, dtype=torch.int)
    centroids_queue = torch.rand(2, official.n_tokens * queue, embed)

    generator = torch.Generator().manual_seed(0)
    batches = [synthetic_views(preset["batch"], size, generator) for _ in range(args.warmup + args.steps)]
    loader = TimedBatches(batches)
    student_ddp = SingleProcessDDP(student)
    optimizer = torch.optim.AdamW(utils.get_params_groups(student_ddp))
    total = (args.epoch + 1) * len(loader)
    lr, wd, momentum = [5e-4] * total, [0.04] * total, [0.996] * total

    with contextlib.redirect_stdout(io.StringIO()):
        stats = train_one_epoch(student_ddp, teacher, teacher, loss, loader, optimizer, lr, wd, momentum, args.epoch,
                                None, clustering, official, centroids_queue, cls_queue, cpv_queue)
    ends = loader.handed_out[1:] + [time.perf_counter()]
    cpu_ends = loader.cpu_handed_out[1:] + [time.process_time()]
    step_seconds = [e - s for s, e in zip(loader.handed_out, ends)][args.warmup:]
    cpu_seconds = [e - s for s, e in zip(loader.cpu_handed_out, cpu_ends)][args.warmup:]
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"official, preset {args.preset}: {preset['arch']}/16, {size} px, batch {preset['batch']}, "
          f"K {preset['clusters']}, queue {queue} images, heads {args.out_dim}, epoch {args.epoch}, "
          f"{args.threads} threads, host allocator: {allocator}")
    print(f"cycle-consistent {stats['bootstrap_centroid_ratio']:.2f} (mean over all steps), "
          f"loss {stats['d_loss'] + stats['s_loss'] + stats['nn_loss']:.4f} (mean)")
    print(f"images/s {preset['batch'] * len(step_seconds) / sum(step_seconds):.2f}  "
          f"(median step {statistics.median(step_seconds) * 1000:.0f} ms over {len(step_seconds)} steps; "
          f"median CPU time {statistics.median(cpu_seconds):.2f} s/step, all threads)")
    print(f"peak RSS {peak_mib:.0f} MiB")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
