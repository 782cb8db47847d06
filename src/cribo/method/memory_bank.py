"""CrIBo's object memory bank and its cycle-consistent nearest-neighbour retrieval.

The bank stores, for the last ``Q`` images, the teacher's object vectors of both views as *paired*
entries (row ``j`` of slot 0 is view 1 of an object, row ``j`` of slot 1 is view 2 of the same
object). Images contribute a variable number of objects, so the bank keeps a FIFO of per-image
object counts; the valid rows are the most recent ``sum(counts)`` rows. As in the official code,
it starts full of ``U(0, 1)`` vectors with ``K`` objects per image, is identical on every process
(callers enqueue all-gathered objects), and retrieval happens before enqueueing, so a batch never
retrieves itself.

Differences from the official implementation that do not change results: a ring buffer instead
of shifting the whole bank every step, and an L2-normalised copy kept up to date row by row
instead of renormalising the whole bank at every step.

Retrieval of a query object ``q1[k]`` (view 1) is cycle-consistent when its nearest bank entry
(among view-1 entries) leads, through that entry's view-2 twin, back to ``q2[k]`` as the nearest
of the current batch's view-2 objects; symmetrically for view 2. Only cycle-consistent pairs feed
the cross-image loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Retrieval:
    """Nearest bank entries of a batch's objects (``M`` objects, ``k`` neighbours, ``D`` dims).

    ``nn_view1``: ``2 x M x k x D`` bank rows (both views, un-normalised) nearest to ``q1`` among
    view-1 entries, most similar first; ``nn_view2`` likewise for ``q2`` among view-2 entries;
    ``cycle1``/``cycle2``: ``M x k`` booleans, the cycle check of each neighbour.
    """

    nn_view1: torch.Tensor
    nn_view2: torch.Tensor
    cycle1: torch.Tensor
    cycle2: torch.Tensor


class ObjectMemoryBank:
    def __init__(self, num_images: int, max_objects: int, dim: int, device: torch.device | str = "cpu",
                 generator: torch.Generator | None = None):
        if num_images < 1 or max_objects < 1:
            raise ValueError(f"num_images ({num_images}) and max_objects ({max_objects}) must be >= 1")
        self.num_images, self.max_objects, self.dim = num_images, max_objects, dim
        self.capacity = num_images * max_objects
        self.entries = torch.rand(2, self.capacity, dim, generator=generator).to(device)  # 2 x C x D
        self.normed = F.normalize(self.entries, dim=-1)
        self.counts = torch.full((num_images,), max_objects, dtype=torch.long)  # newest first
        self.head = 0  # next row to write; the newest rows end just before it

    @property
    def num_valid(self) -> int:
        return int(self.counts.sum())

    def valid_rows(self) -> torch.Tensor:
        """Indices of the valid rows, newest first."""
        return (self.head - 1 - torch.arange(self.num_valid)) % self.capacity

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"entries": self.entries.cpu(), "counts": self.counts.clone(), "head": torch.tensor(self.head)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if tuple(state["entries"].shape) != tuple(self.entries.shape):
            raise ValueError(f"memory bank of shape {tuple(state['entries'].shape)} cannot be loaded into one of "
                             f"shape {tuple(self.entries.shape)} (queue_size, num_clusters or width differ)")
        self.entries = state["entries"].to(self.entries.device)
        self.normed = F.normalize(self.entries, dim=-1)
        self.counts = state["counts"].clone()
        self.head = int(state["head"])

    @torch.no_grad()
    def enqueue(self, objects_view1: torch.Tensor, objects_view2: torch.Tensor, counts: torch.Tensor) -> None:
        """Add ``M x D`` paired objects of a batch of images holding ``counts`` (``B``) objects each.

        Images are ordered as in ``counts``; after the call the last image of the batch is the newest.
        """
        counts = counts.to("cpu", torch.long)
        if int(counts.sum()) != objects_view1.shape[0] or objects_view1.shape != objects_view2.shape:
            raise ValueError(f"{objects_view1.shape[0]} objects given for counts summing to {int(counts.sum())}")
        if counts.numel() and int(counts.max()) > self.max_objects:
            raise ValueError(f"an image has {int(counts.max())} objects, more than max_objects={self.max_objects}")
        # only the newest num_images images can stay: older ones of this batch are dropped at once
        keep_images = min(len(counts), self.num_images)
        new_rows = int(counts[len(counts) - keep_images:].sum())
        new1, new2 = objects_view1[objects_view1.shape[0] - new_rows:], objects_view2[objects_view2.shape[0] - new_rows:]
        rows = (self.head + torch.arange(new_rows)) % self.capacity
        entries = torch.stack([new1, new2]).to(self.entries.dtype)
        self.entries[:, rows.to(self.entries.device)] = entries
        self.normed[:, rows.to(self.entries.device)] = F.normalize(entries, dim=-1)
        self.head = (self.head + new_rows) % self.capacity
        self.counts = torch.cat([counts[len(counts) - keep_images:].flip(0), self.counts])[: self.num_images]

    def valid_segments(self) -> list[tuple[int, int]]:
        """The valid rows as at most two contiguous ``(start, end)`` ranges of the ring (oldest first)."""
        first = self.head - self.num_valid
        if first >= 0:
            return [(first, self.head)] if self.num_valid else []
        return [(self.capacity + first, self.capacity), (0, self.head)] if self.head else [(self.capacity + first, self.capacity)]

    @torch.no_grad()
    def retrieve(self, q1: torch.Tensor, q2: torch.Tensor, top_k: int = 1, chunk: int = 65536) -> Retrieval:
        """Top-k neighbours of ``M x D`` objects ``q1`` (view 1) and ``q2`` (view 2), with cycle checks.

        The official method uses ``top_k = 1``.
        """
        if top_k > self.num_valid:
            raise ValueError(f"top_k = {top_k} but the bank holds {self.num_valid} valid entries")
        q1n, q2n = F.normalize(q1.to(self.normed.dtype), dim=-1), F.normalize(q2.to(self.normed.dtype), dim=-1)
        segments = self.valid_segments()
        j1 = _top_k(q1n, self.normed[0], segments, chunk, top_k)  # M x k
        j2 = _top_k(q2n, self.normed[1], segments, chunk, top_k)
        if q1.shape[0] == 0:  # a batch without objects: nothing to check (argmax over 0 candidates is undefined)
            none = torch.zeros(0, top_k, dtype=torch.bool, device=q1.device)
            return Retrieval(self.entries[:, j1], self.entries[:, j2], none, none.clone())
        own = torch.arange(q1.shape[0], device=q1.device)[:, None]
        # cycle 1: view-1 neighbour -> its view-2 twin -> the nearest current view-2 object must be q2[m]
        cycle1 = (self.normed[1, j1] @ q2n.T).argmax(dim=-1) == own
        cycle2 = (self.normed[0, j2] @ q1n.T).argmax(dim=-1) == own
        return Retrieval(self.entries[:, j1], self.entries[:, j2], cycle1, cycle2)


def _top_k(queries: torch.Tensor, bank: torch.Tensor, segments: list[tuple[int, int]], chunk: int,
           k: int) -> torch.Tensor:
    """``M x k`` row indices of each query's most similar bank rows, scanning contiguous slices (no copies)."""
    best_sim = torch.full((queries.shape[0], k), -float("inf"), device=queries.device)
    best_row = torch.zeros((queries.shape[0], k), dtype=torch.long, device=queries.device)
    for seg_start, seg_end in segments:
        for start in range(seg_start, seg_end, chunk):
            sims = queries @ bank[start:min(start + chunk, seg_end)].T  # M x chunk
            value, pos = sims.topk(min(k, sims.shape[1]), dim=1)
            merged_sim = torch.cat([best_sim, value], dim=1)
            merged_row = torch.cat([best_row, pos + start], dim=1)
            best_sim, order = merged_sim.topk(k, dim=1)
            best_row = torch.gather(merged_row, 1, order)
    return best_row
