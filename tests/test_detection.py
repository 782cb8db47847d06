"""Detection / instance segmentation: COCO AP on a known answer, the schedule, a finite toy loss, bad input."""

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image

from cribo.eval import detection


def _coco_file(tmp_path, size=32):
    """One image with one 10 x 10 square object (category 7) at rows/cols 10..19."""
    from pycocotools import mask as mask_utils

    (tmp_path / "JPEGImages").mkdir(exist_ok=True)
    image = np.full((size, size, 3), 40, np.uint8)
    image[10:20, 10:20] = (220, 30, 30)
    Image.fromarray(image).save(tmp_path / "JPEGImages" / "a.jpg")
    mask = np.zeros((size, size), np.uint8)
    mask[10:20, 10:20] = 1
    rle = mask_utils.encode(np.asfortranarray(mask))
    rle["counts"] = rle["counts"].decode("ascii")
    data = {"images": [{"id": 1, "file_name": "JPEGImages/a.jpg", "width": size, "height": size}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 7, "iscrowd": 0, "segmentation": rle,
                             "area": 100.0, "bbox": [10.0, 10.0, 10.0, 10.0]}],
            "categories": [{"id": 7, "name": "square"}]}
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return path


def _rle(mask):
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def test_mask_ap_on_a_toy_image_with_a_known_answer(tmp_path):
    data = detection.CocoInstances(_coco_file(tmp_path), tmp_path, train=False)
    exact = np.zeros((32, 32), np.uint8)
    exact[10:20, 10:20] = 1
    result = detection.coco_ap(data.coco, [{"image_id": 1, "category_id": 7, "score": 0.9,
                                            "segmentation": _rle(exact)}], "segm")
    assert result == pytest.approx({"AP": 100.0, "AP50": 100.0, "AP75": 100.0})
    # an 8 x 8 mask inside the 10 x 10 object: IoU 64 / 100 = 0.64, a hit at IoU thresholds
    # 0.50, 0.55, 0.60 and a miss at 0.65 ... 0.95 -> AP = 3 / 10 of the thresholds = 30, AP50 100, AP75 0
    inner = np.zeros((32, 32), np.uint8)
    inner[11:19, 11:19] = 1
    result = detection.coco_ap(data.coco, [{"image_id": 1, "category_id": 7, "score": 0.9,
                                            "segmentation": _rle(inner)}], "segm")
    assert result == pytest.approx({"AP": 30.0, "AP50": 100.0, "AP75": 0.0})
    # the same for boxes: [11, 11, 8, 8] inside [10, 10, 10, 10]
    boxes = detection.coco_ap(data.coco, [{"image_id": 1, "category_id": 7, "score": 0.9,
                                           "bbox": [11.0, 11.0, 8.0, 8.0]}], "bbox")
    assert boxes == pytest.approx({"AP": 30.0, "AP50": 100.0, "AP75": 0.0})
    assert detection.coco_ap(data.coco, [], "segm") == {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}


def test_one_x_schedule_warmup_and_steps():
    assert detection.lr_at(0, 0.02, (60000, 80000), 1000) == pytest.approx(0.02 * 1e-3)
    assert detection.lr_at(500, 0.02, (60000, 80000), 1000) == pytest.approx(0.02 * (1e-3 * 0.5 + 0.5))
    assert detection.lr_at(1000, 0.02, (60000, 80000), 1000) == pytest.approx(0.02)
    assert detection.lr_at(60000, 0.02, (60000, 80000), 1000) == pytest.approx(0.002)
    assert detection.lr_at(89999, 0.02, (60000, 80000), 1000) == pytest.approx(0.0002)
    assert detection.SHORT_SIDES_1X == (640, 672, 704, 736, 768, 800)


def test_detector_loads_our_resnet50_and_its_loss_is_finite_on_a_toy_batch(tmp_path):
    from cribo.models.backbones import build_resnet

    torch.manual_seed(0)
    resnet = build_resnet("resnet50")
    model = detection.build_detector(1, resnet.state_dict(), min_size=(32,), test_size=32, max_size=64,
                                     rpn_pre_nms_top_n_train=64, rpn_post_nms_top_n_train=16,
                                     box_batch_size_per_image=8)
    assert torch.equal(model.backbone.body.layer4[2].conv3.weight, resnet.layer4[2].conv3.weight)
    assert isinstance(model.backbone.body.bn1, torch.nn.BatchNorm2d)  # trainable BN, not frozen
    data = detection.CocoInstances(_coco_file(tmp_path), tmp_path)
    image, target = data[0]
    assert target["labels"].tolist() == [1] and target["boxes"].tolist() == [[10.0, 10.0, 20.0, 20.0]]
    assert target["masks"].shape == (1, 32, 32) and int(target["masks"].sum()) == 100
    model.train()
    losses = model([image, image], [target, target])
    assert {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())


