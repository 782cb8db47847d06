"""The oneDNN products of :mod:`cribo.models.fast_linear`: values and gradients against float64, where they apply.

The bound is the textbook one for a float32 dot product of length ``n`` (any summation order):
``|fl(x . w) - x . w| <= n * u * (|x| . |w|)`` with ``u = 2**-24``, so the check holds for oneDNN's
and MKL's orders alike and fails for a wrong formula (a transposed or missing term is off by
O(|x| . |w|)). The shapes cover both routes of the weight's gradient (oneDNN up to
``FEW_ROWS`` rows, torch's kernel beyond) and the row buckets (rows padded in the forward pass,
split into whole buckets and a rest for the input's gradient, or neither at a multiple of
``ROW_BUCKET``).
"""

import copy

import pytest
import torch
import torch.nn.functional as F

from cribo.method.cribo import ClusteringSettings, ObjectNet, cribo_step
from cribo.method.losses import CrIBoLoss
from cribo.method.memory_bank import ObjectMemoryBank
from cribo.models import fast_linear
from cribo.models.backbones import build_vit
from cribo.models.fast_linear import linear, uses_onednn
from cribo.models.heads import DINOHead

U = 2.0 ** -24
needs_onednn = pytest.mark.skipif(not fast_linear.onednn_available(), reason="this torch build has no oneDNN")


def assert_within_dot_bound(value: torch.Tensor, exact: torch.Tensor, bound: torch.Tensor) -> None:
    excess = (value.double() - exact).abs() - bound
    assert excess.max().item() <= 0, f"off by {excess.max().item():.3g} beyond the float32 bound"


