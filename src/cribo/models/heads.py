"""The DINO projection head, with an optional second last layer for object vectors (CrIBo).

Architecture of DINO's ``DINOHead`` (``use_bn=False``), as copied by CrIBo's
``source/models/vision_transformer.py``: an MLP (``nlayers - 1`` blocks Linear -> GELU, then a
Linear to the bottleneck; trunc-normal std .02 weights, zero biases), an L2 normalisation, and a
weight-normalised Linear without bias (``last_layer``) whose magnitudes are initialised to 1 and,
with ``norm_last_layer``, frozen. CrIBo shares the MLP between [CLS] vectors and object vectors and
gives each its own last layer (official ``forward`` / ``forward_c``; ours ``forward`` /
``forward_objects``).

State-dict keys (ours -> official CrIBo checkpoint ``head.*``):

=============================================================  ==========================
``mlp.{0,2,4}.{weight,bias}`` (``mlp.{weight,bias}`` if 1 layer)  the same
``last_layer.parametrizations.weight.original0`` (g, ``K x 1``)  ``last_layer.weight_g``
``last_layer.parametrizations.weight.original1`` (v, ``K x D``)  ``last_layer.weight_v``
``last_layer_obj.parametrizations.weight.original{0,1}``         ``last_layer_c.weight_{g,v}``
=============================================================  ==========================

The difference comes from torch's parametrization API (``torch.nn.utils.parametrizations.weight_norm``,
``dim=0`` like the deprecated ``nn.utils.weight_norm``); the tensors are identical, so converting
is a key rename (done by the checkpoint importer).

For speed, not for the method, :meth:`DINOHead.forward_pair` runs [CLS] rows and object rows
through the shared MLP in one pass (CrIBo needs both every step): one pass of ``B + M`` rows makes
bigger, faster matrix products than two, and accumulates each MLP weight gradient once. The last
layers' products go through :func:`cribo.models.fast_linear.linear` (oneDNN on the CPU in float32,
faster there than torch's default kernel at these ``rows x 65536`` shapes; ``F.linear`` elsewhere).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from cribo.models.fast_linear import linear


def _weight_normed_linear(in_dim: int, out_dim: int, freeze_magnitude: bool) -> nn.Linear:
    """``K x D`` weight ``w_k = g_k * v_k / ||v_k||`` with every ``g_k = 1`` (so each row has unit norm)."""
    layer = weight_norm(nn.Linear(in_dim, out_dim, bias=False), dim=0)
    magnitude = layer.parametrizations.weight.original0  # g, shape K x 1
    with torch.no_grad():
        magnitude.fill_(1.0)
    # norm_last_layer: rows stay unit-norm for the whole run, which DINO found stabilises training.
    magnitude.requires_grad = not freeze_magnitude
    return layer


class DINOHead(nn.Module):
    """DINO head with an optional object last layer.

    Args:
        in_dim: backbone feature size ``D_in``.
        out_dim: number of prototypes ``K`` of the image ([CLS]) last layer.
        hidden_dim, bottleneck_dim, nlayers: MLP widths and number of Linear layers (>= 1).
        norm_last_layer: freeze the weight-norm magnitudes of the last layer(s) at 1.
        object_out_dim: when given, a second last layer ``last_layer_obj`` of this width, sharing the
            MLP, for CrIBo's object vectors.
    """

    def __init__(self, in_dim: int, out_dim: int = 65536, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 nlayers: int = 3, norm_last_layer: bool = True, object_out_dim: int | None = None):
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"nlayers must be >= 1, got {nlayers}")
        if object_out_dim is not None and object_out_dim < 1:
            raise ValueError(f"object_out_dim must be >= 1 or None, got {object_out_dim}")
        if nlayers == 1:  # a bare Linear, so the keys are mlp.weight / mlp.bias as in the official head
            self.mlp: nn.Module = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
            for _ in range(nlayers - 2):
                layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        # Initialise before creating the last layers: as in DINO, those keep torch's default init of v.
        self.apply(self._init_weights)
        self.last_layer = _weight_normed_linear(bottleneck_dim, out_dim, norm_last_layer)
        self.last_layer_obj = (None if object_out_dim is None
                               else _weight_normed_linear(bottleneck_dim, object_out_dim, norm_last_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        """Shared MLP then L2 normalisation: ``N x D_in -> N x bottleneck_dim``, unit-norm rows."""
        return F.normalize(self.mlp(x), dim=-1, p=2)  # default eps 1e-12, as the official head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Image ([CLS]) logits: ``B x D_in -> B x out_dim``, each entry in ``[-1, 1]`` when g = 1."""
        return linear(self.bottleneck(x), self.last_layer.weight)

    def forward_objects(self, x: torch.Tensor) -> torch.Tensor:
        """Object logits through ``last_layer_obj``: ``M x D_in -> M x object_out_dim``."""
        return linear(self.bottleneck(x), self._object_layer().weight)

    def forward_pair(self, images: torch.Tensor, objects: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(forward(images), forward_objects(objects))`` with one MLP pass over both:
        ``B x D_in, M x D_in -> B x out_dim, M x object_out_dim``."""
        image_rows, object_rows = self._pair_bottleneck(images, objects)
        return linear(image_rows, self.last_layer.weight), linear(object_rows, self._object_layer().weight)

    def forward_pair_with_scales(self, images: torch.Tensor, objects: torch.Tensor
                                 ) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """:meth:`forward_pair` without writing either normalised last-layer weight, for the teacher's head.

        Returns ``((B x out_dim, 1 x out_dim), (M x object_out_dim, 1 x object_out_dim))``: each last
        layer's product with its directions ``v`` and the per-output factors ``g / ||v||``, whose
        product is :meth:`forward_pair`'s logits (equal up to float rounding). Writing ``w = g v / ||v||``
        is a ``K x bottleneck_dim`` pass written and read back (4-5 ms per 65536-wide layer on two CPU
        cores); the norms take one read of ``v``, and the caller folds the factors into a pass it makes
        over the logits anyway (the teacher's centring and sharpening,
        :func:`cribo.method.losses.sharpen_in_place`).
        """
        image_rows, object_rows = self._pair_bottleneck(images, objects)
        return _product_and_scale(image_rows, self.last_layer), _product_and_scale(object_rows, self._object_layer())

    def _pair_bottleneck(self, images: torch.Tensor, objects: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One MLP pass over both row sets: ``B x D_in, M x D_in -> B x bottleneck_dim, M x bottleneck_dim``."""
        self._object_layer()  # a head without an object layer fails before any work
        hidden = self.bottleneck(torch.cat([images, objects]))  # cat promotes (e.g. bf16 [CLS], fp32 objects)
        return hidden[:images.shape[0]], hidden[images.shape[0]:]

    def _object_layer(self) -> nn.Linear:
        if self.last_layer_obj is None:
            raise RuntimeError("this head has no object last layer; build it with object_out_dim=...")
        return self.last_layer_obj


def _product_and_scale(hidden: torch.Tensor, layer: nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
    """``N x D`` rows, a weight-normed ``K x D`` layer -> ``(hidden @ v^T, g^T / ||v||^T)``, ``N x K`` and ``1 x K``."""
    weights = layer.parametrizations.weight
    magnitude, direction = weights.original0, weights.original1  # g: K x 1, v: K x D (dim=0 weight norm)
    scale = magnitude / torch.linalg.vector_norm(direction, dim=1, keepdim=True)
    return linear(hidden, direction), scale.t()


def cancel_last_layer_gradients(module: nn.Module, epoch: int, freeze_last_layer_epochs: int) -> None:
    """Drop the gradients of every parameter whose name contains ``last_layer`` while ``epoch < freeze_last_layer_epochs``.

    DINO's ``cancel_gradients_last_layer``: call between ``backward()`` and ``optimizer.step()``.
    Gradients are set to ``None`` (not zero tensors), so the optimiser skips those parameters
    entirely (no weight decay, no moment update), as in the official code. Covers ``last_layer``
    and ``last_layer_obj`` under any prefix (``head.``, ``module.``).
    """
    if epoch >= freeze_last_layer_epochs:
        return
    for name, param in module.named_parameters():
        if "last_layer" in name:
            param.grad = None
