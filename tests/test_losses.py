"""CrIBo loss terms on tiny cases computed by hand, including the official normalisation quirk."""

import math

import pytest
import torch

from cribo.method.losses import (CrIBoLoss, ObjectTargets, cross_image_object_loss, cross_view_object_loss,
                                 teacher_probs)


def _h(p, logits, temp):
    """-sum p log softmax(logits / temp), by hand."""
    exps = [math.exp(v / temp) for v in logits]
    return -sum(pi * math.log(e / sum(exps)) for pi, e in zip(p, exps))


def test_teacher_probs_centre_and_sharpen():
    out = teacher_probs(torch.tensor([[1.0, 3.0]]), torch.tensor([[1.0, 1.0]]), 0.5)
    # (0, 2) / 0.5 = (0, 4) -> softmax
    assert out[0].tolist() == pytest.approx([1 / (1 + math.e ** 4), math.e ** 4 / (1 + math.e ** 4)])


def test_cross_view_object_loss_by_hand():
    t1 = torch.tensor([[0.7, 0.3], [0.5, 0.5]])
    t2 = torch.tensor([[0.1, 0.9], [1.0, 0.0]])
    s1 = torch.tensor([[0.2, 0.0], [0.0, 0.1]])
    s2 = torch.tensor([[0.0, 0.3], [0.1, 0.1]])
    got = cross_view_object_loss(t1, t2, s1, s2, 0.1).item()
    expect = ((_h([0.7, 0.3], [0.0, 0.3], 0.1) + _h([0.5, 0.5], [0.1, 0.1], 0.1)) / 2
              + (_h([0.1, 0.9], [0.2, 0.0], 0.1) + _h([1.0, 0.0], [0.0, 0.1], 0.1)) / 2) / 2
    assert got == pytest.approx(expect, rel=1e-5)


def _cross_image_case():
    nn1 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    nn2 = torch.tensor([[0.0, 1.0], [0.5, 0.5], [1.0, 0.0]])
    s1 = torch.tensor([[0.1, 0.0], [0.0, 0.2], [0.3, 0.0]])
    s2 = torch.tensor([[0.0, 0.0], [0.2, 0.0], [0.0, 0.1]])
    return nn1, nn2, s1, s2


def test_cross_image_official_divides_both_directions_by_the_first_count():
    nn1, nn2, s1, s2 = _cross_image_case()
    cycle1 = torch.tensor([True, False, True])   # 2 consistent objects in direction 1
    cycle2 = torch.tensor([False, True, True])   # 2 in direction 2, but the official code divides by 2 anyway
    cycle2b = torch.tensor([True, True, True])   # 3 in direction 2: still divided by |cycle1| = 2
    term1 = _h([1, 0], [0.0, 0.0], 0.1) + _h([0.5, 0.5], [0.0, 0.1], 0.1)
    term2 = _h([0.5, 0.5], [0.0, 0.2], 0.1) + _h([1, 0], [0.3, 0.0], 0.1)
    term2b = term2 + _h([0, 1], [0.1, 0.0], 0.1)
    got = cross_image_object_loss(nn1, nn2, s1, s2, cycle1, cycle2b, 0.1).item()
    assert got == pytest.approx((term1 / 2 + term2b / 2) / 2, rel=1e-5)
    fixed = cross_image_object_loss(nn1, nn2, s1, s2, cycle1, cycle2b, 0.1, norm="per_direction").item()
    assert fixed == pytest.approx((term1 / 2 + term2b / 3) / 2, rel=1e-5)
    same = cross_image_object_loss(nn1, nn2, s1, s2, cycle1, cycle2, 0.1).item()
    assert same == pytest.approx((term1 / 2 + term2 / 2) / 2, rel=1e-5)


def test_cross_image_skipped_when_the_first_direction_has_no_consistent_object():
    nn1, nn2, s1, s2 = _cross_image_case()
    none, some = torch.zeros(3, dtype=torch.bool), torch.tensor([True, False, False])
    assert cross_image_object_loss(nn1, nn2, s1, s2, none, some, 0.1).item() == 0.0
    per_direction = cross_image_object_loss(nn1, nn2, s1, s2, none, some, 0.1, norm="per_direction").item()
    assert per_direction == pytest.approx(_h([0, 1], [0.1, 0.0], 0.1) / 2, rel=1e-5)


