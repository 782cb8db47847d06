"""The teacher's EMA update of the training engine."""

import torch

from cribo.train.engine import update_teacher


def test_the_teacher_moves_a_fraction_one_minus_momentum_towards_the_student():
    student = [torch.nn.Parameter(torch.full((2, 3), 4.0)), torch.nn.Parameter(torch.tensor([1.0, -1.0]))]
    teacher = [torch.full((2, 3), 2.0), torch.tensor([0.0, 0.0])]
    update_teacher(zip(student, teacher), 0.75)  # 0.75 * t + 0.25 * s, exact in binary
    assert torch.equal(teacher[0], torch.full((2, 3), 2.5))
    assert torch.equal(teacher[1], torch.tensor([0.25, -0.25]))
    assert student[0].grad is None and torch.equal(student[0], torch.full((2, 3), 4.0))  # the student is untouched


def test_momentum_one_keeps_the_teacher_and_zero_copies_the_student():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    kept = teacher.clone()
    update_teacher([(student, teacher)], 1.0)
    assert torch.equal(teacher, kept)
    update_teacher([(student, teacher)], 0.0)
    assert torch.equal(teacher, student)


def test_the_update_equals_the_two_pass_formula_to_float_rounding():
    g = torch.Generator().manual_seed(1)
    student = [torch.randn(64, 33, generator=g), torch.randn(10, generator=g)]
    teacher = [torch.randn(64, 33, generator=g), torch.randn(10, generator=g)]
    momentum = 0.996
    expected = [t * momentum + s * (1 - momentum) for s, t in zip(student, teacher)]
    update_teacher(zip(student, teacher), momentum)
    for got, want in zip(teacher, expected):
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-7)
    update_teacher([], momentum)  # a method without a teacher has nothing to update
