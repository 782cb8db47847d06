"""DINO head: shapes, state-dict keys, the weight-norm bound, frozen magnitudes, gradient cancelling."""

import pytest
import torch
from torch import nn

from cribo.models.heads import DINOHead, cancel_last_layer_gradients


def _tiny(**kwargs) -> DINOHead:
    torch.manual_seed(0)
    return DINOHead(16, **{"out_dim": 10, "hidden_dim": 8, "bottleneck_dim": 4, **kwargs})


def test_output_shapes_and_object_layer():
    head = _tiny(object_out_dim=6)
    x = torch.randn(5, 16)
    assert head(x).shape == (5, 10)
    assert head.forward_objects(torch.randn(7, 16)).shape == (7, 6)
    with pytest.raises(RuntimeError, match="object"):
        _tiny().forward_objects(x)


def test_one_mlp_pass_for_images_and_objects_equals_two_passes_values_and_gradients():
    torch.set_default_dtype(torch.float64)  # so that only the algebra is compared, not the order of float sums
    try:
        head = _tiny(object_out_dim=6, norm_last_layer=False)
        images, objects = torch.randn(3, 16), torch.randn(5, 16)
        pair = head.forward_pair(images, objects)
        separate = (head(images), head.forward_objects(objects))
        weights = (torch.randn(3, 10), torch.randn(5, 6))  # a loss that weighs every logit differently
        grads = []
        for cls_logits, obj_logits in (pair, separate):
            head.zero_grad(set_to_none=True)
            ((cls_logits * weights[0]).sum() + (obj_logits * weights[1]).sum()).backward()
            grads.append({name: p.grad.clone() for name, p in head.named_parameters()})
    finally:
        torch.set_default_dtype(torch.float32)
    assert pair[0].shape == (3, 10) and pair[1].shape == (5, 6)
    assert torch.allclose(pair[0], separate[0], atol=1e-12) and torch.allclose(pair[1], separate[1], atol=1e-12)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 10  # 3 Linear (w, b), 2 last layers (g, v)
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-12), name
    with pytest.raises(RuntimeError, match="object"):
        _tiny().forward_pair(images.float(), objects.float())


def test_products_and_factors_equal_the_weight_normed_logits():
    # the teacher's path: each last layer's product with v, times g / ||v|| per output, is forward_pair's logits
    torch.set_default_dtype(torch.float64)
    try:
        head = _tiny(object_out_dim=6, norm_last_layer=False)
        with torch.no_grad():  # magnitudes other than 1, so that g is not cancelled by chance
            head.last_layer.parametrizations.weight.original0.uniform_(0.5, 2.0)
            head.last_layer_obj.parametrizations.weight.original0.uniform_(0.5, 2.0)
        images, objects = torch.randn(3, 16), torch.randn(5, 16)
        (cls_product, cls_scale), (obj_product, obj_scale) = head.forward_pair_with_scales(images, objects)
        cls_logits, obj_logits = head.forward_pair(images, objects)
    finally:
        torch.set_default_dtype(torch.float32)
    assert cls_scale.shape == (1, 10) and obj_scale.shape == (1, 6)
    assert torch.allclose(cls_product * cls_scale, cls_logits, atol=1e-12)
    assert torch.allclose(obj_product * obj_scale, obj_logits, atol=1e-12)
    assert not torch.allclose(cls_product, cls_logits, atol=1e-3)  # the factors do something
    with pytest.raises(RuntimeError, match="object"):
        _tiny().forward_pair_with_scales(images.float(), objects.float())


def test_state_dict_keys_follow_the_official_layout():
    head = _tiny(object_out_dim=6)
    p = "parametrizations.weight.original"
    assert set(head.state_dict()) == (
        {f"mlp.{i}.{w}" for i in (0, 2, 4) for w in ("weight", "bias")}  # Linear, GELU, Linear, GELU, Linear
        | {f"last_layer.{p}0", f"last_layer.{p}1", f"last_layer_obj.{p}0", f"last_layer_obj.{p}1"})
    sd = head.state_dict()
    assert sd[f"last_layer.{p}0"].shape == (10, 1) and sd[f"last_layer.{p}1"].shape == (10, 4)  # g: K x 1, v: K x D
    assert set(DINOHead(16, 10, 8, 4, nlayers=1).state_dict()) == {
        "mlp.weight", "mlp.bias", f"last_layer.{p}0", f"last_layer.{p}1"}