def test_full_loss_off_before_the_start_epoch_and_object_centre_update():
    torch.manual_seed(0)
    loss = CrIBoLoss(out_dim=3, object_out_dim=2, teacher_temp_schedule=[0.5, 0.5], center_momentum=0.9)
    cls = [torch.randn(2, 3), torch.randn(2, 3)]
    t_obj = (torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 3.0]]))
    s_obj = (torch.zeros(1, 2, requires_grad=True), torch.zeros(1, 2, requires_grad=True))
    neighbours = (torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 2.0]]))
    cycle = (torch.tensor([True]), torch.tensor([True]))
    out0 = loss(cls, cls, s_obj, t_obj, neighbours, cycle, epoch=0)
    assert out0["cross_image"].item() == 0.0  # epoch 0 only fills the bank
    # centre of objects: 0.1 * mean([1, 0], [0, 3]) = (0.05, 0.15)
    assert loss.center_obj[0].tolist() == pytest.approx([0.05, 0.15])
    out1 = loss(cls, cls, s_obj, t_obj, neighbours, cycle, epoch=1)
    assert out1["cross_image"].item() > 0
    assert out1["loss"].item() == pytest.approx(
        (out1["global"] + out1["cross_view"] + out1["cross_image"]).item(), rel=1e-6)
    out1["loss"].backward()
    assert s_obj[0].grad is not None and s_obj[0].grad.abs().sum() > 0


def test_cross_image_with_two_neighbours_counts_consistent_pairs():
    nn1, nn2, s1, s2 = _cross_image_case()
    # object 0 has two neighbours in direction 1 (both consistent), object 1 none; direction 2: one
    n1 = torch.stack([nn1, nn1.flip(0)], dim=1)  # M x 2 x K
    n2 = torch.stack([nn2, nn2], dim=1)
    c1 = torch.tensor([[True, True], [False, False], [False, False]])
    c2 = torch.tensor([[False, False], [False, False], [True, False]])
    got = cross_image_object_loss(n1, n2, s1, s2, c1, c2, 0.1, norm="per_direction").item()
    term1 = (_h([1, 0], [0.0, 0.0], 0.1) + _h([0.5, 0.5], [0.0, 0.0], 0.1)) / 2  # both teach s2[0]
    term2 = _h([1, 0], [0.3, 0.0], 0.1)  # nn2[2] teaches s1[2]
    assert got == pytest.approx((term1 + term2) / 2, rel=1e-5)


@pytest.mark.parametrize("selected", [True, False])
def test_a_batch_without_objects_leaves_only_the_global_term(selected):
    # M = 0: both object terms are 0 (and in the graph), the object centre keeps its value
    torch.manual_seed(0)
    loss = CrIBoLoss(out_dim=3, object_out_dim=2, teacher_temp_schedule=[0.5, 0.5], center_momentum=0.9)
    loss.center_obj.fill_(0.25)
    cls = [torch.randn(2, 3), torch.randn(2, 3)]
    student_cls = [c.clone().requires_grad_() for c in cls]
    empty = torch.zeros(0, 2)
    s_obj = torch.zeros(0, 2, requires_grad=True)
    neighbours = (empty, empty) if selected else (torch.zeros(0, 1, 2), torch.zeros(0, 1, 2))
    cycle = (torch.zeros(0, 1, dtype=torch.bool), torch.zeros(0, 1, dtype=torch.bool))
    out = loss(student_cls, cls, s_obj, (empty, empty), neighbours, cycle, epoch=1, neighbours_selected=selected)
    assert out["cross_view"].item() == 0.0 and out["cross_image"].item() == 0.0
    assert out["loss"].item() == pytest.approx(out["global"].item(), rel=1e-6) and out["global"].item() > 0
    out["loss"].backward()
    assert student_cls[0].grad.abs().sum() > 0
    assert loss.center_obj.tolist() == [[0.25, 0.25]]


