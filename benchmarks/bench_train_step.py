"""One CrIBo training step on the CPU: images/s, peak RSS and where the time goes.

The loop is the engine's (``cribo_step``, backward, last-layer freeze, AdamW, EMA), on synthetic
views (normal pixels; position maps of random crops of a twice-as-large original), with the
cross-image term on (``--epoch 1``) and a bank already full of random entries, as in the
official code's first steps. Phases are timed by wrapping the functions that do them:

- data: making the two views and position maps;
- backbone: ``forward_features`` of the teacher and the student;
- clustering: joint Sinkhorn clustering of the teacher tokens;
- bank: retrieval with the cycle check, and the enqueue;
- heads: the DINO heads ([CLS] and object last layers, teacher and student);
- losses: the three terms and the centre updates;
- backward, optimizer (AdamW step), ema (teacher update);
- other: the rest of ``cribo_step`` (object means, position pooling, casts).

On a shared machine wall time depends on the other jobs; the CPU time per step (all threads,
``time.process_time``) depends on them much less, so both are printed.

Presets (``--preset``): ``issue`` = ViT-Ti/16, 96 px crops, batch 16, K = 8, queue 256 images,
65536-wide heads (issue 14's shapes); ``vits-k32`` / ``vits-k64`` = the released ViT-S/16 heads at
224 px with K = 32 / 64 (batch ``--batch``, 8 by default there: the released 32-128 per GPU do
not fit a 2-core step budget). Any preset value can be overridden by its flag.

Usage: python benchmarks/bench_train_step.py [--preset issue] [--steps 5 --warmup 2 --threads 2]
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import statistics
import time
from collections import defaultdict
from types import SimpleNamespace

import torch

import cribo.method.cribo as cribo_module
from cribo.method.base import Method
from cribo.method.cribo import ClusteringSettings, ObjectNet, cribo_step
from cribo.method.losses import CrIBoLoss
from cribo.method.memory_bank import ObjectMemoryBank
from cribo.models.backbones import build_vit
from cribo.models.heads import DINOHead, cancel_last_layer_gradients
from cribo.train import engine
from cribo.train.host_memory import keep_freed_host_memory

try:
    from cribo.train.host_memory import FragmentationGuard
except ImportError:  # a commit before the guard
    FragmentationGuard = None

try:
    from cribo.models import fast_linear
except ImportError:  # a commit before the oneDNN products
    fast_linear = None


@contextlib.contextmanager
def onednn_disabled():
    """Every product through torch's own kernels (all there is before the oneDNN commit)."""
    if fast_linear is None:
        yield
        return
    enabled, fast_linear.ENABLED = fast_linear.ENABLED, False
    try:
        yield
    finally:
        fast_linear.ENABLED = enabled

PRESETS = {
    "issue": dict(arch="vit_tiny", img=96, batch=16, clusters=8, queue=256, pos_alpha=1.0),
    "vits-k32": dict(arch="vit_small", img=224, batch=8, clusters=32, queue=256, pos_alpha=1.0),
    "vits-k64": dict(arch="vit_small", img=224, batch=8, clusters=64, queue=256, pos_alpha=2.0),
}
PHASES = ("data", "backbone", "clustering", "bank", "heads", "losses", "other", "backward", "optimizer", "ema")


