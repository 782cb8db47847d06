"""Two gloo processes enqueue different objects: their memory banks stay identical."""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cribo.method.memory_bank import ObjectMemoryBank
from cribo.train.distributed import all_gather_variable


def _worker(rank: int, world: int, init_file: str, results: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    bank = ObjectMemoryBank(4, 3, 5, generator=torch.Generator().manual_seed(0))
    for step in range(3):
        g = torch.Generator().manual_seed(100 * rank + step)
        counts = torch.randint(0, 4, (2,), generator=g) if rank == 0 else torch.tensor([3, 1])
        objs1 = torch.randn(int(counts.sum()), 5, generator=g)
        objs2 = objs1 + 1
        bank.retrieve(objs1, objs2) if len(objs1) else None
        bank.enqueue(all_gather_variable(objs1), all_gather_variable(objs2), all_gather_variable(counts))
    torch.save(bank.state_dict(), os.path.join(results, f"bank{rank}.pt"))
    dist.destroy_process_group()


def test_banks_identical_on_two_processes(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"bank{r}.pt") for r in (0, 1))
    assert torch.equal(a["entries"], b["entries"]) and torch.equal(a["counts"], b["counts"])
    assert int(a["head"]) == int(b["head"])
    # the newest image comes from rank 1's batch ([3, 1] objects, rank 1 gathered last)
    assert a["counts"][0].item() == 1 and a["counts"][1].item() == 3