def test_object_targets_sort_the_natural_order_by_student_row():
    # M = 3; neighbours of view-1 objects 0 and 2 (teach view-2 rows 3 and 5), of view-2 object 1 (teaches row 1)
    cycle = (torch.tensor([True, False, True]), torch.tensor([False, True, False]))
    targets = ObjectTargets.build(3, cycle)
    # natural order: t2 -> rows 0 1 2, t1 -> rows 3 4 5, nn1 -> rows 3 5, nn2 -> row 1
    assert targets.rows.tolist() == [0, 1, 1, 2, 3, 3, 4, 5, 5]
    assert targets.order.tolist() == [0, 1, 8, 2, 3, 6, 4, 5, 7]
    assert targets.place[targets.order].tolist() == list(range(9))
    assert targets.is_object.tolist() == [True, True, False, True, True, False, True, True, False]
    assert targets.neighbours_of_view1 == 2
    none = ObjectTargets.build(2, None)
    assert none.rows.tolist() == [0, 1, 2, 3] and none.neighbours is None and none.neighbours_of_view1 == 0


@pytest.mark.parametrize("k,norm,epoch", [(1, "first_direction", 1), (2, "per_direction", 1), (1, "first_direction", 0)])
def test_forward_sorted_equals_forward_values_gradients_and_centres(k, norm, epoch):
    """Also with the teacher logits given as products and column factors (``teacher_scales``, the teacher head's
    weight normalisation left to the sharpening): logits ``t`` passed as ``t / f`` and ``f``."""
    torch.set_default_dtype(torch.float64)  # compares the algebra, not the order of float sums
    try:
        g = torch.Generator().manual_seed(k)
        b, m, width, width_obj = 2, 4, 6, 5
        s_cls, s_obj = torch.randn(2 * b, width, generator=g), torch.randn(2 * m, width_obj, generator=g)
        t_cls, t_obj = torch.randn(2 * b, width, generator=g), torch.randn(2 * m, width_obj, generator=g)
        cycle = tuple(torch.rand(m, k, generator=g) > 0.4 for _ in range(2))
        nn1, nn2 = (torch.randn(int(c.sum()), width_obj, generator=g) for c in cycle)
        scale_cls, scale_obj = (0.5 + torch.rand(1, w, generator=g) for w in (width, width_obj))
        losses, results = [], []
        for path in ("forward", "sorted", "sorted with factors"):
            loss = CrIBoLoss(width, width_obj, [0.04, 0.05], cross_image_norm=norm)
            loss.global_loss.center.copy_(torch.linspace(-0.1, 0.1, width)[None])
            loss.center_obj.copy_(torch.linspace(0.2, -0.2, width_obj)[None])
            student_cls, student_obj = s_cls.clone().requires_grad_(), s_obj.clone().requires_grad_()
            if path != "forward":
                targets = ObjectTargets.build(m, cycle if epoch >= 1 else None)
                natural = [t_obj[m:], t_obj[:m]] + ([nn1, nn2] if epoch >= 1 else [])
                teacher_cls, teacher_obj = torch.cat([t_cls[b:], t_cls[:b]]), torch.cat(natural)[targets.order]
                scales = None
                if path == "sorted with factors":
                    scales = (scale_cls, scale_obj)
                    teacher_cls, teacher_obj = teacher_cls / scale_cls, teacher_obj / scale_obj
                out = loss.forward_sorted(student_cls, teacher_cls, student_obj, teacher_obj, targets, epoch,
                                          teacher_scales=scales)
            else:
                out = loss(student_cls, t_cls, student_obj, (t_obj[:m], t_obj[m:]), (nn1, nn2), cycle, epoch,
                           neighbours_selected=True)
            out["loss"].backward()
            losses.append(out)
            results.append((student_cls.grad, student_obj.grad, loss.global_loss.center.clone(), loss.center_obj.clone()))
    finally:
        torch.set_default_dtype(torch.float32)
    assert (losses[1]["cross_image"].item() > 0) == (epoch >= 1)
    for i in (1, 2):
        for key in ("loss", "global", "cross_view", "cross_image"):
            assert losses[i][key].item() == pytest.approx(losses[0][key].item(), abs=1e-12), (i, key)
        for ours, reference in zip(results[i], results[0]):  # student gradients and both centres
            assert torch.allclose(ours, reference, atol=1e-12), i
