"""Our state <-> the official CrIBo checkpoint layout."""

import torch

from cribo.method.memory_bank import ObjectMemoryBank
from cribo.models.heads import DINOHead
from cribo.train.official_format import (bank_from_official, bank_to_official, loss_from_official,
                                         loss_to_official, model_from_official, model_to_official)


def test_bank_official_queue_is_newest_first_and_round_trips():
    bank = ObjectMemoryBank(num_images=3, max_objects=2, dim=1, generator=torch.Generator().manual_seed(0))
    # three images with 1, 2 and 1 objects; values name them: image i, object j -> 10*i + j
    bank.enqueue(torch.tensor([[10.0], [20.0], [21.0]]), torch.tensor([[-10.0], [-20.0], [-21.0]]), torch.tensor([1, 2]))
    bank.enqueue(torch.tensor([[30.0]]), torch.tensor([[-30.0]]), torch.tensor([1]))
    official = bank_to_official(bank)
    queue, counts = official["centroids_queue_cpu"], official["cpv_queue_cpu"]
    assert queue.shape == (2, 6, 1)
    # newest object first, as the official code shifts its queue: 30, then 21, 20, then 10
    assert queue[0, :4, 0].tolist() == [30.0, 21.0, 20.0, 10.0] and queue[1, :4, 0].tolist() == [-30.0, -21.0, -20.0, -10.0]
    assert counts.tolist() == [1, 2, 1]
    restored = ObjectMemoryBank(3, 2, 1)
    bank_from_official(restored, queue, counts)
    for q in (torch.tensor([[25.0]]), torch.tensor([[11.0]])):
        a, b = bank.retrieve(q, -q), restored.retrieve(q, -q)
        assert torch.equal(a.nn_view1, b.nn_view1) and torch.equal(a.cycle1, b.cycle1)
    assert torch.equal(bank_to_official(restored)["centroids_queue_cpu"], queue)


def test_head_keys_use_the_official_names_and_round_trip():
    head = DINOHead(8, 16, hidden_dim=8, bottleneck_dim=4, object_out_dim=12)
    ours = {f"head.{k}": v for k, v in head.state_dict().items()}
    official = model_to_official(ours, ddp_prefix=True)
    assert {"module.head.last_layer.weight_g", "module.head.last_layer.weight_v", "module.head.last_layer_c.weight_g",
            "module.head.last_layer_c.weight_v", "module.head.mlp.0.weight"} <= set(official)
    assert official["module.head.last_layer_c.weight_v"].shape == (12, 4)
    assert model_from_official(official).keys() == ours.keys()


def test_loss_centres_official_names():
    ours = {"global_loss.center": torch.ones(1, 4), "center_obj": torch.zeros(1, 3)}
    official = loss_to_official(ours)
    assert set(official) == {"center", "center_c"}
    back = loss_from_official(official, "cribo")
    assert all(torch.equal(back[k], ours[k]) for k in ours)
    assert set(loss_to_official({"center": torch.ones(1, 4)})) == {"center"}
