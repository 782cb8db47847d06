"""CrIBo as a :class:`~cribo.method.base.Method`: DINO's recipe plus object-level bootstrapping.

Views: two global crops with their original-image position maps (no local crops). Networks: the
DINO student/teacher with an object last layer (:class:`~cribo.method.cribo.ObjectNet`). Step:
:func:`~cribo.method.cribo.cribo_step`. Checkpoint additions beyond DINO's: the object centre
``center_c`` (inside ``dino_loss``) and the memory bank (``centroids_queue_cpu``, ``cpv_queue_cpu``).
"""

from __future__ import annotations

import torch

from cribo.method.cribo import ClusteringSettings, ObjectNet, cribo_step
from cribo.method.dino import DINOMethod
from cribo.method.losses import CrIBoLoss, LossWeights
from cribo.method.memory_bank import ObjectMemoryBank
from cribo.method.views import CrIBoViews
from cribo.train.distributed import all_gather_variable
from cribo.train.official_format import bank_from_official, bank_to_official


class CrIBoMethod(DINOMethod):
    name = "cribo"

    def __init__(self, cfg, device):
        super().__init__(cfg, device)
        self.object_out_dim = cfg["cribo"]["object_out_dim"]
        self.bank: ObjectMemoryBank | None = None

    def views(self):
        return CrIBoViews(self.cfg["model"]["img_size"], tuple(self.cfg["dino"]["global_crops_scale"]),
                          jitter=tuple(self.cfg["dino"]["color_jitter"]))

    def wrap(self, backbone, head):
        return ObjectNet(backbone, head)

    def setup_training(self, epochs, steps_per_epoch, seed):
        dino_cfg, cribo_cfg = self.cfg["dino"], self.cfg["cribo"]
        weights = cribo_cfg["loss_weights"]
        self.loss_fn = CrIBoLoss(dino_cfg["out_dim"], self.object_out_dim, self.teacher_temperatures(epochs),
                                 student_temp=dino_cfg["student_temp"], center_momentum=dino_cfg["center_momentum"],
                                 weights=LossWeights(weights["global"], weights["cross_view"], weights["cross_image"]),
                                 cross_image_norm=cribo_cfg["cross_image_norm"],
                                 cross_image_start_epoch=cribo_cfg["cross_image_start_epoch"]).to(self.device)
        if cribo_cfg["memory_bank"]:
            # the same initial contents on every rank (ranks have different seeds, the banks must not)
            self.bank = ObjectMemoryBank(cribo_cfg["queue_size"], cribo_cfg["num_clusters"],
                                         self.student.backbone.embed_dim, device=self.device,
                                         generator=torch.Generator().manual_seed(seed))
        self.settings = ClusteringSettings(cribo_cfg["num_clusters"], cribo_cfg["pos_alpha"],
                                           cribo_cfg["sinkhorn_lambda"], cribo_cfg["sinkhorn_iterations"],
                                           cribo_cfg["clustering_rounds"], cribo_cfg["hard_assignment"],
                                           cribo_cfg["update_marginal"], cribo_cfg["cycle_check"], cribo_cfg["top_k"])

    def step(self, online, batch, epoch, amp=None):
        views, positions = batch
        views = [v.to(self.device, non_blocking=True) for v in views]
        positions = [p.to(self.device, non_blocking=True) for p in positions]
        return cribo_step(online, self.teacher, self.loss_fn, self.bank, views, positions, epoch, self.settings,
                          gather=all_gather_variable, amp=amp)

    def checkpoint_state(self):
        state = super().checkpoint_state()
        if self.bank is not None:
            state.update(bank_to_official(self.bank))
        return state

    def load_checkpoint_state(self, ckpt):
        super().load_checkpoint_state(ckpt)
        if self.bank is not None:
            bank_from_official(self.bank, ckpt["centroids_queue_cpu"], ckpt["cpv_queue_cpu"])

    def replica_checksums(self):
        if self.bank is None:
            return {}
        bank = self.bank
        return {"bank_checksums": float(bank.entries.double().sum().item()) + float(bank.counts.sum()) + bank.head}
