import numpy as np
import torch
from PIL import Image

from cribo.cli import main
from cribo.eval.figures import colourise, nearest_objects, palette


def test_palette_is_the_voc_colour_map():
    colours = palette(21)
    assert colours[0].tolist() == [0, 0, 0] and colours[1].tolist() == [128, 0, 0]
    assert colours[2].tolist() == [0, 128, 0] and colours[15].tolist() == [192, 128, 128]  # person
    assert colourise(np.array([[1, 255]]), 21)[0, 1].tolist() == [255, 255, 255]  # ignored: white


def test_nearest_objects_by_cosine_across_images():
    memory = [torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 1.0]])]
    found = nearest_objects(torch.tensor([[0.1, 2.0], [3.0, 2.9]]), memory)
    assert [(i, j) for i, j, _ in found] == [(0, 1), (1, 0)]
    assert abs(found[1][2] - float(torch.nn.functional.cosine_similarity(torch.tensor([3.0, 2.9]),
                                                                          torch.tensor([1.0, 1.0]), dim=0))) < 1e-6


def test_figures_command_writes_both_pngs(tmp_path, tiny_voc):
    from cribo.config import validate_run_config
    from cribo.models.backbones import build_vit
    from cribo.train.checkpoint import save_checkpoint

    cfg = validate_run_config({"method": "cribo", "model": {"arch": "vit_tiny", "patch_size": 8, "img_size": 32, "depth": 1},
                               "cribo": {"num_clusters": 3}})
    vit = build_vit(cfg["model"], drop_path_rate=0.0)
    ckpt = tmp_path / "ckpt.pth"
    save_checkpoint({"method": "cribo", "config": cfg, "teacher": {f"backbone.{k}": v for k, v in vit.state_dict().items()}}, ckpt)
    stores = {}
    for split in ("train", "val"):
        stores[split] = tmp_path / split
        assert main(["extract", "--checkpoint", str(ckpt), "--dataset", "voc", "--data-root", str(tiny_voc),
                     "--split", split, "--out", str(stores[split]), "--no-progress"]) == 0
    out = tmp_path / "figs"
    assert main(["figures", "--checkpoint", str(ckpt), "--dataset", "voc", "--data-root", str(tiny_voc),
                 "--train-features", str(stores["train"]), "--val-features", str(stores["val"]), "--out-dir", str(out),
                 "--num-images", "2", "--k", "3"]) == 0
    for name in ("incontext.png", "objects.png"):
        image = Image.open(out / name)
        assert image.width > 100 and image.height > 100
    assert not list(out.glob(".*tmp*"))