def test_mlp_init_is_truncated_normal_with_zero_bias():
    torch.manual_seed(0)
    head = DINOHead(256, out_dim=8, hidden_dim=256, bottleneck_dim=64)
    for layer in (head.mlp[0], head.mlp[2], head.mlp[4]):
        assert torch.all(layer.bias == 0)
        assert layer.weight.std().item() == pytest.approx(0.02, rel=0.05)
        assert layer.weight.mean().abs().item() < 1e-3


def test_unit_rows_bound_every_logit_by_one():
    # last_layer weight row k is w_k = g_k * v_k / ||v_k|| with g_k = 1, so ||w_k|| = 1. The head's
    # input to last_layer is z / ||z||, so by Cauchy-Schwarz |logit_k| = |<w_k, z>| <= ||w_k|| ||z|| = 1,
    # with equality when z is parallel to w_k.
    head = _tiny()
    w = head.last_layer.weight
    assert torch.allclose(w.norm(dim=1), torch.ones(10), atol=1e-6)
    z = torch.nn.functional.normalize(torch.randn(100, 4), dim=-1)
    assert head.last_layer(z).abs().max() <= 1 + 1e-6
    assert head.last_layer(w[3:4].detach())[0, 3].item() == pytest.approx(1.0, abs=1e-6)
    assert head(100 * torch.randn(50, 16)).abs().max() <= 1 + 1e-6  # whatever the input scale


def test_norm_last_layer_freezes_the_magnitude():
    head = _tiny(object_out_dim=6)  # norm_last_layer=True by default
    for layer in (head.last_layer, head.last_layer_obj):
        g, v = layer.parametrizations.weight.original0, layer.parametrizations.weight.original1
        assert torch.all(g == 1) and not g.requires_grad and v.requires_grad
    head(torch.randn(3, 16)).sum().backward()
    assert head.last_layer.parametrizations.weight.original0.grad is None
    assert head.last_layer.parametrizations.weight.original1.grad is not None
    free = _tiny(norm_last_layer=False, object_out_dim=6)
    for layer in (free.last_layer, free.last_layer_obj):
        g = layer.parametrizations.weight.original0
        assert torch.all(g == 1) and g.requires_grad


def test_last_layer_gradients_cancelled_only_while_frozen():
    head = _tiny(norm_last_layer=False, object_out_dim=6)
    wrapper = nn.ModuleDict({"head": head})  # names get a prefix, as in the training wrapper

    def backward():
        head.zero_grad(set_to_none=True)
        x = torch.randn(2, 16)
        (head(x).sum() + head.forward_objects(x).sum()).backward()

    def grads(part):
        return [p.grad for n, p in wrapper.named_parameters() if part in n]

    backward()
    cancel_last_layer_gradients(wrapper, epoch=0, freeze_last_layer_epochs=1)
    assert len(grads("last_layer")) == 4 and all(g is None for g in grads("last_layer"))  # g and v of both
    assert len(grads("mlp")) == 6 and all(g is not None for g in grads("mlp"))
    backward()
    cancel_last_layer_gradients(wrapper, epoch=1, freeze_last_layer_epochs=1)
    assert all(g is not None for g in grads("last_layer"))
    cancel_last_layer_gradients(wrapper, epoch=0, freeze_last_layer_epochs=0)  # no freezing at all
    assert all(g is not None for g in grads("last_layer"))


def test_rejects_bad_sizes():
    with pytest.raises(ValueError, match="nlayers"):
        DINOHead(16, 10, nlayers=0)
    with pytest.raises(ValueError, match="object_out_dim"):
        DINOHead(16, 10, object_out_dim=0)