class PhaseClock:
    """Accumulates exclusive wall seconds per phase: a timed call inside another is charged to itself only."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self._children: list[float] = []  # per open phase, seconds spent in phases nested in it

    @contextlib.contextmanager
    def phase(self, name: str):
        self._children.append(0.0)
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            self.seconds[name] += elapsed - self._children.pop()
            if self._children:
                self._children[-1] += elapsed

    def wrap(self, owner, attribute: str, name: str) -> None:
        """Time every call of ``owner.attribute`` as phase ``name`` (skipped if the attribute does not exist)."""
        original = getattr(owner, attribute, None)
        if original is None:
            return

        def timed(*args, **kwargs):
            with self.phase(name):
                return original(*args, **kwargs)

        setattr(owner, attribute, timed)


def synthetic_views(batch: int, size: int, generator: torch.Generator):
    """Two ``B x 3 x S x S`` views and their ``B x 2 x S x S`` (x, y) maps into a ``2S x 2S`` original."""
    views, positions = [], []
    axis = torch.arange(size, dtype=torch.float32) + 0.5
    for _ in range(2):
        views.append(torch.randn(batch, 3, size, size, generator=generator))
        side = size * (0.5 + 1.5 * torch.rand(batch, 1, 1, generator=generator))  # crop side in original pixels
        corner = (2 * size - side)[:, None] * torch.rand(batch, 2, 1, 1, generator=generator)
        scale = side / size
        xs = corner[:, 0] + axis[None, None, :] * scale  # B x 1 x S
        ys = corner[:, 1] + axis[None, :, None] * scale  # B x S x 1
        positions.append(torch.stack([xs.expand(-1, size, -1), ys.expand(-1, -1, size)], dim=1))
    return views, positions


def param_groups(model: torch.nn.Module) -> list[dict]:
    """The optimiser groups the engine gives CrIBo (weights decayed, biases and norms not): the method
    interface's own rule, applied to the benchmark's network."""
    return Method.param_groups(SimpleNamespace(student=model, cfg={"optim": {"decay_all_parameters": False}}))


# the kernels of every matrix product a step runs (torch's own and the oneDNN inner products of fast_linear)
MATMUL_KERNELS = frozenset({"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "mkldnn::_linear_pointwise"})


def profile_matmuls(train_step, steps: int) -> tuple[float, float]:
    """``(ms in matrix-product kernels, ms in all)`` per step over ``steps`` profiled calls of ``train_step``.

    Wall time per step includes the profiler's overhead; the products' self time is that of the kernels, which
    the profiler barely slows: their sum is the step's floor at these kernels' speed, whatever else is fused."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            train_step()
        elapsed = time.perf_counter() - start
    matmul_us = sum(event.self_cpu_time_total for event in prof.key_averages() if event.key in MATMUL_KERNELS)
    return matmul_us / 1000 / steps, elapsed * 1000 / steps


