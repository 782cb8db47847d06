"""Nearest-neighbour search over a large memory of L2-normalised patch features.

The in-context memory of the full protocol is 10,240,000 entries: ViT-S features are 15.7 GB in
float32, and a float32 faiss ``IndexFlatIP`` needs that much again while it is built. Here the
memory stays in float16 (half the bytes) and the exact search runs over float32 slices of it,
converted one slice at a time: ``faiss.knn`` (BLAS matrix product plus heap selection) on CPU, or
``torch`` matmul and ``topk`` on a GPU; the per-slice top-k lists are merged. Converting a slice
costs ``rows x D`` operations against ``2 x queries x rows x D`` for its product, negligible for
query batches of thousands. An approximate IVF-PQ index (``faiss.IndexIVFPQ``, about 1/8 of the
float16 bytes with ``D/4`` sub-quantisers of 8 bits) is the option for memories larger than RAM,
at the cost of exactness.

Every searcher has ``d`` (the dimension) and ``search(queries Q x D float32, k) -> (Q x k
similarities, Q x k indices)``, most similar first, like a faiss index.
"""

from __future__ import annotations

import faiss
import numpy as np
import torch


class ExactFP16Search:
    """Exact inner-product search over an ``M x D`` float16 memory, slice by slice."""

    def __init__(self, memory: np.ndarray, slice_rows: int = 1 << 20, device: str | torch.device = "cpu",
                 normalise: bool = True):
        if memory.ndim != 2:
            raise ValueError(f"memory must be M x D, got shape {memory.shape}")
        self.memory = memory if memory.dtype == np.float16 else memory.astype(np.float16)
        self.d = memory.shape[1]
        self.ntotal = memory.shape[0]
        self.slice_rows = slice_rows
        self.device = torch.device(device)
        # float16 rounding leaves norms at 1 +- 5e-4: re-normalised slices give exact cosines
        self.normalise = normalise
        # a memory of one slice is converted once and kept (its float32 copy is at most one slice)
        self._cached = self._slice(0) if self.ntotal <= slice_rows else None

    def _slice(self, start: int) -> np.ndarray:
        block = np.array(self.memory[start:start + self.slice_rows], dtype=np.float32, order="C")
        if self.normalise:
            norms = np.sqrt(np.einsum("ij,ij->i", block, block))  # no rows x D temporary
            block /= np.maximum(norms, np.float32(1e-6))[:, None]
        return block

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        best_sims = best_idx = None
        for start in range(0, self.ntotal, self.slice_rows):
            block = self._cached if self._cached is not None else self._slice(start)
            kk = min(k, block.shape[0])
            if self.device.type == "cuda":
                sims, idx = self._search_torch(queries, block, kk)
            else:
                sims, idx = faiss.knn(queries, block, kk, metric=faiss.METRIC_INNER_PRODUCT)
            idx = idx + start
            if best_sims is None:
                best_sims, best_idx = sims, idx
            else:
                best_sims, best_idx = _merge(best_sims, best_idx, sims, idx, k)
        return best_sims, best_idx

    def _search_torch(self, queries: np.ndarray, block: np.ndarray, k: int):
        q = torch.from_numpy(queries).to(self.device)
        b = torch.from_numpy(block).to(self.device)
        sims, idx = (q @ b.T).topk(k, dim=1)
        return sims.cpu().numpy(), idx.cpu().numpy().astype(np.int64)


def _merge(sims_a, idx_a, sims_b, idx_b, k):
    sims = np.concatenate([sims_a, sims_b], axis=1)
    idx = np.concatenate([idx_a, idx_b], axis=1)
    top = torch.from_numpy(sims).topk(min(k, sims.shape[1]), dim=1)
    return top.values.numpy(), np.take_along_axis(idx, top.indices.numpy(), axis=1)


class IVFPQSearch:
    """Approximate search: IVF with ``nlist`` cells and product quantisation, ``nprobe`` cells visited."""

    def __init__(self, memory: np.ndarray, nlist: int | None = None, nprobe: int = 32, sub_quantizers: int | None = None,
                 train_size: int | None = None, seed: int = 0, add_rows: int = 1 << 20):
        m, d = memory.shape
        self.d, self.ntotal = d, m
        nlist = nlist or max(1, min(int(4 * np.sqrt(m)), m // 39))
        sub = sub_quantizers or max(1, d // 4)
        while d % sub:
            sub -= 1
        quantizer = faiss.IndexFlatIP(d)
        self.index = faiss.IndexIVFPQ(quantizer, d, nlist, sub, 8, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(seed)
        sample = rng.choice(m, size=min(m, train_size or max(256 * nlist, 10_000)), replace=False)
        self.index.train(np.ascontiguousarray(memory[np.sort(sample)], dtype=np.float32))
        for start in range(0, m, add_rows):
            self.index.add(np.ascontiguousarray(memory[start:start + add_rows], dtype=np.float32))
        self.index.nprobe = min(nprobe, nlist)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)


def make_searcher(memory: np.ndarray, kind: str = "exact", device: str | torch.device = "cpu", **options):
    """``kind``: ``exact`` (:class:`ExactFP16Search`) or ``ivfpq`` (:class:`IVFPQSearch`)."""
    if kind == "exact":
        return ExactFP16Search(memory, device=device, **options)
    if kind == "ivfpq":
        return IVFPQSearch(memory, **options)
    raise ValueError(f"unknown index kind {kind!r}; use exact or ivfpq")