def test_sampling_sizes_reach_torchvisions_detector_and_default_to_its_own():
    from torchvision.models.detection import maskrcnn_resnet50_fpn_v2

    def sizes(model):
        rpn, roi = model.rpn, model.roi_heads
        return (rpn.fg_bg_sampler.batch_size_per_image, roi.fg_bg_sampler.batch_size_per_image,
                rpn._pre_nms_top_n, rpn._post_nms_top_n)

    # the defaults are the 1x recipe's, which are torchvision's own
    reference = maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=2)
    assert sizes(detection.build_detector(1, None, **detection.sampling_kwargs())) == sizes(reference) == (
        256, 512, {"training": 2000, "testing": 1000}, {"training": 2000, "testing": 1000})
    toy = detection.build_detector(1, None, **detection.sampling_kwargs(64, 32, 100, 50))
    assert sizes(toy) == (64, 32, {"training": 100, "testing": 50}, {"training": 100, "testing": 50})
    with pytest.raises(ValueError, match="roi_batch_per_image must be at least 1, got 0"):
        detection.sampling_kwargs(roi_batch_per_image=0)


def test_a_checkpoint_without_a_resnet50_is_refused(tmp_path):
    from cribo.config import validate_run_config
    from cribo.models.backbones import build_resnet, build_vit

    cfg = validate_run_config({"method": "dino", "model": {"arch": "vit_tiny", "patch_size": 8, "img_size": 32,
                                                           "depth": 1}})
    vit = build_vit(cfg["model"], drop_path_rate=0.0)
    ckpt = {"method": "dino", "config": cfg, "teacher": {f"backbone.{k}": v for k, v in vit.state_dict().items()}}
    with pytest.raises(detection.DetectionDataError, match="needs a ResNet-50 backbone.*ViTPatchFeatures"):
        detection.resnet50_state_from_checkpoint(ckpt, "dino.pth")
    with pytest.raises(detection.DetectionDataError, match="holds resnet_tiny"):
        detection.resnet50_state_from_checkpoint(build_resnet("resnet_tiny").state_dict(), "tiny.pth")


def test_detect_rows_become_the_detect_table():
    from cribo.results.tables import build_detect_table, to_markdown

    row = {"protocol": "detect", "experiment": "e", "run_name": "orl", "method": "orl", "arch": "resnet50",
           "dataset": "instances_val2017", "iterations": 90000, "batch_size": 16, "test_size": 800,
           "AP_bb": 40.3, "AP50_bb": 60.2, "AP75_bb": 44.4, "AP_mk": 36.3, "AP50_mk": 57.3, "AP75_mk": 38.9,
           "seconds_per_iteration": 0.5}
    table = build_detect_table([row, {"protocol": "svm", "map": 1.0}])
    assert len(table) == 1 and table.loc[0, "AP_mk"] == 36.3
    assert "| 40.30 | 60.20 | 44.40 | 36.30 | 57.30 | 38.90 |" in to_markdown(table)


