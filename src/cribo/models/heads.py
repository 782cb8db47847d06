"""The DINO projection head, with an optional second last layer for object vectors (CrIBo).

MLP (Linear-GELU x (nlayers-1), then Linear to a bottleneck; no batch norm) -> L2 normalisation ->
weight-normalised Linear without bias. CrIBo shares the MLP between [CLS] vectors and object
vectors and gives each its own last layer (official keys ``last_layer`` and ``last_layer_c``;
ours ``last_layer`` and ``last_layer_obj``, with ``parametrizations.weight.original0/1`` in place
of ``weight_g/weight_v`` because we use torch's parametrization API; a key converter comes with
the checkpoint import).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm


def _weight_normed_linear(in_dim: int, out_dim: int, freeze_magnitude: bool) -> nn.Linear:
    layer = weight_norm(nn.Linear(in_dim, out_dim, bias=False))
    magnitude = layer.parametrizations.weight.original0
    with torch.no_grad():
        magnitude.fill_(1.0)
    # norm_last_layer: every output unit's weight vector keeps norm 1, which DINO found stabilises training.
    magnitude.requires_grad = not freeze_magnitude
    return layer


class DINOHead(nn.Module):
    """``forward(B x in_dim) -> B x out_dim``; ``forward_objects(M x in_dim) -> M x object_out_dim``."""

    def __init__(self, in_dim: int, out_dim: int = 65536, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 nlayers: int = 3, norm_last_layer: bool = True, object_out_dim: int | None = None):
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"nlayers must be >= 1, got {nlayers}")
        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(a, b))
            if i < nlayers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        self.apply(self._init_weights)
        self.last_layer = _weight_normed_linear(bottleneck_dim, out_dim, norm_last_layer)
        self.last_layer_obj = (_weight_normed_linear(bottleneck_dim, object_out_dim, norm_last_layer)
                               if object_out_dim else None)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def _bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.mlp(x), dim=-1, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(self._bottleneck(x))

    def forward_objects(self, x: torch.Tensor) -> torch.Tensor:
        if self.last_layer_obj is None:
            raise RuntimeError("this head has no object last layer; build it with object_out_dim=...")
        return self.last_layer_obj(self._bottleneck(x))


def cancel_last_layer_gradients(module: nn.Module, epoch: int, freeze_last_layer_epochs: int) -> None:
    """Drop the gradients of every ``last_layer*`` parameter during the first epochs (DINO's trick)."""
    if epoch >= freeze_last_layer_epochs:
        return
    for name, param in module.named_parameters():
        if "last_layer" in name:
            param.grad = None
