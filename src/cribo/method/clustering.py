"""Joint-view online clustering of patch tokens into objects (CrOC / CrIBo), without the 4-D tensor.

The teacher's last-layer tokens of both views of an image (``2N`` tokens) are clustered together
into ``K`` objects by a few rounds of optimal transport: the cost of assigning token ``n`` to
cluster ``k`` mixes semantic dissimilarity (``-cos(z_n, centroid_k)``) with a spatial term, the
distance in original-image pixels from token ``n`` to the nearest other member of cluster ``k``
(single linkage). Because both views' tokens carry original-image coordinates, tokens that see the
same place in the two views tend to land in the same cluster; a cluster present in only one view
is discarded.

No library implements this (it is specific to CrOC/CrIBo), hence the hand-written code. It
reproduces the official computation step for step, including its quirks:

- the spatial term of a token whose cluster has no member at a positive distance (the seed
  itself, an empty cluster) is replaced by the mean spatial term of the image;
- the spatial term is divided by its per-image maximum;
- the total cost is min-max normalised over the *whole batch*, not per image;
- Sinkhorn outputs NaN -> 1e-8; hard assignment = every cluster reaching the row maximum;
- the column marginal is re-estimated from the hard assignment counts (+0.01) each round.

The official code materialises the single-linkage term as a ``B x 2N x 2N x K`` tensor (2.5 GB at
B=128, N=196, K=32). :func:`position_cost` computes the same minimum over clusters in chunks of
``K``, so its peak is ``B x 2N x 2N x chunk``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cribo.method.dtypes import at_least_fp32


def pairwise_distances(positions: torch.Tensor) -> torch.Tensor:
    """Euclidean distances ``B x T x T`` between token positions ``B x T x 2``."""
    # the exact (non-matmul) formula: tokens at the same place must be at distance exactly 0
    return torch.cdist(positions, positions, compute_mode="donot_use_mm_for_euclid_dist")


def position_cost(positions: torch.Tensor, assignment: torch.Tensor, chunk: int = 4) -> torch.Tensor:
    """Single-linkage spatial cost ``B x T x K`` of each token to each cluster, scaled to max 1 per image.

    ``P[b, n, k] = min over m with D[b,n,m] * A[b,m,k] > 0 of D[b,n,m] * A[b,m,k]``; where no such m
    exists the entry is the image's mean of P (zeros included), as in the official code.

    Args:
        positions: ``B x T x 2`` original-image coordinates of the tokens.
        assignment: ``B x T x K`` cluster weights (one-hot for hard assignments).
        chunk: clusters processed at once for soft assignments; the peak memory is ``B x T x T x chunk``
            floats (hard assignments take a scatter-min over ``B x T x T``).
    """
    dist = pairwise_distances(positions)  # B x T x T
    if bool(((assignment == 0) | (assignment == 1)).all()) and float(assignment.sum(dim=-1).max()) <= 1:
        nearest = _nearest_member_hard(dist, assignment)
    else:
        nearest = _nearest_member(dist, assignment, chunk)
    cost = torch.where(torch.isinf(nearest), torch.zeros_like(nearest), nearest)
    mean = cost.mean(dim=(1, 2), keepdim=True).expand_as(cost)
    cost = torch.where(cost == 0, mean, cost)
    return cost / cost.amax(dim=(1, 2), keepdim=True)


def _nearest_member(dist: torch.Tensor, assignment: torch.Tensor, chunk: int) -> torch.Tensor:
    """``min over m of D[b,n,m] * A[b,m,k]`` among the positive products (inf if none), ``B x T x K``."""
    b, t, k = assignment.shape
    nearest = torch.empty(b, t, k, dtype=dist.dtype, device=dist.device)
    for start in range(0, k, chunk):
        weighted = dist[..., None] * assignment[:, None, :, start:start + chunk]  # B x T(n) x T(m) x c
        nearest[..., start:start + chunk] = weighted.masked_fill(weighted <= 0, float("inf")).amin(dim=2)
    return nearest


def _nearest_member_hard(dist: torch.Tensor, assignment: torch.Tensor) -> torch.Tensor:
    """:func:`_nearest_member` when every token weighs 1 in at most one cluster (hard assignments).

    The products are then the distances themselves, so one scatter-min over the tokens ``m`` gives
    every cluster's nearest member: ``B x T x T`` work instead of ``B x T x T x K``, the same values
    (a minimum is exact).
    """
    b, t, k = assignment.shape
    far = dist.masked_fill((dist <= 0) | ~(assignment > 0).any(dim=-1)[:, None, :], float("inf"))
    index = assignment.argmax(dim=-1)[:, None, :].expand(-1, t, -1)  # B x T(n) x T(m): the cluster of m
    nearest = torch.full((b, t, k), float("inf"), dtype=dist.dtype, device=dist.device)
    return nearest.scatter_reduce_(2, index, far, "amin")


def sinkhorn(cost: torch.Tensor, row_marginal: torch.Tensor, col_marginal: torch.Tensor, lam: float,
             iterations: int) -> torch.Tensor:
    """Entropic optimal transport plan ``B x T x K`` for ``cost`` ``B x T x K``.

    Starts from ``exp(-lam * cost)`` normalised to sum 1 per image, then alternately rescales rows
    to ``row_marginal`` (``B x T x 1``) and columns to ``col_marginal`` (``B x 1 x K``).
    """
    plan = torch.exp(-lam * cost)
    plan = plan / plan.sum(dim=(1, 2), keepdim=True)
    for _ in range(iterations):
        plan = plan * (row_marginal / plan.sum(dim=2, keepdim=True))
        plan = plan * (col_marginal / plan.sum(dim=1, keepdim=True))
    return torch.nan_to_num(plan, nan=1e-8)


def hard_assignment(plan: torch.Tensor) -> torch.Tensor:
    """One-hot ``B x T x K``: 1 where a token's weight equals its row maximum (ties keep all)."""
    return (plan == plan.amax(dim=-1, keepdim=True)).to(plan.dtype)


