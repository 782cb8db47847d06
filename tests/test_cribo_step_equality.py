"""The optimised CrIBo step equals the plain one: every loss and every student gradient, on a tiny batch.

``reference_step`` is the step as first written (before issue 14's optimisations), kept here in
plain form: each head call on its own (so each weight-normed last layer is recomputed per call),
the teacher head run on every bank neighbour whether or not it passes the cycle check, teacher
distributions from :func:`teacher_probs`, and the loss terms from their autograd definitions
(:func:`dino_cross_entropy`, :func:`cross_view_object_loss`, :func:`cross_image_object_loss`).

Both run in float64 (the method keeps float64 and upcasts only half precisions), so the 1e-5
bound tests the algebra and not float32 rounding: in float32 the two orders of summation alone
differ by ~1e-7 relative, i.e. up to ~1e-4 on the O(100) gradients of this tiny head.
"""

import copy
import math

import pytest
import torch

from cribo.method.clustering import joint_view_clustering, object_vectors
from cribo.method.cribo import ClusteringSettings, ObjectNet, cribo_step
from cribo.method.dino import dino_cross_entropy
from cribo.method.losses import CrIBoLoss, cross_image_object_loss, cross_view_object_loss, teacher_probs
from cribo.method.memory_bank import ObjectMemoryBank
from cribo.method.views import patch_positions
from cribo.models.backbones import build_vit
from cribo.models.heads import DINOHead

TOLERANCE = 1e-5


def reference_step(student, teacher, loss_fn, bank, views, positions, epoch, settings):
    """Today's step before the optimisations, written out: returns the loss dict (``loss`` has a graph)."""
    b = views[0].shape[0]
    images = torch.cat(views)
    patch = teacher.backbone.patch_embed.patch_size[0]
    with torch.no_grad():
        tokens = teacher.backbone.forward_features(images)
        t_cls = teacher.head(tokens[:, 0])
        t1, t2 = tokens[:b, 1:], tokens[b:, 1:]
        pos = torch.cat([patch_positions(p, patch) for p in positions], dim=1)
        assignment = joint_view_clustering(torch.cat([t1, t2], dim=1), pos, settings.num_clusters, settings.pos_alpha,
                                           settings.sinkhorn_lambda, settings.sinkhorn_iterations, settings.rounds)
        obj1, obj2, valid = object_vectors(t1, t2, assignment)
        t_obj = (teacher.head.forward_objects(obj1), teacher.head.forward_objects(obj2))
        found = bank.retrieve(obj1, obj2, top_k=settings.top_k)
        m, k = found.cycle1.shape
        neighbours = tuple(teacher.head.forward_objects(rows.reshape(m * k, -1)).reshape(m, k, -1)
                           for rows in (found.nn_view1[0], found.nn_view2[1]))
        bank.enqueue(obj1, obj2, valid.sum(dim=1))
    s_tokens = student.backbone.forward_features(images)
    s_cls = student.head(s_tokens[:, 0])
    s1, s2, _ = object_vectors(s_tokens[:b, 1:], s_tokens[b:, 1:], assignment)
    s_obj = (student.head.forward_objects(s1), student.head.forward_objects(s2))

    temp = loss_fn.temperature(epoch)
    dino = loss_fn.global_loss
    (sc1, sc2), (tc1, tc2) = s_cls.chunk(2), t_cls.chunk(2)
    p1, p2 = teacher_probs(tc1, dino.center, temp), teacher_probs(tc2, dino.center, temp)
    l_global = (dino_cross_entropy(p1, sc2, dino.student_temp) + dino_cross_entropy(p2, sc1, dino.student_temp)) / 2
    dino.update_center([tc1, tc2])
    o1, o2 = (teacher_probs(t, loss_fn.center_obj, temp) for t in t_obj)
    l_view = cross_view_object_loss(o1, o2, *s_obj, loss_fn.student_temp)
    l_image = l_view * 0.0
    if epoch >= loss_fn.cross_image_start_epoch:
        nn1, nn2 = (teacher_probs(t, loss_fn.center_obj, temp) for t in neighbours)
        l_image = cross_image_object_loss(nn1, nn2, *s_obj, found.cycle1, found.cycle2, loss_fn.student_temp,
                                          loss_fn.cross_image_norm)
    loss_fn.update_object_center(t_obj)
    return {"loss": l_global + l_view + l_image, "global": l_global, "cross_view": l_view, "cross_image": l_image}


