"""The object memory bank: FIFO by image, paired entries, cycle-consistent retrieval."""

import torch

from cribo.method.memory_bank import ObjectMemoryBank


def _bank(num_images=3, max_objects=2, dim=2):
    bank = ObjectMemoryBank(num_images, max_objects, dim, generator=torch.Generator().manual_seed(0))
    assert bank.num_valid == num_images * max_objects  # starts full of random entries, as the official code
    return bank


def _valid(bank, view=0):
    return bank.entries[view, bank.valid_rows()].tolist()


def test_fifo_by_image_with_variable_object_counts():
    bank = _bank()
    bank.enqueue(torch.tensor([[1.0, 0], [2, 0], [3, 0]]), torch.tensor([[1.0, 1], [2, 1], [3, 1]]),
                 torch.tensor([1, 2]))
    # newest image first: image 2 of the batch (2 objects), then image 1 (1 object), then one old image (2)
    assert bank.counts.tolist() == [2, 1, 2]
    assert bank.num_valid == 5
    assert _valid(bank)[:3] == [[3.0, 0], [2, 0], [1, 0]]
    assert _valid(bank, 1)[:3] == [[3.0, 1], [2, 1], [1, 1]]  # paired rows
    bank.enqueue(torch.tensor([[4.0, 0], [5, 0]]), torch.tensor([[4.0, 1], [5, 1]]), torch.tensor([0, 2]))
    # an image with no valid object still takes a FIFO slot; the last random image drops out
    assert bank.counts.tolist() == [2, 0, 2]
    assert _valid(bank) == [[5.0, 0], [4, 0], [3, 0], [2, 0]]


def test_a_batch_larger_than_the_bank_keeps_only_its_newest_images():
    bank = _bank(num_images=2, max_objects=1)
    objs = torch.arange(8.0).view(4, 2)
    bank.enqueue(objs, objs + 100, torch.tensor([1, 1, 1, 1]))
    assert bank.counts.tolist() == [1, 1] and _valid(bank) == [[6.0, 7.0], [4.0, 5.0]]


def test_normalised_copy_follows_the_entries():
    bank = _bank()
    bank.enqueue(torch.tensor([[3.0, 4.0]]), torch.tensor([[0.0, 2.0]]), torch.tensor([1]))
    row = bank.valid_rows()[0]
    assert torch.allclose(bank.normed[0, row], torch.tensor([0.6, 0.8]))
    assert torch.allclose(bank.normed[1, row], torch.tensor([0.0, 1.0]))


def test_cycle_check_keeps_exactly_the_consistent_objects():
    # 2-d unit directions at angles (degrees); a bank of 2 images x 1 object
    def at(deg):
        rad = torch.deg2rad(torch.tensor(float(deg)))
        return torch.stack([torch.cos(rad), torch.sin(rad)])

    bank = ObjectMemoryBank(2, 1, 2)
    # entry A: view 1 at 0 deg, view 2 at 90 deg; entry B: view 1 at 45 deg, view 2 at 180 deg
    bank.enqueue(torch.stack([at(0), at(45)]), torch.stack([at(90), at(180)]), torch.tensor([1, 1]))
    # batch objects: k=0 has views (5, 95) deg; k=1 has views (40, 100) deg
    q1 = torch.stack([at(5), at(40)])
    q2 = torch.stack([at(95), at(100)])
    r = bank.retrieve(q1, q2)
    # k=0: view-1 NN is A (0 deg); A's view 2 (90) is nearest to q2[0] (95) -> consistent
    # k=1: view-1 NN is B (45 deg); B's view 2 (180) is nearest to q2[1] (100) -> q2[1]: consistent too
    assert r.cycle1.tolist() == [[True], [True]]
    assert torch.allclose(r.nn_view1[0, :, 0], torch.stack([at(0), at(45)]))
    assert torch.allclose(r.nn_view1[1, :, 0], torch.stack([at(90), at(180)]))
    # view-2 direction: q2[0]=95 and q2[1]=100 both find A (view 2 at 90); A's view 1 (0 deg) is
    # nearest to q1[0] (5 deg): consistent for k=0 only
    assert r.cycle2.tolist() == [[True], [False]]
    assert torch.allclose(r.nn_view2[0, :, 0], torch.stack([at(0), at(0)]))
    # top-2: object 0's second neighbour is B, whose view 2 (180) is nearest to q2[1] (100), not q2[0];
    # object 1's second neighbour is A, whose view 2 (90) is nearest to q2[0] (95), not q2[1]
    r2 = bank.retrieve(q1, q2, top_k=2)
    assert r2.cycle1.tolist() == [[True, False], [True, False]]
    assert torch.allclose(r2.nn_view1[0, 1], torch.stack([at(45), at(0)]))


def test_chunked_scan_equals_a_single_scan():
    g = torch.Generator().manual_seed(3)
    bank = ObjectMemoryBank(50, 4, 8, generator=g)
    q1, q2 = torch.randn(7, 8, generator=g), torch.randn(7, 8, generator=g)
    a, b = bank.retrieve(q1, q2, chunk=13), bank.retrieve(q1, q2, chunk=10_000)
    assert torch.equal(a.nn_view1, b.nn_view1) and torch.equal(a.cycle2, b.cycle2)


def test_retrieval_over_a_wrapped_ring_equals_brute_force():
    g = torch.Generator().manual_seed(4)
    bank = ObjectMemoryBank(50, 4, 8, generator=g)
    bank.enqueue(torch.randn(3, 8, generator=g), torch.randn(3, 8, generator=g), torch.tensor([3]))
    assert len(bank.valid_segments()) == 2  # the valid rows wrap around the end of the ring
    q1, q2 = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    rows = bank.valid_rows()
    expected = rows[(torch.nn.functional.normalize(q1, dim=-1) @ bank.normed[0, rows].T).argmax(dim=1)]
    got = bank.retrieve(q1, q2, chunk=7)
    assert torch.equal(got.nn_view1[:, :, 0], bank.entries[:, expected])
    sims = torch.nn.functional.normalize(q1, dim=-1) @ bank.normed[0, rows].T
    top3 = rows[sims.topk(3, dim=1).indices]
    assert torch.equal(bank.retrieve(q1, q2, top_k=3, chunk=7).nn_view1[0], bank.entries[0, top3])


def test_a_batch_without_objects_retrieves_nothing():
    # a rank can draw a batch whose views share no cluster: M = 0 queries must give empty results, not a crash
    bank = _bank()
    r = bank.retrieve(torch.zeros(0, 2), torch.zeros(0, 2), top_k=2)
    assert r.nn_view1.shape == (2, 0, 2, 2) and r.nn_view2.shape == (2, 0, 2, 2)
    assert r.cycle1.shape == (0, 2) and r.cycle1.dtype == torch.bool and r.cycle2.shape == (0, 2)
