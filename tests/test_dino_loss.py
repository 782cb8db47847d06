"""DINO loss: a tiny case worked out by hand, the centre EMA, the pair rule, first-principles checks."""

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cribo.method.dino import DINOLoss, dino_cross_entropy

E = math.e
# Tiny case, K = 3 prototypes, B = 2 images, two global crops.
T0 = [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]  # teacher logits, crop 0
T1 = [[0.0, 1.0, 0.0], [2.0, 0.0, 0.0]]  # teacher logits, crop 1
S0 = [[0.1, 0.0, 0.0], [0.0, 0.2, 0.0]]  # student logits, crop 0
S1 = [[0.0, 0.0, 0.1], [0.0, 0.0, 0.0]]  # student logits, crop 1


def _softmax(values, temp):
    exps = [math.exp(v / temp) for v in values]
    return [e / sum(exps) for e in exps]


def _h(p, s, student_temp):  # -sum_k p_k log softmax(s / tau_s)_k for one row
    return -sum(pk * math.log(qk) for pk, qk in zip(p, _softmax(s, student_temp)))


def _tensors(*crops):
    return [torch.tensor(c) for c in crops]


def test_tiny_case_by_hand():
    # tau_t = 0.5, tau_s = 0.1, centre 0 on the first call. Teacher rows / 0.5 and student rows / 0.1:
    #   T0: [2,0,0] -> p = [e^2, 1, 1] / (e^2 + 2);   [0,0,2] -> p = [1, 1, e^2] / (e^2 + 2)
    #   T1: [0,2,0] -> p = [1, e^2, 1] / (e^2 + 2);   [4,0,0] -> p = [e^4, 1, 1] / (e^4 + 2)
    #   S1: [0,0,1] -> log q = [-L1, -L1, 1 - L1];    [0,0,0] -> log q = -log 3 each
    #   S0: [1,0,0] -> log q = [1 - L1, -L1, -L1];    [0,2,0] -> log q = [-L2, 2 - L2, -L2]
    # with L1 = log(e + 2), L2 = log(e^2 + 2). Pairs (teacher 0, student 1) and (teacher 1, student 0).
    L1, L2, Z2, Z4 = math.log(E + 2), math.log(E**2 + 2), E**2 + 2, E**4 + 2
    h01 = ((L1 - 1 / Z2) + math.log(3)) / 2  # batch mean of rows 0 and 1
    h10 = ((L1 - 1 / Z2) + (L2 - 2 / Z4)) / 2
    expected = (h01 + h10) / 2

    loss_fn = DINOLoss(3, [0.5, 0.25], student_temp=0.1, center_momentum=0.9)
    loss = loss_fn(_tensors(S0, S1), _tensors(T0, T1), epoch=0)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # the closed forms agree with the row-by-row helper
    assert h01 == pytest.approx((_h(_softmax(T0[0], 0.5), S1[0], 0.1) + _h(_softmax(T0[1], 0.5), S1[1], 0.1)) / 2)

    # Centre after the call: 0.9 * 0 + 0.1 * mean of the 4 teacher rows = 0.1 * [3, 1, 1] / 4
    c1 = [0.075, 0.025, 0.025]
    assert loss_fn.center.shape == (1, 3) and loss_fn.center[0].tolist() == pytest.approx(c1, abs=1e-7)

    # Second call at epoch 1 (tau_t = 0.25) uses the centre c1, then updates it again.
    def centred(row):
        return _softmax([t - c for t, c in zip(row, c1)], 0.25)

    h01 = (_h(centred(T0[0]), S1[0], 0.1) + _h(centred(T0[1]), S1[1], 0.1)) / 2
    h10 = (_h(centred(T1[0]), S0[0], 0.1) + _h(centred(T1[1]), S0[1], 0.1)) / 2
    loss = loss_fn(_tensors(S0, S1), _tensors(T0, T1), epoch=1)
    assert loss.item() == pytest.approx((h01 + h10) / 2, rel=1e-6)
    c2 = [0.9 * c + 0.1 * m for c, m in zip(c1, [0.75, 0.25, 0.25])]  # [0.1425, 0.0475, 0.0475]
    assert loss_fn.center[0].tolist() == pytest.approx(c2, abs=1e-7)
    assert loss_fn.teacher_temp(5) == 0.25  # past the end of the schedule: its last value


