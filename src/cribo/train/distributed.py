"""Process-group setup from the launcher's environment, and the collectives training needs.

The same entry point runs in three ways:

- a plain process (laptop, one GPU, a test): a world of one, no process group;
- under ``torchrun`` (one node, many GPUs): ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` and
  ``MASTER_ADDR``/``MASTER_PORT`` are set by the launcher;
- under ``srun`` with one task per GPU (many nodes): rank and world come from ``SLURM_PROCID``,
  ``SLURM_NTASKS`` and ``SLURM_LOCALID``; the master is the first host of ``SLURM_JOB_NODELIST``
  (expanded with ``scontrol show hostnames``) unless ``MASTER_ADDR`` is set, the port
  ``MASTER_PORT`` or one derived from the job id (two jobs sharing a node do not collide).

NCCL is used when the process runs on CUDA and gloo otherwise, so CPU tests exercise the same
collectives as a GPU cluster.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in the job, as read from the environment."""

    launcher: str  # "single", "torchrun" or "srun"
    rank: int
    world_size: int
    local_rank: int
    master_addr: str | None = None
    master_port: int | None = None


def first_slurm_host(nodelist: str) -> str:
    """The first host name of a Slurm node list such as ``gpu[03-05,07],big01``."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True,
                             capture_output=True, text=True).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.CalledProcessError):
        pass
    # scontrol missing (e.g. tests): expand the first entry by hand
    first = nodelist.split(",")[0]
    if "[" in first:
        prefix, ranges = first.split("[", 1)
        return prefix + ranges.rstrip("]").split(",")[0].split("-")[0]
    return first


def read_launch_env(env: Mapping[str, str] = os.environ) -> LaunchEnv:
    """Rank, world size and rendezvous address from torchrun's or Slurm's variables (torchrun wins)."""
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv("torchrun", int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0")),
                         env.get("MASTER_ADDR"), int(env["MASTER_PORT"]) if "MASTER_PORT" in env else None)
    ntasks = int(env.get("SLURM_NTASKS", "1"))
    # SLURM_STEP_NUM_TASKS guards against a batch script's own environment (ntasks > 1, but one process)
    if ntasks > 1 and "SLURM_PROCID" in env and int(env.get("SLURM_STEP_NUM_TASKS", ntasks)) == ntasks:
        addr = env.get("MASTER_ADDR") or first_slurm_host(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "localhost")))
        port = int(env.get("MASTER_PORT", 20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
        return LaunchEnv("srun", int(env["SLURM_PROCID"]), ntasks, int(env.get("SLURM_LOCALID", "0")), addr, port)
    return LaunchEnv("single", 0, 1, 0)


def pick_device(requested: str, local_rank: int = 0) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda was requested but CUDA is not available; use train.device=auto or cpu")
    if requested in ("cuda", "auto") and torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init_distributed(requested_device: str = "auto", env: Mapping[str, str] = os.environ) -> DistInfo:
    launch = read_launch_env(env)
    device = pick_device(requested_device, launch.local_rank)
    if launch.world_size > 1 and not dist.is_initialized():
        if launch.master_addr is not None:
            os.environ["MASTER_ADDR"] = launch.master_addr
        if launch.master_port is not None:
            os.environ["MASTER_PORT"] = str(launch.master_port)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", init_method="env://",
                                rank=launch.rank, world_size=launch.world_size)
    return DistInfo(launch.rank, launch.world_size, launch.local_rank, device)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_gather_variable(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate a tensor over processes along dim 0; sizes may differ (padded, then trimmed).

    In a world of one, returns the tensor unchanged.
    """
    if not is_distributed():
        return tensor
    size = torch.tensor([tensor.shape[0]], device=tensor.device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros((longest, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded)
    return torch.cat([g[: int(s.item())] for g, s in zip(gathered, sizes)])


def all_gather_objects(obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]``; ``[obj]`` in a world of one."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