def test_interrupted_training_resumes_to_the_same_weights(tmp_path):
    data = detection.CocoInstances(_coco_file(tmp_path, size=64), tmp_path)
    kwargs = dict(batch_size=1, lr=0.001, steps=(), warmup=0, progress=False)

    # 64 px: at batch 1 every BatchNorm still sees more than one value per channel; few proposals and
    # sampled RoIs: the same code path at a fraction of the CPU time; built once, copied (init is slow)
    torch.manual_seed(0)
    initial = detection.build_detector(1, None, min_size=(64,), test_size=64, max_size=128,
                                       rpn_pre_nms_top_n_train=64, rpn_post_nms_top_n_train=16,
                                       box_batch_size_per_image=8)

    def fresh():
        return copy.deepcopy(initial)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bit-identity is a same-thread-count promise (parallel reductions reorder sums)
    straight = fresh()
    detection.train_detector(straight, data, iterations=2, **kwargs)
    resumed, state = fresh(), tmp_path / "row.json.state.pth"
    detection.train_detector(resumed, data, iterations=1, state_path=state, checkpoint_every=1, **kwargs)
    again = fresh()  # a new process: the state file carries model, optimizer and iteration
    detection.train_detector(again, data, iterations=2, state_path=state, checkpoint_every=1, **kwargs)
    torch.set_num_threads(threads)
    for (name, a), b in zip(straight.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name


class _Recorder(torch.utils.data.Dataset):
    """Images 0..n-1 whose reads are recorded (the detector is a stub: only the batching is tested)."""

    def __init__(self, n):
        self.n, self.read = n, []

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        self.read.append(i)
        return torch.zeros(3, 4, 4), {"labels": torch.tensor([1])}


class _Stub(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))

    def forward(self, images, targets):
        return {"loss": self.w * len(images)}


def test_each_process_takes_its_slice_of_the_global_batch():
    # global batch 4 over 2 processes: each reads 2 images per iteration, together exactly the batch a
    # single process reads, in the same (seed, epoch) order
    single = _Recorder(8)
    detection.train_detector(_Stub(), single, iterations=3, batch_size=4, steps=(), warmup=0, progress=False)
    ranks = []
    for rank in (0, 1):
        data = _Recorder(8)
        detection.train_detector(_Stub(), data, iterations=3, batch_size=4, steps=(), warmup=0, progress=False,
                                 rank=rank, world_size=2)
        assert len(data.read) == 3 * 2
        ranks.append(data.read)
    for it in range(3):
        batch = single.read[4 * it:4 * it + 4]
        assert ranks[0][2 * it:2 * it + 2] == batch[:2] and ranks[1][2 * it:2 * it + 2] == batch[2:]
    with pytest.raises(ValueError, match="global batch \\(3\\) must split evenly over 2 processes"):
        detection.train_detector(_Stub(), _Recorder(8), iterations=1, batch_size=3, world_size=2, progress=False)
    with pytest.raises(ValueError, match="3 training images cannot fill one global batch of 4 over 2 processes"):
        detection.train_detector(_Stub(), _Recorder(3), iterations=1, batch_size=4, world_size=2, progress=False)


@pytest.mark.slow
def test_two_processes_train_one_detector_and_rank_zero_writes_the_row(tmp_path):
    import subprocess
    import sys

    from cribo.models.backbones import build_resnet

    torch.manual_seed(0)
    torch.save(build_resnet("resnet50").state_dict(), tmp_path / "r50.pth")
    ann = _coco_file(tmp_path, size=64)
    data = json.loads(ann.read_text())  # a second image (the same file): one per process
    data["images"].append({**data["images"][0], "id": 2})
    data["annotations"].append({**data["annotations"][0], "id": 2, "image_id": 2})
    ann.write_text(json.dumps(data))
    out = tmp_path / "row.json"
    done = subprocess.run([sys.executable, "-m", "cribo.cli", "eval", "detect", "--checkpoint", str(tmp_path / "r50.pth"),
                           "--train-ann", str(ann), "--val-ann", str(ann), "--train-images", str(tmp_path),
                           "--val-images", str(tmp_path), "--iterations", "2", "--batch-size", "2", "--steps",
                           "--warmup", "0", "--min-size", "64", "--test-size", "64", "--max-size", "128",
                           "--roi-batch-per-image", "8", "--proposals-train", "16", "--proposals-test", "16",
                           "--device", "cpu", "--nproc-per-node", "2", "--no-progress", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "torch.distributed.run --standalone --nproc_per_node=2" in done.stdout
    row = json.loads(out.read_text())
    # CPU processes: DDP without SyncBN (torch has no CPU SyncBN), recorded in the row
    assert row["world_size"] == 2 and row["sync_bn"] is False and row["iterations"] == 2
    assert (row["roi_batch_per_image"], row["rpn_batch_per_image"], row["proposals_train"], row["proposals_test"]) \
        == (8, 256, 16, 16)
    assert np.isfinite(row["loss"]) and done.stdout.count("detection: box AP") == 1
    assert torch.load(tmp_path / "row.json.state.pth", weights_only=True)["iteration"] == 2
