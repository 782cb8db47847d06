import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cribo.data.registry import get_spec
from cribo.eval.linear import LinearHead, PairedCropFlip, leopart_datasets, train_linear
from cribo.models.backbones import PixelPatches


def test_convolving_then_upsampling_equals_upsampling_then_convolving():
    torch.manual_seed(0)
    head = LinearHead(6, 3)
    torch.nn.init.normal_(head.conv.bias)
    tokens = torch.randn(2, 4, 5, 6)
    ours = head(tokens, 20)
    leopart_order = head.conv(F.interpolate(tokens.permute(0, 3, 1, 2), size=(20, 20), mode="bilinear",
                                            align_corners=False))
    assert torch.allclose(ours, leopart_order, atol=1e-5)


def test_paired_crop_keeps_image_and_mask_aligned():
    # the mask is a function of the image (red where red), so after any crop and flip it must still be
    image = np.zeros((40, 60, 3), np.uint8)
    image[:, 25:] = (255, 0, 0)
    mask = (image[..., 0] > 0).astype(np.uint8)
    from PIL import Image

    torch.manual_seed(0)
    for _ in range(20):
        x, m = PairedCropFlip(16)(Image.fromarray(image), mask)
        red = x[0] > x[1]  # normalised red channel above green where the image is red
        assert (red == m.bool()).float().mean() > 0.9  # only the interpolated boundary column may differ


def test_linear_probe_learns_a_separable_problem(tiny_voc):
    # raw colour patches separate the fixture's three classes linearly
    spec = get_spec("voc", tiny_voc)
    (tiny_voc / "ImageSets/Segmentation/trainaug.txt").write_text((tiny_voc / "ImageSets/Segmentation/train.txt").read_text())
    train, val = leopart_datasets(tiny_voc, spec, 32)
    result = train_linear(PixelPatches(torch.zeros(3), 8), train, val, spec.num_classes, epochs=40, drop_at=30,
                          lr=0.5, batch_size=6, mask_size=4, seed=0, progress=False)
    # the 4 x 4 nearest-resized masks: row 0 background, row 1 void, rows 2-3 classes 1 | 2
    assert result["miou"] == pytest.approx(100.0)
    assert result["train_loss"][-1] < result["train_loss"][0]


def test_cli_linear_row_and_table(tmp_path, tiny_voc):
    import json

    from cribo.cli import main
    from cribo.config import validate_run_config
    from cribo.results.tables import build_linear_table
    from cribo.train.checkpoint import save_checkpoint

    (tiny_voc / "ImageSets/Segmentation/trainaug.txt").write_text((tiny_voc / "ImageSets/Segmentation/train.txt").read_text())
    cfg = validate_run_config({"method": "pixels", "model": {"patch_size": 8, "img_size": 32}})
    ckpt = tmp_path / "ckpt.pth"
    save_checkpoint({"method": "pixels", "config": cfg, "teacher": {"pixel_mean": torch.zeros(3)}}, ckpt)
    out = tmp_path / "row.json"
    assert main(["eval", "linear", "--checkpoint", str(ckpt), "--dataset", "voc", "--data-root", str(tiny_voc),
                 "--epochs", "2", "--drop-at", "1", "--mask-size", "8", "--batch-size", "3", "--out", str(out),
                 "--no-progress"]) == 0
    row = json.loads(out.read_text())
    assert row["protocol"] == "linear" and row["protocol_name"] == "leopart" and len(row["train_loss"]) == 2
    table = build_linear_table([row])
    assert table.iloc[0].miou == round(row["miou"], 2) and table.iloc[0].mask_size == 8
