"""BYOL (ORL stage 1) and ORL stage 3: loss, EMA schedule, box jitter, correspondence files, tiny runs."""

import math

import numpy as np
import pytest
import torch
import yaml

from cribo.cli import main
from cribo.method.byol import MLPHead, regression_loss, symmetric_loss
from cribo.method.correspondence import Correspondence, CorrespondenceError, load_correspondence, save_correspondence
from cribo.method.orl import ORLPairs, box_iou, image_names, jitter_box
from cribo.method.schedules import cosine_schedule
from cribo.method.views import BYOLViews, PatchViews
from cribo.models.backbones import backbone_from_checkpoint
from cribo.train.checkpoint import load_checkpoint

from conftest import write_voc


def test_regression_loss_values_from_the_cosine():
    e1, e2 = torch.tensor([[3.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    assert regression_loss(e1, e1).item() == pytest.approx(0.0)  # cos 1 -> 2 - 2 = 0
    assert regression_loss(e1, e2).item() == pytest.approx(2.0)  # cos 0
    assert regression_loss(e1, -e1).item() == pytest.approx(4.0)  # cos -1: the maximum
    diag = torch.tensor([[1.0, 1.0]])  # cos 45 degrees = 1/sqrt(2)
    assert regression_loss(e1, diag).item() == pytest.approx(2 - math.sqrt(2))
    # symmetric: both orders summed, so opposite pairs reach 8
    assert symmetric_loss([e1, e2], [-e2, -e1]).item() == pytest.approx(8.0)
    # batch mean: rows (cos 1) and (cos -1) -> (0 + 4) / 2
    assert regression_loss(torch.cat([e1, e1]), torch.cat([e1, -e1])).item() == pytest.approx(2.0)


def test_regression_loss_gives_no_gradient_to_the_target():
    p, z = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    regression_loss(p, z).backward()
    assert p.grad is not None and z.grad is None


def test_ema_momentum_schedule_endpoints():
    # tau_k = 1 - (1 - 0.99) * (cos(pi k / K) + 1) / 2 for k = 0 .. K-1
    taus = cosine_schedule(0.99, 1.0, epochs=2, steps_per_epoch=5)
    assert taus[0] == pytest.approx(0.99)
    k, big_k = 5, 10
    assert taus[k] == pytest.approx(1 - 0.01 * (math.cos(math.pi * k / big_k) + 1) / 2)  # halfway: 0.995
    assert taus[k] == pytest.approx(0.995)
    assert taus[-1] == pytest.approx(1 - 0.01 * (math.cos(math.pi * 9 / 10) + 1) / 2)
    assert np.all(np.diff(taus) > 0) and taus[-1] < 1.0


def test_mlp_head_shape_and_layers():
    head = MLPHead(16, 32, 8)
    linear1, bn, _, linear2 = head.mlp
    assert linear1.bias is not None and linear2.bias is None and isinstance(bn, torch.nn.BatchNorm1d)
    assert head(torch.randn(5, 16)).shape == (5, 8)


def test_box_iou_hand_worked():
    # (0,0,2,2) and (1,1,2,2): overlap 1x1 = 1, union 4 + 4 - 1 = 7
    assert box_iou([0, 0, 2, 2], [1, 1, 2, 2])[0, 0] == pytest.approx(1 / 7)
    assert box_iou([0, 0, 2, 2], [2, 0, 2, 2])[0, 0] == 0.0  # touching edges
    assert box_iou([0, 0, 4, 4], [0, 0, 4, 4])[0, 0] == 1.0


def test_box_jitter_stays_inside_and_overlaps():
    gen = torch.Generator().manual_seed(0)
    box, changed = (20, 10, 30, 40), 0
    for _ in range(200):
        x, y, w, h = jitter_box(box, 64, 60, generator=gen)
        assert x >= 0 and y >= 0 and x + w <= 64 and y + h <= 60 and w >= 1 and h >= 1
        assert box_iou(box, (x, y, w, h))[0, 0] > 0.5
        changed += (x, y, w, h) != box
    assert changed > 150  # almost always a real jitter, not the fallback


def test_box_jitter_falls_back_to_the_box_and_is_seeded():
    assert jitter_box((1, 2, 3, 4), 10, 10, attempts=0) == (1, 2, 3, 4)
    a = [jitter_box((5, 5, 20, 20), 40, 40, generator=torch.Generator().manual_seed(3)) for _ in range(2)]
    assert a[0] == a[1]


def _corr(n=4, k=2, dataset="voc", names=None):
    boxes = np.array([[0, 0, 16, 16], [8, 8, 20, 20]] * n, dtype=np.int32)
    knn = np.array([[(i + 1) % n, (i + 2) % n] for i in range(n)], dtype=np.int64)[:, :k]
    pairs = np.array([[0, 1], [1, 0]] * (n * k), dtype=np.int32)
    return Correspondence(image_names=np.asarray(names or [f"JPEGImages/t{i}.jpg" for i in range(n)]), dataset=dataset,
                          boxes=boxes, box_offsets=np.arange(0, 2 * n + 1, 2, dtype=np.int64), knn=knn, pairs=pairs,
                          pair_offsets=np.arange(0, 2 * n * k + 1, 2, dtype=np.int64),
                          pair_scores=np.ones(2 * n * k, np.float32), settings={"knn": k})


def test_correspondence_round_trip_and_accessors(tmp_path):
    path = tmp_path / "corr.npz"
    save_correspondence(_corr(), path)
    corr = load_correspondence(path)
    assert corr.num_images == 4 and corr.k == 2 and corr.settings == {"knn": 2}
    assert corr.image_boxes(1).tolist() == [[0, 0, 16, 16], [8, 8, 20, 20]]
    assert corr.neighbour_pairs(3, 1).tolist() == [[0, 1], [1, 0]]
    assert not list(tmp_path.glob(".*tmp*"))


@pytest.mark.parametrize("damage, message", [
    (lambda c: c.knn.__setitem__((0, 0), 0), "its own neighbour"),
    (lambda c: c.knn.__setitem__((1, 0), 9), "out of range"),
    (lambda c: c.pairs.__setitem__((0, 1), 5), "RoI index out of range"),
])
def test_damaged_correspondence_is_refused_naming_the_file(tmp_path, damage, message):
    corr = _corr()
    damage(corr)
    save_correspondence(corr, tmp_path / "bad.npz")
    with pytest.raises(CorrespondenceError, match=message) as err:
        load_correspondence(tmp_path / "bad.npz")
    assert "bad.npz" in str(err.value)


def test_correspondence_of_other_images_or_dataset_is_refused(tmp_path):
    corr = _corr()
    with pytest.raises(CorrespondenceError, match="image list changed"):
        corr.check_images([f"JPEGImages/t{i}.jpg" for i in range(5)], "voc", "c.npz")
    with pytest.raises(CorrespondenceError, match="dataset 'voc'"):
        corr.check_images(list(corr.image_names), "coco", "c.npz")
    with pytest.raises(CorrespondenceError, match="not found"):
        load_correspondence(tmp_path / "missing.npz")


def test_orl_samples_are_deterministic_under_a_seed(tmp_path):
    root = write_voc(tmp_path / "voc", {"train": [f"t{i}" for i in range(4)]}, size=32)
    paths = [root / "JPEGImages" / f"t{i}.jpg" for i in range(4)]
    assert image_names(paths, root) == [f"JPEGImages/t{i}.jpg" for i in range(4)]
    data = ORLPairs(paths, _corr(), BYOLViews(32), PatchViews(16), roi_size=16)
    a, b, c = data[(2, 7)], data[(2, 7)], data[(2, 8)]
    shapes = [[tuple(v.shape) for v in pair] for pair in a]
    assert shapes == [[(3, 32, 32)] * 2, [(3, 16, 16)] * 2, [(3, 16, 16)] * 2]
    assert all(torch.equal(x, y) for pa, pb in zip(a, b) for x, y in zip(pa, pb))
    assert not all(torch.equal(x, y) for pa, pc in zip(a, c) for x, y in zip(pa, pc))


def _run_config(tmp_path, method, arch="vit_tiny", **extra):
    root = write_voc(tmp_path / "voc", {"train": [f"t{i}" for i in range(4)], "val": ["v0"]}, size=32)
    model = {"arch": arch, "patch_size": 8, "img_size": 32, "depth": 1, "embed_dim": 32, "num_heads": 2}
    cfg = {"method": method, "seed": 1, "data": {"dataset": "voc", "root": str(root), "split": "train"},
           "model": model, "byol": {"projector_hidden_dim": 32, "out_dim": 16, "predictor_hidden_dim": 32},
           "optim": {"epochs": 2, "batch_size": 2, "warmup_epochs": 0, "optimizer": "sgd", "lr": 0.1,
                     "weight_decay": 1e-4, "weight_decay_end": 1e-4, "decay_all_parameters": True},
           "train": {"device": "cpu", "num_workers": 0, "progress": False, "log_every": 1, "threads": 1}, **extra}
    path = tmp_path / f"{method}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_byol_trains_and_its_online_backbone_is_evaluated(tmp_path):
    out = tmp_path / "byol"
    assert main(["train", "--config", str(_run_config(tmp_path, "byol")), "--output-dir", str(out)]) == 0
    ckpt = load_checkpoint(out / "checkpoint.pth")
    assert ckpt["method"] == "byol" and ckpt["epoch"] == 2 and ckpt["evaluated_network"] == "student"
    assert any(k.startswith("module.predictors.global.") for k in ckpt["student"])
    assert not any("predictors" in k for k in ckpt["teacher"])  # the target has no predictor
    assert set(ckpt["optimizer"]["param_groups"][0]) >= {"momentum"} and len(ckpt["optimizer"]["param_groups"]) == 1
    log = [yaml.safe_load(line) for line in (out / "log.txt").read_text().splitlines()]
    assert 0 <= log[-1]["loss"] <= 8 and log[0]["momentum"] < log[-1]["momentum"] < 1
    backbone = backbone_from_checkpoint(ckpt)
    online = ckpt["student"]["module.backbone.pos_embed"]
    assert torch.equal(backbone.vit.pos_embed, online)
    assert not torch.equal(online, ckpt["teacher"]["backbone.pos_embed"])  # the EMA target lags behind


@pytest.mark.slow  # two ResNet-18s and their SGD state: about 10 s on a shared core
def test_byol_on_a_torchvision_resnet(tmp_path):
    out = tmp_path / "byol-r18"
    cfg = _run_config(tmp_path, "byol", arch="resnet18")
    assert main(["train", "--config", str(cfg), "--output-dir", str(out), "--set", "optim.epochs=1"]) == 0
    ckpt = load_checkpoint(out / "checkpoint.pth")
    assert ckpt["student"]["module.projector.mlp.0.weight"].shape == (32, 512)  # res5 width of ResNet-18
    features = backbone_from_checkpoint(ckpt)
    assert features(torch.zeros(1, 3, 64, 64)).shape == (1, 2, 2, 512)  # stride 32


def test_orl_trains_three_branches_from_a_correspondence_file(tmp_path):
    save_correspondence(_corr(), tmp_path / "corr.npz")
    cfg = _run_config(tmp_path, "orl", orl={"correspondence": str(tmp_path / "corr.npz"), "roi_size": 16})
    out = tmp_path / "orl"
    assert main(["train", "--config", str(cfg), "--output-dir", str(out)]) == 0
    ckpt = load_checkpoint(out / "checkpoint.pth")
    assert {k.split(".")[2] for k in ckpt["student"] if ".predictors." in k} == {"global", "intra", "inter"}
    log = [yaml.safe_load(line) for line in (out / "log.txt").read_text().splitlines()]
    terms = [log[-1][f"loss_{b}"] for b in ("global", "intra", "inter")]
    assert log[-1]["loss"] == pytest.approx(sum(terms), rel=1e-6)  # weights 1/1/1


def test_orl_without_or_with_a_foreign_correspondence_fails_cleanly(tmp_path, capsys):
    assert main(["train", "--config", str(_run_config(tmp_path, "orl")), "--output-dir", str(tmp_path / "o")]) != 0
    assert "orl.correspondence" in capsys.readouterr().err
    save_correspondence(_corr(dataset="coco"), tmp_path / "coco.npz")
    cfg = _run_config(tmp_path, "orl", orl={"correspondence": str(tmp_path / "coco.npz")})
    assert main(["train", "--config", str(cfg), "--output-dir", str(tmp_path / "o2")]) != 0
    assert "computed on dataset 'coco'" in capsys.readouterr().err