def test_center_is_a_buffer_in_the_state_dict():
    loss_fn = DINOLoss(7, [0.04])
    assert list(loss_fn.state_dict()) == ["center"] and list(loss_fn.parameters()) == []
    assert torch.equal(loss_fn.center, torch.zeros(1, 7))


def test_pairs_exclude_the_same_crop():
    # 2 global + 1 local student crops: pairs (0,1), (0,2), (1,0), (1,2); never (0,0) or (1,1).
    torch.manual_seed(0)
    teacher = [torch.randn(4, 5) for _ in range(2)]
    student = [torch.randn(4, 5) for _ in range(3)]
    loss = DINOLoss(5, [0.07])(student, teacher, epoch=0)
    probs = [torch.softmax(t / 0.07, dim=-1) for t in teacher]
    pairs = [(0, 1), (0, 2), (1, 0), (1, 2)]
    expected = sum(dino_cross_entropy(probs[i], student[j], 0.1) for i, j in pairs) / len(pairs)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    with_diagonal = sum(dino_cross_entropy(probs[i], student[j], 0.1) for i in range(2) for j in range(3)) / 6
    assert loss.item() != pytest.approx(with_diagonal.item(), rel=1e-3)
    with pytest.raises(ValueError, match="pair"):
        DINOLoss(5, [0.07])(student[:1], teacher[:1], epoch=0)


def test_identical_student_and_teacher_gives_the_entropy():
    # With c = 0 and tau_t = tau_s = tau, the target p = softmax(x / tau) equals the student's
    # q = softmax(x / tau), so H(p, q) = -sum p log p: the entropy of p.
    x = [[0.2, -0.4, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
    p0 = _softmax(x[0], 0.1)
    entropy = (-sum(p * math.log(p) for p in p0) + math.log(4)) / 2  # row 2 is uniform: log K
    crops = _tensors(x, x)
    assert DINOLoss(4, [0.1], student_temp=0.1)(crops, crops, epoch=0).item() == pytest.approx(entropy, rel=1e-5)
    p = torch.softmax(torch.tensor(x) / 0.1, dim=-1)
    assert dino_cross_entropy(p, torch.tensor(x), 0.1).item() == pytest.approx(entropy, rel=1e-5)


def test_float32_whatever_the_input_dtype():
    torch.manual_seed(0)
    teacher = [torch.randn(3, 6).bfloat16() for _ in range(2)]
    student = [torch.randn(3, 6).bfloat16() for _ in range(2)]
    loss_fn = DINOLoss(6, [0.04])
    loss = loss_fn(student, teacher, epoch=0)
    reference = DINOLoss(6, [0.04])([s.float() for s in student], [t.float() for t in teacher], epoch=0)
    assert loss.dtype == torch.float32 and loss_fn.center.dtype == torch.float32
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)


def test_gradient_reaches_the_student_only():
    # d H(p, softmax(s / tau)) / d s = (softmax(s / tau) - p) / tau per row; then / B (batch mean)
    # and / 2 (two pairs). Student crop 1 is taught only by teacher crop 0.
    teacher = [t.requires_grad_() for t in _tensors(T0, T1)]
    student = [s.requires_grad_() for s in _tensors(S0, S1)]
    DINOLoss(3, [0.5])(student, teacher, epoch=0).backward()
    assert all(t.grad is None for t in teacher)
    for b in range(2):
        expected = [(q - p) / 0.1 / 2 / 2 for q, p in zip(_softmax(S1[b], 0.1), _softmax(T0[b], 0.5))]
        assert student[1].grad[b].tolist() == pytest.approx(expected, abs=1e-6)


def _center_worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    # rank 0 holds 1 row per crop, rank 1 holds 2: the centre is the mean over all 6 rows
    rows = [[[0.0, 6.0]], [[6.0, 0.0]]] if rank == 0 else [[[3.0, 0.0], [3.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]]
    loss_fn = DINOLoss(2, [0.1], center_momentum=0.5)
    loss_fn.update_center(_tensors(*rows))
    torch.save(loss_fn.center, os.path.join(out_dir, f"center{rank}.pt"))
    dist.destroy_process_group()


def test_center_is_averaged_over_processes(tmp_path):
    mp.spawn(_center_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    # sum of the 6 rows = [12, 6], mean = [2, 1]; centre = 0.5 * 0 + 0.5 * [2, 1]
    for rank in (0, 1):
        assert torch.load(tmp_path / f"center{rank}.pt")[0].tolist() == pytest.approx([1.0, 0.5])
