"""One CrIBo training step, composed from the pieces (views, clustering, bank, losses).

Teacher (no gradient): both views through the backbone -> [CLS] and patch tokens; the tokens of
both views are clustered jointly into objects; object vectors (means of un-normalised tokens) and
their bank neighbours (retrieved before this batch is enqueued) go through the *current* teacher
head, together with the [CLS] tokens (one MLP pass, then each last layer, whose weight
normalisation the loss applies as column factors while it sharpens). Student: the same
views, the teacher's assignment applied to its own tokens, the same heads. Then the three losses
of :class:`cribo.method.losses.CrIBoLoss`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from cribo.method.clustering import joint_view_clustering, object_vectors
from cribo.method.dtypes import at_least_fp32
from cribo.method.losses import CrIBoLoss, ObjectTargets
from cribo.method.memory_bank import ObjectMemoryBank
from cribo.method.views import patch_positions
from cribo.models.heads import DINOHead


@dataclass(frozen=True)
class ClusteringSettings:
    num_clusters: int = 32
    pos_alpha: float = 1.0
    sinkhorn_lambda: float = 20.0
    sinkhorn_iterations: int = 5
    rounds: int = 5
    hard_assignment: bool = True
    update_marginal: bool = True
    cycle_check: bool = True
    top_k: int = 1


class ObjectNet(nn.Module):
    """Backbone + head returning [CLS] logits, patch tokens and, given an assignment, object logits.

    ``forward(2B x 3 x S x S, assignment B x 2N x K | None) -> (2B x K_img logits, 2B x N x D tokens,
    2M x K_obj object logits | None)``, the two views stacked view-major (view-1 objects first).
    """

    def __init__(self, backbone: nn.Module, head: DINOHead):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, images: torch.Tensor, assignment: torch.Tensor | None = None):
        tokens = self.backbone.forward_features(images)  # 2B x (P + N) x D, after the final norm
        patches = tokens[:, self.backbone.num_prefix_tokens:]
        if assignment is None:
            return self.head(tokens[:, 0]), patches, None
        obj = self.object_rows(patches, assignment)
        # [CLS] and object rows through the shared MLP in one pass; each last layer's weight is normalised once
        cls_logits, obj_logits = self.head.forward_pair(tokens[:, 0], obj)
        return cls_logits, patches, obj_logits

    @staticmethod
    def object_rows(patches: torch.Tensor, assignment: torch.Tensor) -> torch.Tensor:
        """``2B x N x D`` tokens (views stacked), ``B x 2N x K`` assignment -> ``2M x D`` object means, view 1 first."""
        b = patches.shape[0] // 2
        with torch.autocast(patches.device.type, enabled=False):  # object means in fp32, as officially
            obj1, obj2, _ = object_vectors(at_least_fp32(patches[:b]), at_least_fp32(patches[b:]), assignment)
        return torch.cat([obj1, obj2])


def cribo_step(student: nn.Module, teacher: ObjectNet, loss_fn: CrIBoLoss, bank: ObjectMemoryBank | None,
               views: list[torch.Tensor], positions: list[torch.Tensor], epoch: int,
               settings: ClusteringSettings, gather=None, amp=contextlib.nullcontext) -> dict[str, torch.Tensor | float]:
    """Losses of one batch; enqueues the batch's objects into ``bank`` after retrieval.

    Args:
        student: the student :class:`ObjectNet` (possibly wrapped in DistributedDataParallel).
        views: two ``B x 3 x S x S`` batches; positions: two ``B x 2 x S x S`` coordinate maps.
        gather: ``fn(tensor) -> tensor`` concatenating a tensor over processes (identity when None),
            so every process enqueues the same objects and the banks stay identical.
        amp: context manager for the network forwards (autocast, or nothing for fp32); clustering,
            object vectors, retrieval and the losses always run in fp32.
    """
    gather = gather or (lambda t: t)
    b = views[0].shape[0]
    images = torch.cat(views)
    patch = teacher.backbone.patch_embed.patch_size[0]
    with torch.no_grad():
        with amp():
            t_features = teacher.backbone.forward_features(images)
        t_tokens = t_features[:, teacher.backbone.num_prefix_tokens:]
        t1, t2 = at_least_fp32(t_tokens[:b]), at_least_fp32(t_tokens[b:])
        pos = torch.cat([patch_positions(p.to(t1.dtype), patch) for p in positions], dim=1)  # B x 2N x 2
        assignment = joint_view_clustering(
            torch.cat([t1, t2], dim=1), pos, settings.num_clusters, settings.pos_alpha, settings.sinkhorn_lambda,
            settings.sinkhorn_iterations, settings.rounds, settings.hard_assignment, settings.update_marginal)
        obj1, obj2, valid = object_vectors(t1, t2, assignment)
        m = obj1.shape[0]
        # the loss's targets in their natural order (see ObjectTargets): each view's objects teach the other view
        head_rows = [obj2, obj1]
        cycle = None
        cycle_fraction = float("nan")
        if bank is not None:
            found = bank.retrieve(obj1, obj2, top_k=settings.top_k)
            cycle = (found.cycle1, found.cycle2)
            if not settings.cycle_check:
                cycle = (torch.ones_like(found.cycle1), torch.ones_like(found.cycle2))
            cycle_fraction = found.cycle1.float().mean().item() if found.cycle1.numel() else 0.0
            bank.enqueue(gather(obj1), gather(obj2), gather(valid.sum(dim=1)))
        if cycle is not None and epoch >= loss_fn.cross_image_start_epoch:
            # only the neighbours that pass the cycle check get a loss: the others skip the head
            head_rows += [found.nn_view1[0][cycle[0]], found.nn_view2[1][cycle[1]]]
        else:
            cycle = None
        targets = ObjectTargets.build(m, cycle, device=obj1.device)
        # the head's rows in the order the loss reads them (sorted by the student row they teach), so its
        # outputs become the teacher distributions in place; the [CLS] rows likewise, view 2 first
        cls_tokens = t_features[:, 0]
        with amp():  # [CLS], objects and neighbours in one pass through the teacher's head
            # its last layers' weight normalisation is left to the loss, as column factors of the logits
            (t_cls, cls_scale), (t_obj, obj_scale) = teacher.head.forward_pair_with_scales(
                torch.cat([cls_tokens[b:], cls_tokens[:b]]), torch.cat(head_rows)[targets.order])
        t_cls, t_obj = at_least_fp32(t_cls), at_least_fp32(t_obj)
    with amp():
        s_cls, _, s_obj = student(images, assignment)
    # stacked views (2B and 2M rows): the loss makes one gradient tensor for each
    losses = loss_fn.forward_sorted(at_least_fp32(s_cls), t_cls, at_least_fp32(s_obj), t_obj, targets, epoch,
                                    teacher_scales=(at_least_fp32(cls_scale), at_least_fp32(obj_scale)))
    return {**losses, "objects_per_image": valid.sum(dim=1).float().mean().item(), "cycle_fraction": cycle_fraction}