def _tiny_setup(top_k: int, norm: str):
    torch.manual_seed(0)
    model_cfg = {"arch": "vit_tiny", "patch_size": 8, "img_size": 32, "depth": 2, "embed_dim": 48, "num_heads": 2}

    def make(drop_path: float) -> ObjectNet:
        backbone = build_vit(model_cfg, drop_path_rate=drop_path)
        head = DINOHead(48, 96, hidden_dim=64, bottleneck_dim=16, norm_last_layer=False, object_out_dim=80)
        return ObjectNet(backbone, head)

    student, teacher = make(0.0), make(0.0)
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad = False
    loss_fn = CrIBoLoss(96, 80, [0.04, 0.05, 0.06], cross_image_norm=norm)
    bank = ObjectMemoryBank(6, 4, 48, generator=torch.Generator().manual_seed(0))
    settings = ClusteringSettings(num_clusters=4, pos_alpha=1.0, top_k=top_k)
    g = torch.Generator().manual_seed(1)
    views = [torch.randn(3, 3, 32, 32, generator=g) for _ in range(2)]
    axis = torch.arange(32.0) + 0.5
    positions = [torch.stack([axis.expand(32, 32) + shift, axis[:, None].expand(32, 32)])[None].repeat(3, 1, 1, 1)
                 for shift in (0.0, 6.0)]
    return student, teacher, loss_fn, bank, settings, views, positions


def _run(step, student, teacher, loss_fn, bank, views, positions, epoch, settings):
    student.zero_grad(set_to_none=True)
    torch.manual_seed(123)  # the clustering seeds are drawn from the global generator
    out = step(student, teacher, loss_fn, bank, views, positions, epoch, settings)
    out["loss"].backward()
    grads = {name: p.grad.clone() for name, p in student.named_parameters() if p.grad is not None}
    return out, grads


@pytest.fixture
def float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.mark.parametrize("top_k,norm", [(1, "first_direction"), (2, "per_direction")])
def test_optimised_step_equals_reference_losses_and_gradients(float64, top_k, norm):
    student, teacher, loss_fn, bank, settings, views, positions = _tiny_setup(top_k, norm)
    assert next(student.parameters()).dtype == torch.float64
    # epoch 0 fills the bank with this batch's objects; later epochs see slightly different views,
    # so their neighbours are close to (not equal to) their objects and many pass the cycle check
    noise = torch.Generator().manual_seed(2)
    for epoch in (0, 1, 2):
        if epoch:
            views = [v + 0.1 * torch.randn(v.shape, generator=noise) for v in views]
        state = (copy.deepcopy(loss_fn), copy.deepcopy(bank))
        ours, our_grads = _run(cribo_step, student, teacher, loss_fn, bank, views, positions, epoch, settings)
        ref_loss, ref_bank = state
        ref, ref_grads = _run(reference_step, student, teacher, ref_loss, ref_bank, views, positions, epoch, settings)
        if epoch >= 1:
            assert ref["cross_image"].item() > 0 and ours["cycle_fraction"] > 0  # the term is exercised
        for key in ("loss", "global", "cross_view", "cross_image"):
            assert abs(ours[key].item() - ref[key].item()) <= TOLERANCE, (epoch, key, ours[key], ref[key])
        assert our_grads.keys() == ref_grads.keys()
        for name, grad in ref_grads.items():
            assert (our_grads[name] - grad).abs().max().item() <= TOLERANCE, (epoch, name)
        # the centres and the bank evolve identically
        assert torch.allclose(loss_fn.center_obj, ref_loss.center_obj, atol=1e-6)
        assert torch.allclose(loss_fn.global_loss.center, ref_loss.global_loss.center, atol=1e-6)
        assert torch.equal(bank.counts, ref_bank.counts) and torch.allclose(bank.entries, ref_bank.entries)
        with torch.no_grad():  # a small update, so the next epoch compares different weights
            for p in student.parameters():
                p.add_(torch.randn_like(p) * 1e-3)


def test_a_step_whose_views_share_no_object_trains_the_global_term_only(monkeypatch):
    # every view-1 token in cluster 0 and every view-2 token in cluster 1: no cluster is present in both
    # views, so the batch has M = 0 objects (possible on one rank of a multi-GPU run); the step must not crash
    import cribo.method.cribo as cribo_module

    def split_by_view(tokens, positions, num_clusters, *args):
        b, two_n, _ = tokens.shape
        assignment = torch.zeros(b, two_n, num_clusters)
        assignment[:, : two_n // 2, 0] = 1.0
        assignment[:, two_n // 2:, 1] = 1.0
        return assignment

    monkeypatch.setattr(cribo_module, "joint_view_clustering", split_by_view)
    student, teacher, loss_fn, bank, settings, views, positions = _tiny_setup(1, "first_direction")
    counts_before = bank.counts.clone()
    out, grads = _run(cribo_step, student, teacher, loss_fn, bank, views, positions, 1, settings)
    assert out["objects_per_image"] == 0.0 and out["cross_view"].item() == 0.0 and out["cross_image"].item() == 0.0
    assert out["loss"].item() == pytest.approx(out["global"].item()) and math.isfinite(out["loss"].item())
    assert grads and all(torch.isfinite(g).all() for g in grads.values())
    # the three images still take their FIFO slots, with no object each
    assert bank.counts[:3].tolist() == [0, 0, 0] and bank.counts[3:].tolist() == counts_before[:3].tolist()
