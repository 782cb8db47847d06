import numpy as np
import pytest
import torch
from PIL import Image

from cribo.data.images import UnlabeledImages, list_pretrain_images
from cribo.data.registry import UnknownDatasetError, get_spec
from cribo.data.segmentation import DataError, ResizePair, VOCLayoutSegmentation


def test_reads_pairs_and_resizes_masks_with_nearest(tiny_voc):
    ds = VOCLayoutSegmentation(tiny_voc, "val", transform=ResizePair(16))
    assert len(ds) == 2
    image, mask = ds[0]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32
    assert mask.shape == (16, 16)
    # nearest resizing never invents labels between 1 and 2
    assert set(np.unique(mask.numpy())) <= {0, 1, 2, 255}


def test_normalisation_uses_imagenet_mean_and_std(tmp_path):
    x, _ = ResizePair(8)(Image.new("RGB", (8, 8), (255, 255, 255)), np.zeros((8, 8), np.uint8))
    # white = 1.0: (1 - 0.485) / 0.229 for red
    assert x[0, 0, 0].item() == pytest.approx((1 - 0.485) / 0.229, rel=1e-5)
    assert x[2, 0, 0].item() == pytest.approx((1 - 0.406) / 0.225, rel=1e-5)


def test_corrupt_image_error_names_the_file(tiny_voc):
    (tiny_voc / "JPEGImages" / "v1.jpg").write_bytes(b"not a jpeg")
    ds = VOCLayoutSegmentation(tiny_voc, "val")
    with pytest.raises(DataError, match="v1.jpg"):
        ds[1]


def test_mask_of_wrong_size_error_names_the_file(tiny_voc):
    Image.fromarray(np.zeros((10, 12), np.uint8)).convert("P").save(tiny_voc / "SegmentationClass" / "v0.png")
    with pytest.raises(DataError, match="v0.png"):
        VOCLayoutSegmentation(tiny_voc, "val")[0]


def test_rgb_mask_is_refused(tiny_voc):
    Image.new("RGB", (32, 32)).save(tiny_voc / "SegmentationClass" / "v0.png")
    with pytest.raises(DataError, match="single-channel"):
        VOCLayoutSegmentation(tiny_voc, "val")[0]


def test_missing_split_lists_the_available_ones(tiny_voc):
    with pytest.raises(DataError, match="available splits: train, val"):
        VOCLayoutSegmentation(tiny_voc, "trainaug")


def test_unknown_dataset_lists_the_known_ones():
    with pytest.raises(UnknownDatasetError, match="known datasets: .*toyscenes.*voc"):
        get_spec("imagenet-typo")


def test_pretrain_images_from_split_or_folder(tiny_voc, tmp_path):
    assert len(list_pretrain_images(tiny_voc, "train")) == 6
    folder = tmp_path / "imgs" / "sub"
    folder.mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(folder / "x.png")
    paths = list_pretrain_images(tmp_path / "imgs", None)
    assert [p.name for p in paths] == ["x.png"]
    assert UnlabeledImages(paths)[0].size == (4, 4)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        list_pretrain_images(tmp_path / "empty", None)
    with pytest.raises(DataError, match="not found"):
        list_pretrain_images(tmp_path / "nowhere", None)
