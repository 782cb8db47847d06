"""How a run's training processes are laid out on a cluster, from its ``train`` settings.

Two layouts, both one process per GPU:

- **torchrun** (single node): the job gets ``gpus_per_node`` GPUs on one node (``sbatch --gpus=N``,
  one task) and ``cribo train --nproc-per-node N`` relaunches itself under ``torchrun --standalone``.
- **srun** (any number of nodes): the job gets ``nodes`` nodes with ``gpus_per_node`` GPUs each
  (``--gres=gpu:G`` per node) and ``tasks_per_node`` tasks per node (``--ntasks-per-node``), and the
  command runs under ``srun``: one task per process, no torchrun; ``cribo train`` reads
  ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID`` and takes the allocation's first node as master.

``launcher: auto`` is srun when ``nodes > 1``, torchrun otherwise. The workflow trains srun-layout
runs with the rule ``pretrain_srun``, whose resources (read by snakemake-executor-plugin-slurm) come
from here; torchrun-layout runs keep the rule ``pretrain`` and its ``gpu`` resource.
"""

from __future__ import annotations

from cribo.config import ConfigError


def launch_layout(train_cfg: dict, source: str = "run config") -> dict:
    """``train`` section -> ``{"launcher": "torchrun" | "srun", "resources": {...}}``.

    ``resources`` holds only what the layout decides: ``gpu`` for torchrun when ``gpus_per_node``
    is set (otherwise the pretrain rule's own ``gpu``, from the SLURM profile or the command line);
    ``nodes``, ``tasks_per_node``, ``mpi`` and, with GPUs, the per-node ``gres`` for srun.
    """
    nodes, gpus = train_cfg.get("nodes", 1), train_cfg.get("gpus_per_node")
    launcher = train_cfg.get("launcher", "auto")
    if launcher == "auto":
        launcher = "srun" if nodes > 1 else "torchrun"
    if launcher == "torchrun":
        if nodes > 1:
            raise ConfigError(f"{source}: train.nodes={nodes} with train.launcher=torchrun; torchrun here is "
                              "single-node: use launcher srun (or auto) for several nodes")
        return {"launcher": "torchrun", "resources": {} if gpus is None else {"gpu": gpus}}
    tasks = train_cfg.get("tasks_per_node") or gpus or 1
    if gpus and tasks != gpus:
        raise ConfigError(f"{source}: train.tasks_per_node={tasks} but train.gpus_per_node={gpus}; "
                          "the srun layout runs one process per GPU")
    if tasks < 2:
        raise ConfigError(f"{source}: the srun layout needs at least 2 processes per node (the Slurm executor "
                          f"plugin's MPI rule), got {tasks}; for one GPU per node use gpus_per_node >= 2 or "
                          "a single-node torchrun run")
    resources = {"nodes": nodes, "tasks_per_node": tasks, "mpi": "srun"}
    if gpus:
        resources["gres"] = f"gpu:{gpus}"  # per node (`gpu` would be per job)
    return {"launcher": "srun", "resources": resources}
