"""BYOL (Grill et al., 2020) as ORL's stage 1: image-level bootstrapping with an EMA target.

Networks (ORL's ``NonLinearNeckSimCLR`` projector and ``LatentPredictHead`` predictor): the online
network is backbone -> projector (Linear D->4096 with bias, BN, ReLU, Linear 4096->256 without
bias) -> predictor (the same shape, 256->4096->256); the target is an EMA copy of backbone +
projector, momentum 0.99 -> 1 cosine per iteration, updated after each optimizer step. Loss: for
prediction ``p`` and target projection ``z``, ``2 - 2 cos(p, z)`` averaged over the batch, summed
over both view orders, so it lies in [0, 8]. Each view goes through the networks on its own, so
BatchNorm statistics are per view, as in the official code.

Checkpoint layout (ours, OpenSelfSup's names in brackets): ``student`` = ``module.backbone.*``
[``online_net.0.*``], ``module.projector.*`` [``online_net.1.*``], ``module.predictors.<branch>.*``
[``head.predictor.*``]; ``teacher`` = ``backbone.*``, ``projector.*`` [``target_net.{0,1}.*``].
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cribo.method.base import Method


class MLPHead(nn.Module):
    """``N x in_dim -> N x out_dim``: Linear (bias) -> BatchNorm1d -> ReLU -> Linear (no bias).

    Linear weights use Kaiming-normal (fan_in) initialisation and zero biases, as OpenSelfSup's heads.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
                                 nn.Linear(hidden_dim, out_dim, bias=False))
        for module in self.mlp:
            if isinstance(module, nn.Linear):
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class BYOLNet(nn.Module):
    """Backbone + projector, and (online network only) one predictor per branch.

    ``forward(views, branches)``: ``views`` a list of ``B x 3 x S_i x S_i`` batches, each passed on
    its own; returns one ``B x out_dim`` tensor per view, the projection (``branches`` None, the
    target) or the prediction of the branch named ``branches[i]`` (the online network). One call
    per step keeps DistributedDataParallel to a single forward.
    """

    def __init__(self, backbone: nn.Module, projector: nn.Module, predictors: dict[str, nn.Module] | None = None):
        super().__init__()
        self.backbone = backbone
        self.projector = projector
        self.predictors = nn.ModuleDict(predictors or {})

    def forward(self, views: Sequence[torch.Tensor], branches: Sequence[str] | None = None) -> list[torch.Tensor]:
        outputs = []
        for i, view in enumerate(views):
            z = self.projector(self.backbone(view))
            outputs.append(z if branches is None else self.predictors[branches[i]](z))
        return outputs

    def encoder_parameters(self) -> list[nn.Parameter]:
        """Backbone then projector parameters: what the target mirrors, in a fixed order."""
        return list(self.backbone.parameters()) + list(self.projector.parameters())


def regression_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``2 - 2 cos(p, z)`` averaged over the batch: ``B x D, B x D -> scalar`` in [0, 4] (fp32)."""
    p = F.normalize(prediction.float(), dim=1)
    z = F.normalize(target.detach().float(), dim=1)
    return (2 - 2 * (p * z).sum(dim=1)).mean()


def symmetric_loss(predictions: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> torch.Tensor:
    """BYOL's symmetrised loss of one pair: view 1's prediction against view 2's target and vice versa, in [0, 8]."""
    (p1, p2), (z1, z2) = predictions, targets
    return regression_loss(p1, z2) + regression_loss(p2, z1)


class BYOLMethod(Method):
    """Image-level BYOL: two asymmetric views per image, one predictor."""

    name = "byol"
    evaluated_network = "student"  # ORL's extract_backbone_weights keeps the online backbone
    branches: tuple[str, ...] = ("global",)

    def views(self):
        from cribo.method.views import BYOLViews

        return BYOLViews(self.cfg["model"]["img_size"], tuple(self.cfg["byol"]["crop_scale"]))

    def build_networks(self):
        from cribo.models.backbones import build_backbone

        model_cfg, byol_cfg = self.cfg["model"], self.cfg["byol"]
        backbone = build_backbone(model_cfg, drop_path_rate=model_cfg["drop_path_rate"])
        width, out = byol_cfg["projector_hidden_dim"], byol_cfg["out_dim"]
        projector = MLPHead(backbone.embed_dim, width, out)
        predictors = {name: MLPHead(out, byol_cfg["predictor_hidden_dim"], out) for name in self.branches}
        self.student = BYOLNet(backbone, projector, predictors).to(self.device)
        # the target starts as an exact copy; it gets no drop path (as DINO's teacher)
        target_backbone = copy.deepcopy(backbone)
        for module in target_backbone.modules():
            if hasattr(module, "drop_prob"):
                module.drop_prob = 0.0
        self.teacher = BYOLNet(target_backbone, copy.deepcopy(projector)).to(self.device)
        for p in self.teacher.parameters():
            p.requires_grad = False
        return self.student, self.teacher

    def ema_pairs(self):
        return zip(self.student.encoder_parameters(), self.teacher.encoder_parameters())

    def ema_momentum(self) -> float:
        return self.cfg["byol"]["momentum_target"]

    def pairs(self, batch) -> list[list[torch.Tensor]]:
        """The batch as a list of view pairs, one per branch (here the global pair)."""
        return [list(batch)]

    def step(self, online, batch, epoch, amp=contextlib.nullcontext):
        pairs = [[v.to(self.device, non_blocking=True) for v in pair] for pair in self.pairs(batch)]
        views = [v for pair in pairs for v in pair]
        with torch.no_grad(), amp():
            targets = self.teacher(views)
        with amp():
            predictions = online(views, [name for name in self.branches for _ in (0, 1)])
        losses = {}
        for i, name in enumerate(self.branches):
            losses[f"loss_{name}"] = symmetric_loss(predictions[2 * i:2 * i + 2], targets[2 * i:2 * i + 2])
        weights = self.loss_weights()
        return {"loss": sum(weights[name] * losses[f"loss_{name}"] for name in self.branches), **losses}

    def loss_weights(self) -> dict[str, float]:
        return {"global": 1.0}
