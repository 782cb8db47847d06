"""mmseg-style transforms, sliding windows, decoders, poly lr / layer decay, and the two trained protocols."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cribo.data.registry import get_spec
from cribo.data.seg_transforms import MmsegTestTransform, MmsegTrainTransform, fit_scale, sliding_windows
from cribo.data.segmentation import DataError, VOCLayoutSegmentation
from cribo.eval.decoders import LinearDecoder, MaskTransformerDecoder, SegmentationModel
from cribo.eval.dense_training import param_groups, poly_lr, slide_logits, train_dense
from cribo.eval.finetune import build_finetune_model
from cribo.eval.linear import mmseg_datasets, train_linear_mmseg
from cribo.models.backbones import PixelPatches, ViTPatchFeatures, build_vit


def test_fit_scale_keeps_the_ratio_inside_both_bounds():
    # 500 x 375 into (2048, 512): the short side limits, 375 -> 512, 500 -> 682.67 -> 683
    assert fit_scale(500, 375, (2048, 512)) == (683, 512)
    # a 4000 x 500 panorama: the long side limits, 4000 -> 2048, 500 -> 256
    assert fit_scale(4000, 500, (2048, 512)) == (2048, 256)


def test_sliding_windows_cover_every_pixel_with_mmseg_grid():
    # 683 wide, crop 512, stride 480: ceil((683-512)/480)+1 = 2 columns, the last flush right at 171..683
    boxes = sliding_windows(512, 683, 512, 480)
    assert boxes == [(0, 0, 512, 512), (0, 171, 512, 683)]
    cover = np.zeros((512, 683), int)
    for t, l, b, r in boxes:
        cover[t:b, l:r] += 1
    assert cover.min() == 1 and cover.max() == 2
    # smaller than the crop: one window, the whole image
    assert sliding_windows(100, 60, 512, 480) == [(0, 0, 100, 60)]


def test_sliding_logits_of_a_pointwise_model_equal_the_whole_image_logits():
    # a per-pixel model gives the same logits on any window, so averaging overlaps changes nothing
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 1)
    image = torch.randn(3, 37, 50)
    slid = slide_logits(conv, image, 4, crop=16, stride=12)
    assert torch.allclose(slid, conv(image[None])[0], atol=1e-5)


def test_train_transform_crops_pads_and_keeps_pairs_aligned():
    image = np.zeros((40, 60, 3), np.uint8)
    image[:, 25:] = (255, 0, 0)
    mask = (image[..., 0] > 0).astype(np.uint8)
    tf = MmsegTrainTransform(crop=32, scale=(60, 40), ratio_range=(0.5, 2.0), photometric=False)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        x, m = tf(Image.fromarray(image), mask, g)
        assert x.shape == (3, 32, 32) and m.shape == (32, 32)
        valid = m != 255
        red = x[0] > x[1]
        assert (red[valid] == m[valid].bool()).float().mean() > 0.9
        # padding: ignored mask where the image is the padded zero
        assert torch.all(x[:, ~valid] == 0)


def test_crop_avoids_a_single_dominant_class_when_it_can():
    # 1 row of class 1 at the top of a 64 x 64 class-0 image: a 32 crop mostly sees class 0 only,
    # mmseg's rule redraws (up to 10 times) until no class exceeds 75 % -> the crop is at the top
    mask = np.zeros((64, 64), np.uint8)
    mask[:16] = 1
    tf = MmsegTrainTransform(crop=32, scale=(64, 64), ratio_range=(1.0, 1.0), photometric=False)
    tops = [tf.crop_box(mask, torch.Generator().manual_seed(s))[0] for s in range(30)]
    # class-1 share of a crop at top t is (16 - t) / 32; accepted crops (two classes, share in
    # (0.25, 0.75)) have t in 0..7: 8 of 33 tops, so P(accepting within 10 draws) = 1 - (25/33)^10 = 0.94,
    # against 8/33 = 0.24 for a plain random crop
    assert np.mean([t < 8 for t in tops]) > 0.8


def test_test_transform_resizes_the_image_and_keeps_the_mask():
    x, m = MmsegTestTransform((64, 16))(Image.new("RGB", (40, 20)), np.zeros((20, 40), np.uint8))
    assert x.shape == (3, 16, 32) and m.shape == (20, 40)


def test_poly_lr_endpoints_and_layer_decay_scales():
    assert poly_lr(0, 100, 0.01, 0.001) == pytest.approx(0.01)
    assert poly_lr(100, 100, 0.01, 0.001) == pytest.approx(0.001)
    assert poly_lr(50, 100, 0.01, 0.001) == pytest.approx(0.009 * 0.5 ** 0.9 + 0.001)
    vit = build_vit({"arch": "vit_tiny", "patch_size": 8, "img_size": 32, "depth": 3})
    model = build_finetune_model(ViTPatchFeatures(vit), 5, "linear", drop_path=0.0)
    groups = param_groups(model, 0.05, layer_decay=0.5)
    scales = {}
    for g in groups:
        for p in g["params"]:
            scales[id(p)] = (g["lr_scale"], g["weight_decay"])
    named = dict(model.named_parameters())
    # 3 blocks: embeddings at depth 0 -> 0.5^4, block 0 -> 0.5^3, block 2 -> 0.5^1, final norm -> 1, decoder 1
    assert scales[id(named["backbone.vit.pos_embed"])][0] == pytest.approx(0.5 ** 4)
    assert scales[id(named["backbone.vit.blocks.0.attn.qkv.weight"])] == (pytest.approx(0.5 ** 3), 0.05)
    assert scales[id(named["backbone.vit.blocks.2.attn.qkv.bias"])] == (pytest.approx(0.5), 0.0)
    assert scales[id(named["decoder.conv.weight"])] == (1.0, 0.05)


def test_mask_transformer_shapes_and_gradients():
    torch.manual_seed(0)
    dec = MaskTransformerDecoder(12, 5, num_layers=2, num_heads=3)
    tokens = torch.randn(2, 3, 4, 12, requires_grad=True)
    out = dec(tokens)
    assert out.shape == (2, 5, 3, 4)
    # LayerNorm over the classes: per patch the class logits have mean 0 (before the affine, which starts at 1/0)
    assert torch.allclose(out.mean(1), torch.zeros(2, 3, 4), atol=1e-5)
    out.sum().backward()
    assert tokens.grad.abs().sum() > 0 and dec.class_embed.grad.abs().sum() > 0


def test_segmentation_model_pads_odd_windows_and_freezes_backbone():
    backbone = PixelPatches(torch.zeros(3), 4)
    model = SegmentationModel(backbone, LinearDecoder(48, 3), freeze_backbone=True)
    assert model(torch.randn(2, 3, 10, 13)).shape == (2, 3, 10, 13)
    vit = build_vit({"arch": "vit_tiny", "patch_size": 8, "img_size": 32, "depth": 1})
    frozen = SegmentationModel(ViTPatchFeatures(vit), LinearDecoder(192, 3), freeze_backbone=True).train()
    assert not frozen.backbone.training and frozen.decoder.training
    assert all(not p.requires_grad for p in frozen.backbone.parameters())


def _voc(tiny_voc):
    (tiny_voc / "ImageSets/Segmentation/trainaug.txt").write_text(
        (tiny_voc / "ImageSets/Segmentation/train.txt").read_text())
    return get_spec("voc", tiny_voc)


def test_mmseg_linear_protocol_learns_a_separable_problem(tiny_voc):
    spec = _voc(tiny_voc)
    train, val = mmseg_datasets(tiny_voc, spec, crop=24, scale=(32, 32), ratio_range=(0.75, 1.5),
                                photometric=False)
    result = train_linear_mmseg(PixelPatches(torch.zeros(3), 4), train, val, spec.num_classes, iterations=150,
                                batch_size=6, optimizer="sgd", lr=0.5, weight_decay=0.0, crop=24, stride=16,
                                seed=0, progress=False)
    # scored at the original 32 x 32 masks (4-pixel patches blur class borders: not 100 %)
    assert result["protocol_name"] == "mmseg" and result["miou"] > 85
    assert result["train_loss_last"][0] < result["train_loss_first"][0]


def test_finetune_resumes_from_its_state_file(tiny_voc, tmp_path):
    spec = _voc(tiny_voc)
    train, val = mmseg_datasets(tiny_voc, spec, crop=16, scale=(32, 32), photometric=False)

    def model():
        torch.manual_seed(1)
        vit = build_vit({"arch": "vit_tiny", "patch_size": 8, "img_size": 16, "depth": 1})
        return build_finetune_model(ViTPatchFeatures(vit), spec.num_classes, "mask", num_heads=3, drop_path=0.1)

    kw = dict(iterations=4, batch_size=2, lr=1e-3, weight_decay=0.0, crop=16, stride=16, seed=0, progress=False)
    state = tmp_path / "state.pth"
    first = model()
    with pytest.raises(RuntimeError, match="stop"):
        train_dense(first, _StopAfter(train, 4), val, spec.num_classes, state_path=state, checkpoint_every=2, **kw)
    assert state.is_file()
    result = train_dense(model(), train, val, spec.num_classes, state_path=state, checkpoint_every=2, **kw)
    assert len(result["train_loss"]) == 4 and not state.exists()


class _StopAfter(torch.utils.data.Dataset):
    """A dataset that raises after ``n`` items: a crash in the middle of training."""

    def __init__(self, base, n):
        self.base, self.n, self.served = base, n, 0

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        self.served += 1
        if self.served > self.n + 2:
            raise RuntimeError("stop")
        return self.base[i]


def test_mask_value_outside_classes_is_named(tiny_voc):
    mask = np.zeros((32, 32), np.uint8)
    mask[3, 3] = 7
    Image.fromarray(mask, mode="L").save(tiny_voc / "SegmentationClass" / "v0.png")
    ds = VOCLayoutSegmentation(tiny_voc, "val", num_classes=3, ignore_index=255, dataset="voc")
    with pytest.raises(DataError, match=r"v0\.png holds value 7 .*classes 0-2"):
        ds[0]


def test_cli_finetune_row(tmp_path, tiny_voc):
    from cribo.cli import main
    from cribo.config import validate_run_config
    from cribo.train.checkpoint import save_checkpoint

    _voc(tiny_voc)
    cfg = validate_run_config({"method": "dino", "model": {"arch": "vit_tiny", "patch_size": 8, "img_size": 16,
                                                           "depth": 1}})
    vit = build_vit(cfg["model"])
    ckpt = tmp_path / "ckpt.pth"
    save_checkpoint({"method": "dino", "config": cfg,
                     "teacher": {f"backbone.{k}": v for k, v in vit.state_dict().items()}}, ckpt)
    out = tmp_path / "ft.json"
    assert main(["eval", "finetune", "--checkpoint", str(ckpt), "--dataset", "voc", "--data-root", str(tiny_voc),
                 "--decoder", "mask", "--iterations", "3", "--batch-size", "2", "--crop", "16", "--stride", "16",
                 "--scale", "32", "32", "--out", str(out), "--no-progress"]) == 0
    row = json.loads(out.read_text())
    assert row["protocol"] == "finetune" and row["decoder"] == "mask" and row["iterations"] == 3
    assert row["precision"] == "fp32"  # the CLI default, auto, on a CPU
    assert len(row["per_class_iou"]) == 21 and row["per_class_iou"][3] is None and 0 <= row["miou"] <= 100


def test_same_seed_same_numbers_whatever_the_rng_state_before(tiny_voc):
    # the decoder initialisation is seeded too: two runs in one process, RNG moved in between
    spec = _voc(tiny_voc)
    train, val = mmseg_datasets(tiny_voc, spec, crop=16, scale=(32, 32))
    results = []
    for noise in (0, 1):
        torch.manual_seed(0)  # the same pretrained backbone ...
        vit = build_vit({"arch": "vit_tiny", "patch_size": 8, "img_size": 16, "depth": 1})
        torch.manual_seed(123 + noise)  # ... then whatever the process did before the evaluation
        torch.rand(10)
        model = build_finetune_model(ViTPatchFeatures(vit), spec.num_classes, "mask", num_heads=3, seed=5)
        results.append(train_dense(model, train, val, spec.num_classes, iterations=3, batch_size=2, lr=1e-3,
                                   crop=16, stride=16, seed=5, progress=False))
    assert results[0]["train_loss"] == results[1]["train_loss"] and results[0]["miou"] == results[1]["miou"]
    lin = [train_linear_mmseg(PixelPatches(torch.zeros(3), 4), train, val, spec.num_classes, iterations=3,
                              batch_size=2, crop=16, stride=16, seed=3, progress=False) for _ in range(2)]
    assert lin[0]["train_loss"] == lin[1]["train_loss"]


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16),
                                              ("fp32", torch.float32), ("auto", torch.float32)])
def test_precision_autocasts_training_and_sliding_inference(tiny_voc, precision, dtype):
    # on CPU "auto" resolves to fp32; fp16 goes through the GradScaler
    spec = _voc(tiny_voc)
    train, val = mmseg_datasets(tiny_voc, spec, crop=16, scale=(32, 32), photometric=False)
    torch.manual_seed(0)
    vit = build_vit({"arch": "vit_tiny", "patch_size": 8, "img_size": 16, "depth": 1})
    model = build_finetune_model(ViTPatchFeatures(vit), spec.num_classes, "linear", seed=0)
    seen = []  # (training?, dtype of the logits) of every forward
    model.register_forward_hook(lambda module, inputs, logits: seen.append((module.training, logits.dtype)))
    result = train_dense(model, train, val, spec.num_classes, iterations=3, batch_size=2, lr=1e-3, crop=16,
                         stride=16, seed=0, precision=precision, progress=False)
    assert result["precision"] == ("fp32" if precision == "auto" else precision)
    assert {d for training, d in seen if training} == {dtype}
    assert {d for training, d in seen if not training} == {dtype}
    assert all(np.isfinite(result["train_loss"])) and len(result["train_loss"]) == 3


def test_auto_precision_on_cpu_gives_the_fp32_numbers(tiny_voc):
    spec = _voc(tiny_voc)
    train, val = mmseg_datasets(tiny_voc, spec, crop=16, scale=(32, 32))
    runs = [train_linear_mmseg(PixelPatches(torch.zeros(3), 4), train, val, spec.num_classes, iterations=3,
                               batch_size=2, crop=16, stride=16, seed=3, precision=p, progress=False)
            for p in ("fp32", "auto")]
    assert runs[0]["train_loss"] == runs[1]["train_loss"] and runs[0]["miou"] == runs[1]["miou"]