@needs_onednn
@pytest.mark.parametrize("shape, bias", [((7, 13), True), ((2, 5, 13), False), ((3, 256), False), ((64, 9), False), ((70, 9), True)])
def test_values_and_gradients_within_the_float32_dot_product_bound(shape, bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g, requires_grad=True)
    w = torch.randn(11, shape[-1], generator=g, requires_grad=True)
    b = torch.randn(11, generator=g, requires_grad=True) if bias else None
    assert uses_onednn(x, w, b)
    assert (x.numel() // shape[-1] > fast_linear.FEW_ROWS) == (shape == (70, 9))
    y = linear(x, w, b)
    upstream = torch.randn(y.shape, generator=g)
    (y * upstream).sum().backward()

    x64, w64, up64 = x.detach().double(), w.detach().double(), upstream.double()
    b64 = None if b is None else b.detach().double()
    n = shape[-1]
    assert_within_dot_bound(y, F.linear(x64, w64, b64),
                            n * U * (x64.abs() @ w64.abs().T + (0 if b64 is None else b64.abs())) + 1e-12)
    # dL/dx = upstream @ w (sums over the 11 outputs), dL/dw = upstream^T @ x (sums over the rows)
    rows_x, rows_up = x64.reshape(-1, n), up64.reshape(-1, 11)
    assert_within_dot_bound(x.grad, up64 @ w64, 11 * U * (up64.abs() @ w64.abs()) + 1e-12)
    assert_within_dot_bound(w.grad, rows_up.T @ rows_x, rows_x.shape[0] * U * (rows_up.abs().T @ rows_x.abs()) + 1e-12)
    if bias:
        assert_within_dot_bound(b.grad, rows_up.sum(0), rows_x.shape[0] * U * rows_up.abs().sum(0) + 1e-12)


def test_falls_back_to_torch_where_onednn_does_not_apply(monkeypatch):
    w = torch.randn(4, 3)
    assert not uses_onednn(torch.randn(2, 3, dtype=torch.float64), w.double())  # float64: not a oneDNN type here
    assert not uses_onednn(torch.randn(0, 3), w)  # no rows
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast picks the precision: leave it to F.linear
        assert not uses_onednn(torch.randn(2, 3), w)
    monkeypatch.setattr(fast_linear, "ENABLED", False)  # CRIBO_ONEDNN_LINEAR=0
    assert not uses_onednn(torch.randn(2, 3), w)
    x = torch.randn(2, 3, dtype=torch.float64)
    assert torch.equal(linear(x, w.double()), F.linear(x, w.double()))
    assert linear(torch.randn(0, 3), w).shape == (0, 4)


@needs_onednn
def test_a_float32_step_with_onednn_matches_the_step_without(monkeypatch):
    """Whole CrIBo step in float32: the losses and every student gradient with and without oneDNN.

    The two differ by float32 summation order only, ~1e-7 relative per product; through this tiny net
    that stays below 1e-5 relative (losses) and 1e-4 of each gradient tensor's largest entry. A wrong
    gradient formula in either path is off by O(1) of that.
    """
    torch.manual_seed(0)

    def make():
        backbone = build_vit({"arch": "vit_tiny", "patch_size": 16, "img_size": 32}, drop_path_rate=0.0)
        head = DINOHead(backbone.embed_dim, 64, hidden_dim=32, bottleneck_dim=16, object_out_dim=64)
        return ObjectNet(backbone, head)

    student = make()
    teacher = make()
    teacher.load_state_dict(student.state_dict())
    g = torch.Generator().manual_seed(1)
    views = [torch.randn(4, 3, 32, 32, generator=g) for _ in range(2)]
    grid = torch.stack(torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij"))
    positions = [grid.expand(4, 2, 32, 32).clone() for _ in range(2)]
    settings = ClusteringSettings(num_clusters=3)

    def run(enabled):
        monkeypatch.setattr(fast_linear, "ENABLED", enabled)
        torch.manual_seed(2)  # the clustering draws its seeds from torch's global generator
        s, t = copy.deepcopy(student), copy.deepcopy(teacher)
        loss_fn = CrIBoLoss(64, 64, [0.04, 0.04])
        bank = ObjectMemoryBank(8, 3, s.backbone.embed_dim, generator=torch.Generator().manual_seed(0))
        for _ in range(2):  # fill the bank, then a step with the cross-image term
            out = cribo_step(s, t, loss_fn, bank, views, positions, 1, settings)
        out["loss"].backward()
        return out, {name: p.grad for name, p in s.named_parameters() if p.grad is not None}

    fast, fast_grads = run(True)
    plain, plain_grads = run(False)
    for key in ("loss", "global", "cross_view", "cross_image"):
        assert abs(fast[key].item() - plain[key].item()) <= 1e-5 * max(1.0, abs(plain[key].item())), key
    assert fast_grads.keys() == plain_grads.keys() and len(plain_grads) > 10
    for name, grad in plain_grads.items():
        scale = grad.abs().max().item()
        assert (fast_grads[name] - grad).abs().max().item() <= 1e-4 * scale + 1e-12, name


@needs_onednn
@pytest.mark.parametrize("gelu", [False, True])
def test_products_without_autograd_within_the_float32_bound(gelu):
    g = torch.Generator().manual_seed(1)
    x, w, b = torch.randn(2, 37, 24, generator=g), torch.randn(40, 24, generator=g), torch.randn(40, generator=g)
    with torch.no_grad():
        y = fast_linear.linear_without_autograd(x, w, b, gelu=gelu)
    x64, w64, b64 = x.double(), w.double(), b.double()
    exact = F.linear(x64, w64, b64)
    bound = 24 * U * (x64.abs() @ w64.abs().T + b64.abs()) + 1e-12
    if gelu:  # |GELU'| <= 1.13, plus GELU's own rounding (a few units in the last place)
        exact, bound = F.gelu(exact), 1.13 * bound + 8 * U * F.gelu(exact).abs() + 1e-7
    assert y.shape == (2, 37, 40)
    assert_within_dot_bound(y, exact, bound)


def test_products_without_autograd_refuse_inputs_that_want_a_gradient():
    x = torch.randn(3, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="no_grad"):
        fast_linear.linear_without_autograd(x, torch.randn(5, 4))


@pytest.mark.parametrize("onednn", [True, False])
def test_vit_forward_without_autograd_equals_its_forward_with_autograd(monkeypatch, onednn):
    """:func:`cribo.models.backbones.onednn_without_autograd`: same modules and keys, the same output (exactly
    with torch's kernels, to float32 rounding with oneDNN's), and autograd untouched."""
    from timm.models.vision_transformer import VisionTransformer

    if onednn and not fast_linear.onednn_available():
        pytest.skip("this torch build has no oneDNN")
    monkeypatch.setattr(fast_linear, "ENABLED", onednn)
    torch.manual_seed(0)
    vit = build_vit({"arch": "vit_tiny", "patch_size": 16, "img_size": 32, "depth": 2})
    plain = VisionTransformer(img_size=32, patch_size=16, num_classes=0, qkv_bias=True, dynamic_img_size=True,
                              embed_dim=192, depth=2, num_heads=3)
    assert list(vit.state_dict()) == list(plain.state_dict())
    kinds = {type(m).__name__ for m in vit.modules()}
    assert {"_LinearWithoutAutogradKernel", "_MlpWithoutAutogradKernel"} <= kinds and "Linear" not in kinds
    images = torch.randn(3, 3, 32, 32)
    with_grad = vit.forward_features(images)
    with torch.no_grad():
        without = vit.forward_features(images)
    assert with_grad.requires_grad and not without.requires_grad
    if onednn:
        assert (with_grad - without).abs().max().item() < 1e-4
    else:
        assert torch.equal(with_grad, without)
    with_grad.sum().backward()
    assert all(p.grad is not None for p in vit.parameters() if p.requires_grad)
