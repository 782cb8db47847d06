"""Joint-view clustering: Sinkhorn marginals, the single-linkage spatial cost by hand, assignments."""

import pytest
import torch

from cribo.method.clustering import (_nearest_member, _nearest_member_hard, joint_view_clustering, object_vectors,
                                     pairwise_distances, position_cost, sinkhorn)


def test_sinkhorn_matches_both_marginals():
    torch.manual_seed(0)
    cost = torch.rand(2, 6, 3)
    row = torch.full((2, 6, 1), 1 / 6)
    col = torch.tensor([0.5, 0.3, 0.2]).view(1, 1, 3).expand(2, 1, 3)
    plan = sinkhorn(cost, row, col, lam=5.0, iterations=200)
    assert torch.allclose(plan.sum(dim=1), col.squeeze(1), atol=1e-6)  # the last step fixes columns
    assert torch.allclose(plan.sum(dim=2), row.squeeze(2), atol=1e-5)  # rows converge


def test_position_cost_single_linkage_by_hand():
    # 4 tokens on a line at x = 0, 1, 3, 6; clusters: {0, 1}, {2}, {} (token 3 is in none: soft input)
    positions = torch.tensor([[[0.0, 0], [1, 0], [3, 0], [6, 0]]])
    assign = torch.zeros(1, 4, 3)
    assign[0, 0, 0] = assign[0, 1, 0] = assign[0, 2, 1] = 1
    raw = torch.tensor([[1.0, 3, 0],   # token 0: nearest other member of {0,1} is 1 away; of {2}: 3
                        [1.0, 2, 0],   # token 1
                        [2.0, 0, 0],   # token 2: its own cluster has no member at positive distance
                        [5.0, 3, 0]])  # token 3
    mean = raw.sum() / 12  # the official mean includes the zero entries
    expected = torch.where(raw == 0, mean, raw) / 5.0  # then divided by the image's maximum, 5
    assert torch.allclose(position_cost(positions, assign, chunk=2)[0], expected)


def _official_position_cost(positions, assignment):
    """The official formula, materialising B x T x T x K (written here from its description)."""
    d = torch.sqrt(((positions[:, None] - positions[:, :, None]) ** 2).sum(-1))
    pd = d[..., None] * assignment[:, None]
    nonzero = (pd != 0).sum(dim=2, keepdim=True)
    pd = torch.where((pd == 0) & (nonzero != 0), torch.full_like(pd, 1e5), pd)
    p = pd.amin(dim=2)
    p = torch.where(p == 0, p.mean(dim=(1, 2), keepdim=True).expand_as(p), p)
    return p / p.amax(dim=(1, 2), keepdim=True)


@pytest.mark.parametrize("chunk", [1, 3, 8])
def test_chunked_cost_equals_the_four_dimensional_formula(chunk):
    g = torch.Generator().manual_seed(1)
    positions = torch.randint(0, 6, (3, 10, 2), generator=g).float()  # repeated positions on purpose
    hard = torch.nn.functional.one_hot(torch.randint(0, 5, (3, 10), generator=g), 5).float()
    assert torch.allclose(position_cost(positions, hard, chunk), _official_position_cost(positions, hard))
    soft = torch.rand(3, 10, 5, generator=g)
    assert torch.allclose(position_cost(positions, soft, chunk), _official_position_cost(positions, soft))


def test_two_objects_seen_in_both_views_are_found_and_paired():
    # view 1 and view 2 each show object A (tokens near e0) on the left and B (near e1) on the right
    g = torch.Generator().manual_seed(0)
    n = 8
    semantic = torch.cat([torch.eye(4)[0].repeat(n // 2, 1), torch.eye(4)[1].repeat(n // 2, 1)])
    tokens = torch.cat([semantic, semantic]) + 0.05 * torch.randn(2 * n, 4, generator=g)
    xs = torch.cat([torch.arange(n // 2), torch.arange(n // 2) + 20]).float()
    positions = torch.stack([xs, torch.zeros(n)], dim=1).repeat(2, 1)
    seeds = torch.tensor([[0, n - 1]])  # one seed in A (view 1), one in B (view 1)
    assign = joint_view_clustering(tokens[None], positions[None], 2, pos_alpha=1.0, seeds=seeds)
    labels = assign[0].argmax(dim=1)
    assert labels[: n // 2].eq(0).all() and labels[n // 2: n].eq(1).all()  # view 1
    assert labels[n: n + n // 2].eq(0).all() and labels[n + n // 2:].eq(1).all()  # view 2
    assert torch.equal(assign.sum(dim=2), torch.ones(1, 2 * n))  # hard: one cluster per token


def test_object_vectors_are_means_and_one_view_clusters_are_dropped():
    t1 = torch.tensor([[[1.0, 0], [3.0, 0], [0, 2.0]]])
    t2 = torch.tensor([[[0.0, 4], [5.0, 5], [1.0, 1]]])
    # cluster 0: view-1 tokens 0,1 and view-2 token 0; cluster 1: view-1 token 2 only; cluster 2: view-2 tokens 1,2
    a = torch.zeros(1, 6, 3)
    a[0, 0, 0] = a[0, 1, 0] = a[0, 3, 0] = 1
    a[0, 2, 1] = 1
    a[0, 4, 2] = a[0, 5, 2] = 1
    obj1, obj2, valid = object_vectors(t1, t2, a)
    assert valid.tolist() == [[True, False, False]]
    assert obj1.tolist() == [[2.0, 0.0]] and obj2.tolist() == [[0.0, 4.0]]


def test_hard_assignment_cost_scatters_to_the_same_values_and_ties_fall_back():
    g = torch.Generator().manual_seed(2)
    positions = torch.randint(0, 6, (4, 12, 2), generator=g).float()  # repeated positions: distance 0 is skipped
    hard = torch.nn.functional.one_hot(torch.randint(0, 5, (4, 12), generator=g), 5).float()
    hard[:, :3] = 0  # tokens in no cluster (the seeds' one-hot of the first round)
    hard[1, :, 4] = 0  # an empty cluster
    dist = pairwise_distances(positions)
    scattered = _nearest_member_hard(dist, hard)
    assert torch.equal(scattered, _nearest_member(dist, hard, chunk=2))  # bit for bit
    assert torch.isinf(scattered[1, :, 4]).all()
    assert torch.allclose(position_cost(positions, hard), _official_position_cost(positions, hard))
    tied = hard.clone()
    tied[0, 5] = 1.0  # a token in every cluster (a tie of the hard assignment): the general path
    assert torch.allclose(position_cost(positions, tied), _official_position_cost(positions, tied))
