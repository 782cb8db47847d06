import pytest
import torch
import torch.nn.functional as F

from cribo.method.soft_cross_entropy import soft_cross_entropy


def _autograd_definition(logits, targets, rows, temp):
    return -(targets * F.log_softmax(logits[rows] / temp, dim=-1)).sum(dim=-1)


@pytest.mark.parametrize("rows,chunk", [
    ([0, 1, 2, 3, 4, 5], 4),            # one target per row (the identity fast path)
    ([0, 0, 2, 3, 3, 3, 5], 2),         # several targets for a row, rows without a target
    ([1, 4], 64),                       # fewer targets than rows, one block
])
def test_values_and_gradients_equal_the_autograd_definition(rows, chunk):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 11, generator=g, dtype=torch.float64, requires_grad=True)
    rows = torch.tensor(rows)
    targets = F.softmax(torch.randn(len(rows), 11, generator=g, dtype=torch.float64) * 3, dim=-1)
    weights = torch.randn(len(rows), generator=g, dtype=torch.float64)  # arbitrary upstream gradient

    expected = _autograd_definition(logits, targets, rows, 0.1)
    (expected * weights).sum().backward()
    expected_grad, logits.grad = logits.grad, None
    got = soft_cross_entropy(logits, targets, rows, 0.1, chunk_rows=chunk)
    (got * weights).sum().backward()

    assert torch.allclose(got, expected, rtol=0, atol=1e-12)
    assert torch.allclose(logits.grad, expected_grad, rtol=0, atol=1e-12)
    untaught = sorted(set(range(6)) - set(rows.tolist()))
    assert logits.grad[untaught].abs().sum() == 0  # a row without a target gets no gradient


def test_closed_form_gradient_by_hand():
    # one row, uniform target over 2 classes, logits (0, 0), tau 1: softmax (1/2, 1/2), gradient 0;
    # target (1, 0): gradient (1/2 - 1, 1/2 - 0) = (-1/2, 1/2)
    logits = torch.zeros(1, 2, requires_grad=True)
    loss = soft_cross_entropy(logits, torch.tensor([[1.0, 0.0]]), torch.tensor([0]), 1.0)
    assert loss.item() == pytest.approx(torch.log(torch.tensor(2.0)).item())
    loss.sum().backward()
    assert logits.grad[0].tolist() == pytest.approx([-0.5, 0.5])


def test_unsorted_rows_and_mismatched_shapes_are_refused():
    logits, targets = torch.zeros(3, 4), torch.full((2, 4), 0.25)
    with pytest.raises(ValueError, match="sorted"):
        soft_cross_entropy(logits, targets, torch.tensor([2, 0]), 0.1)
    with pytest.raises(ValueError, match="do not match"):
        soft_cross_entropy(logits, targets, torch.tensor([0]), 0.1)


def test_no_target_gives_an_empty_result_and_a_zero_gradient():
    logits = torch.randn(3, 4, requires_grad=True)
    out = soft_cross_entropy(logits, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), 0.1)
    assert out.shape == (0,)
    (out.sum() + logits.sum() * 0).backward()
    assert logits.grad.abs().sum() == 0


def test_in_place_softmax_gives_the_out_of_place_values():
    # the CPU step writes (log-)softmaxes over their input; a torch whose row kernels stopped being safe in
    # place would change the values
    from cribo.method.soft_cross_entropy import softmax_in_place

    x = torch.randn(7, 5000, generator=torch.Generator().manual_seed(0)) * 30
    assert torch.equal(softmax_in_place(x.clone()), torch.softmax(x, dim=-1))
    assert torch.equal(softmax_in_place(x.clone(), log=True), torch.log_softmax(x, dim=-1))
    y = x.clone()
    assert softmax_in_place(y).data_ptr() == y.data_ptr()  # no second buffer