def build(args):
    model_cfg = {"arch": args.arch, "patch_size": 16, "img_size": args.img}

    def make(drop_path: float) -> ObjectNet:
        backbone = build_vit(model_cfg, drop_path_rate=drop_path)
        head = DINOHead(backbone.embed_dim, args.out_dim, norm_last_layer=False, object_out_dim=args.out_dim)
        return ObjectNet(backbone, head)

    torch.manual_seed(0)
    student, teacher = make(0.1), make(0.0)
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad = False
    loss_fn = CrIBoLoss(args.out_dim, args.out_dim, [0.04] * (args.epoch + 1))
    bank = ObjectMemoryBank(args.queue, args.clusters, student.backbone.embed_dim,
                            generator=torch.Generator().manual_seed(0))
    if hasattr(engine, "build_optimizer") and not args.plain_adamw:  # the engine's optimizer
        optimizer = engine.build_optimizer({"optim": {"optimizer": "adamw"}}, param_groups(student),
                                           torch.device("cpu"))
    else:
        optimizer = torch.optim.AdamW(param_groups(student))
    for group in optimizer.param_groups:
        group["lr"] = 5e-4
    settings = ClusteringSettings(args.clusters, args.pos_alpha)
    return student, teacher, loss_fn, bank, optimizer, settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="issue")
    for key in ("arch", "img", "batch", "clusters", "queue", "pos_alpha"):
        parser.add_argument(f"--{key.replace('_', '-')}", type=type(PRESETS["issue"][key]), default=None)
    parser.add_argument("--out-dim", type=int, default=65536)
    parser.add_argument("--epoch", type=int, default=1, help="1 or more: the cross-image term is on")
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--plain-adamw", action="store_true", help="torch's default AdamW, not the engine's")
    parser.add_argument("--default-allocator", action="store_true",
                        help="leave glibc's allocator as it is (the engine keeps freed host memory, see "
                             "cribo.train.host_memory; train.keep_freed_host_memory)")
    parser.add_argument("--count-flops", action="store_true",
                        help="after the timed steps, count one step's FLOPs (torch's FlopCounterMode: matmuls, "
                             "convolutions and attention, forward and backward) and the rate the median step achieved")
    parser.add_argument("--profile-matmuls", type=int, default=0, metavar="STEPS",
                        help="after the timed steps, run STEPS more under torch's profiler and print the time per step "
                             "in matrix-product kernels (the step's floor) against the rest")
    args = parser.parse_args()
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    torch.set_num_threads(args.threads)
    allocator = "glibc default" if args.default_allocator else (
        "freed memory kept" if keep_freed_host_memory() else "default (not glibc)")
    # as the engine: fragmentation of the kept memory is bounded (absent before that commit)
    memory_guard = None if args.default_allocator or FragmentationGuard is None else FragmentationGuard()

    student, teacher, loss_fn, bank, optimizer, settings = build(args)
    clock = PhaseClock()
    for net in (student, teacher):
        clock.wrap(net.backbone, "forward_features", "backbone")
        for name in ("forward", "forward_objects", "forward_pair", "forward_pair_with_scales"):
            clock.wrap(net.head, name, "heads")
    clock.wrap(cribo_module, "joint_view_clustering", "clustering")
    clock.wrap(bank, "retrieve", "bank")
    clock.wrap(bank, "enqueue", "bank")
    clock.wrap(loss_fn, "forward", "losses")
    clock.wrap(loss_fn, "forward_sorted", "losses")
    momentum = 0.996
    generator = torch.Generator().manual_seed(0)

    step_seconds, cpu_seconds, objects, cycles = [], [], [], []

    def one_step():
        views, positions = synthetic_views(args.batch, args.img, generator)
        out = cribo_step(student, teacher, loss_fn, bank, views, positions, args.epoch, settings)
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        return out

    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            clock.seconds.clear()
        start, cpu_start = time.perf_counter(), time.process_time()
        with clock.phase("data"):
            views, positions = synthetic_views(args.batch, args.img, generator)
        with clock.phase("other"):
            out = cribo_step(student, teacher, loss_fn, bank, views, positions, args.epoch, settings)
        optimizer.zero_grad(set_to_none=True)
        with clock.phase("backward"):
            out["loss"].backward()
        cancel_last_layer_gradients(student, args.epoch, 1)
        with clock.phase("optimizer"):
            optimizer.step()
        with clock.phase("ema"):
            if hasattr(engine, "update_teacher"):  # the engine's EMA
                engine.update_teacher(zip(student.parameters(), teacher.parameters()), momentum)
            else:
                with torch.no_grad():
                    for p_s, p_t in zip(student.parameters(), teacher.parameters()):
                        p_t.mul_(momentum).add_(p_s.detach(), alpha=1 - momentum)
        if memory_guard is not None:
            memory_guard.after_step()
        if i >= args.warmup:
            step_seconds.append(time.perf_counter() - start)
            cpu_seconds.append(time.process_time() - cpu_start)
            objects.append(out["objects_per_image"])
            cycles.append(out["cycle_fraction"])

    total = sum(step_seconds)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"preset {args.preset}: {args.arch}/16, {args.img} px, batch {args.batch}, K {args.clusters}, "
          f"queue {args.queue} images, heads {args.out_dim}, epoch {args.epoch}, {args.threads} threads, "
          f"host allocator: {allocator}")
    print(f"objects/image {statistics.mean(objects):.1f}, cycle-consistent {statistics.mean(cycles):.2f}, "
          f"loss {out['loss'].item():.4f}")
    print(f"images/s {args.batch * len(step_seconds) / total:.2f}  "
          f"(median step {statistics.median(step_seconds) * 1000:.0f} ms over {len(step_seconds)} steps; "
          f"median CPU time {statistics.median(cpu_seconds):.2f} s/step, all threads)")
    trims = f" ({memory_guard.trims} heap trims by the fragmentation guard)" if memory_guard is not None else ""
    print(f"peak RSS {peak_mib:.0f} MiB{trims}")
    print("phase ms/step: " + "  ".join(f"{name} {clock.seconds[name] * 1000 / len(step_seconds):.1f}"
                                          for name in PHASES))
    if args.count_flops:
        from torch.utils.flop_counter import FlopCounterMode

        # the counter sees torch's own ops only, so the count runs the products through them
        with FlopCounterMode(display=False) as counter, onednn_disabled():
            one_step()
        gflop = counter.get_total_flops() / 1e9
        print(f"FLOPs per step (forward + backward, counted ops): {gflop:.1f} GFLOP; at the median step "
              f"{gflop / statistics.median(step_seconds):.1f} GFLOP/s")
    if args.profile_matmuls:
        def train_step():
            one_step()
            optimizer.step()
            engine.update_teacher(zip(student.parameters(), teacher.parameters()), momentum)

        matmul_ms, step_ms = profile_matmuls(train_step, args.profile_matmuls)
        print(f"matrix products {matmul_ms:.0f} ms/step, everything else {step_ms - matmul_ms:.0f} ms/step "
              f"(torch profiler over {args.profile_matmuls} steps of {step_ms:.0f} ms: its own overhead included)")


if __name__ == "__main__":
    main()