def sample_seeds(batch: int, tokens: int, clusters: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``B x K`` distinct token indices drawn uniformly: the initial centroids."""
    if clusters > tokens:
        raise ValueError(f"cannot seed {clusters} clusters from {tokens} tokens")
    weights = torch.ones(batch, tokens)
    return torch.multinomial(weights, clusters, replacement=False, generator=generator)


@torch.no_grad()
def joint_view_clustering(tokens: torch.Tensor, positions: torch.Tensor, num_clusters: int, pos_alpha: float,
                          lam: float = 20.0, sinkhorn_iterations: int = 5, rounds: int = 5, hard: bool = True,
                          update_marginal: bool = True, seeds: torch.Tensor | None = None,
                          generator: torch.Generator | None = None, chunk: int = 4) -> torch.Tensor:
    """Cluster the ``2N`` tokens of both views of each image into ``K`` objects.

    Args:
        tokens: ``B x 2N x D`` teacher last-layer tokens, view 1 then view 2 (normalised here).
        positions: ``B x 2N x 2`` their original-image coordinates.
        num_clusters: ``K``.
        pos_alpha: weight of the spatial term.
        lam, sinkhorn_iterations: entropic regularisation and iterations of Sinkhorn.
        rounds: alternations of assignment and centroid update.
        hard: return (and iterate with) one-hot assignments; else the transport plans.
        update_marginal: re-estimate the cluster marginal from hard assignment counts.
        seeds: ``B x K`` token indices of the initial centroids (else sampled).

    Returns:
        ``B x 2N x K`` assignment (fp32).
    """
    tokens = F.normalize(at_least_fp32(tokens), dim=-1)
    positions = positions.to(tokens.dtype)
    b, t, _ = tokens.shape
    if seeds is None:
        seeds = sample_seeds(b, t, num_clusters, generator).to(tokens.device)
    assignment = F.one_hot(seeds, t).to(tokens.dtype).transpose(1, 2)  # B x T x K
    centroids = torch.gather(tokens, 1, seeds[..., None].expand(-1, -1, tokens.shape[-1]))  # B x K x D
    row = torch.full((b, t, 1), 1.0 / t, device=tokens.device)
    col = torch.full((b, 1, num_clusters), 1.0 / num_clusters, device=tokens.device)
    for _ in range(rounds):
        similarity = tokens @ centroids.transpose(1, 2)  # B x T x K
        cost = -similarity + pos_alpha * position_cost(positions, assignment, chunk)
        cost = (cost - cost.min()) / (cost.max() - cost.min())  # over the whole batch, as the official code
        plan = sinkhorn(cost, row, col, lam, sinkhorn_iterations)
        one_hot = hard_assignment(plan)
        assignment = one_hot if hard else plan
        if update_marginal:
            col = one_hot.sum(dim=1, keepdim=True) + 1e-2
            col = col / col.sum(dim=-1, keepdim=True)
        centroids = F.normalize(assignment.transpose(1, 2) @ tokens, dim=-1)
    return assignment


def object_vectors(tokens_view1: torch.Tensor, tokens_view2: torch.Tensor, assignment: torch.Tensor):
    """Per-view object vectors: means of the (un-normalised) tokens of each cluster.

    Args:
        tokens_view1, tokens_view2: ``B x N x D`` last-layer tokens of each view (teacher or student:
            the student reuses the teacher's assignment, so gradients flow through its tokens).
        assignment: ``B x 2N x K`` from :func:`joint_view_clustering` (view 1 rows first).

    Returns:
        ``(objects_view1, objects_view2, valid)``: ``M x D`` each for the ``M`` valid clusters, and the
        ``B x K`` boolean mask of clusters non-empty in both views (row-major, so objects of image 0
        come first).
    """
    n = tokens_view1.shape[1]
    w1, w2 = _column_normalise(assignment[:, :n]), _column_normalise(assignment[:, n:])
    # validity from the hard assignment of the per-view normalised weights, as the official code
    hard = hard_assignment(torch.cat([w1, w2], dim=1))
    valid = (hard[:, :n].sum(dim=1) > 0) & (hard[:, n:].sum(dim=1) > 0)
    obj1 = torch.einsum("bnk,bnd->bkd", w1.to(tokens_view1.dtype), tokens_view1)
    obj2 = torch.einsum("bnk,bnd->bkd", w2.to(tokens_view2.dtype), tokens_view2)
    return obj1[valid], obj2[valid], valid


def _column_normalise(weights: torch.Tensor) -> torch.Tensor:
    """Each cluster's weights over one view's tokens sum to 1 (empty clusters are left at 0)."""
    sums = weights.sum(dim=1, keepdim=True)
    return weights / torch.where(sums == 0, torch.ones_like(sums), sums)
