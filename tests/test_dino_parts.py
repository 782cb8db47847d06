"""DINO building blocks: schedules, head, loss (values worked out by hand), views."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from cribo.method.dino import DINOLoss, dino_cross_entropy
from cribo.method.schedules import cosine_schedule, linear_warmup_then_constant
from cribo.method.views import DINOViews, eval_transform
from cribo.models.heads import DINOHead, cancel_last_layer_gradients


def test_cosine_schedule_warmup_endpoints_and_midpoint():
    s = cosine_schedule(1.0, 0.0, epochs=3, steps_per_epoch=2, warmup_epochs=1, start_warmup_value=0.5)
    assert len(s) == 6
    assert s[:2].tolist() == [0.5, 0.75]  # linear from 0.5 towards 1.0 over 2 steps
    # cosine part of length 4: i = 0..3 -> (1 + cos(pi i / 4)) / 2
    assert s[2:].tolist() == pytest.approx([(1 + math.cos(math.pi * i / 4)) / 2 for i in range(4)])
    assert np.all(np.diff(s[2:]) < 0)
    with pytest.raises(ValueError, match="warmup_epochs"):
        cosine_schedule(1, 0, epochs=2, steps_per_epoch=1, warmup_epochs=3)


def test_teacher_temperature_warms_up_then_stays():
    assert linear_warmup_then_constant(0.04, 0.07, 4, 6).tolist() == pytest.approx([0.04, 0.05, 0.06, 0.07, 0.07, 0.07])
    assert linear_warmup_then_constant(0.04, 0.07, 0, 2).tolist() == [0.07, 0.07]


def test_head_shapes_weight_norm_bound_and_frozen_magnitude():
    torch.manual_seed(0)
    head = DINOHead(16, out_dim=10, hidden_dim=8, bottleneck_dim=4, object_out_dim=6)
    x = torch.randn(5, 16)
    out = head(x)
    assert out.shape == (5, 10) and head.forward_objects(x).shape == (5, 6)
    # the bottleneck is unit-norm and each last-layer row has norm g = 1, so |logit| <= 1 (Cauchy-Schwarz)
    assert out.abs().max() <= 1 + 1e-5
    magnitude = head.last_layer.parametrizations.weight.original0
    assert not magnitude.requires_grad and torch.all(magnitude == 1)
    free = DINOHead(16, out_dim=10, hidden_dim=8, bottleneck_dim=4, norm_last_layer=False)
    assert free.last_layer.parametrizations.weight.original0.requires_grad
    with pytest.raises(RuntimeError, match="object"):
        free.forward_objects(x)


def test_last_layer_gradients_cancelled_only_while_frozen():
    head = DINOHead(4, out_dim=3, hidden_dim=4, bottleneck_dim=2, norm_last_layer=False)
    head(torch.randn(2, 4)).sum().backward()
    cancel_last_layer_gradients(head, epoch=0, freeze_last_layer_epochs=1)
    assert all(p.grad is None for n, p in head.named_parameters() if "last_layer" in n)
    assert all(p.grad is not None for n, p in head.named_parameters() if "mlp" in n)
    head(torch.randn(2, 4)).sum().backward()
    cancel_last_layer_gradients(head, epoch=1, freeze_last_layer_epochs=1)
    assert all(p.grad is not None for n, p in head.named_parameters() if "last_layer" in n)


def _softmax(values, temp):
    exps = [math.exp(v / temp) for v in values]
    return [e / sum(exps) for e in exps]


def test_dino_loss_by_hand_two_crops():
    t1, t2 = [1.0, 0.0, 0.0], [0.0, 2.0, 0.0]
    s1, s2 = [0.5, 0.0, 0.0], [0.0, 0.0, 0.3]
    loss_fn = DINOLoss(3, [0.5], student_temp=0.1, center_momentum=0.9)
    loss = loss_fn([torch.tensor([s1]), torch.tensor([s2])], [torch.tensor([t1]), torch.tensor([t2])], epoch=0)

    def h(t, s):  # -sum p_t log q_s
        p, q = _softmax(t, 0.5), _softmax(s, 0.1)
        return -sum(pi * math.log(qi) for pi, qi in zip(p, q))

    # pairs (teacher 0, student 1) and (teacher 1, student 0); the centre was 0 for this call
    assert loss.item() == pytest.approx((h(t1, s2) + h(t2, s1)) / 2, rel=1e-5)
    # centre = 0.9 * 0 + 0.1 * mean(t1, t2)
    assert loss_fn.center[0].tolist() == pytest.approx([0.05, 0.1, 0.0])


def test_cross_entropy_of_a_distribution_with_itself_is_its_entropy():
    logits = torch.tensor([[0.2, -0.4, 1.0, 0.0]])
    p = torch.softmax(logits / 0.1, dim=-1)
    entropy = -(p * p.log()).sum()
    assert dino_cross_entropy(p, logits, 0.1).item() == pytest.approx(entropy.item(), rel=1e-5)


def test_views_sizes_determinism_and_normalisation():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    views = DINOViews(global_size=32, local_size=16, num_local_crops=3)
    torch.manual_seed(1)
    a = views(image)
    torch.manual_seed(1)
    b = views(image)
    assert [tuple(v.shape) for v in a] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    grey = eval_transform(8)(Image.new("RGB", (20, 20), (128, 128, 128)))
    assert grey.shape == (3, 8, 8)
    assert grey[1, 0, 0].item() == pytest.approx((128 / 255 - 0.456) / 0.224, rel=1e-5)


def test_crop_position_maps_follow_the_crop_and_the_flip():
    from cribo.method.views import CrIBoViews, patch_positions

    views = CrIBoViews(size=8)
    image = Image.new("RGB", (40, 20))
    _, pos = views.crop_with_positions(image, box=(4, 10, 8, 16), flip=False)
    # output pixel u samples original x = left + (u + 0.5) * w / S - 0.5 = 10.5 + 2u; y = top + v
    for u in range(2, 6):  # interior: bicubic reproduces a linear ramp exactly
        assert pos[0, 3, u].item() == pytest.approx(10.5 + 2 * u, abs=1e-4)
        assert pos[1, u, 3].item() == pytest.approx(4 + u, abs=1e-4)
    _, flipped = views.crop_with_positions(image, box=(4, 10, 8, 16), flip=True)
    assert torch.allclose(flipped, pos.flip(-1))
    # a 4-pixel patch's mean x is the mean of its four columns
    grid = patch_positions(pos[None], 4)
    assert grid.shape == (1, 4, 2)
    assert grid[0, 1, 0].item() == pytest.approx(pos[0, :4, 4:8].mean().item(), rel=1e-5)
    views_out, pos_out = views(image)
    assert [tuple(v.shape) for v in views_out] == [(3, 8, 8)] * 2 and [tuple(p.shape) for p in pos_out] == [(2, 8, 8)] * 2
