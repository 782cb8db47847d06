"""Real-dataset stages on tiny archives in the real layouts: download (file URL), extract, prepare.

Every archive is built here with the members, folder names and encodings of the real one (VOC tar,
SBD tgz of .mat files, ADE20K zip, COCO zips with inner PNG zips, panoptic RGB-encoded ids), and
the prepared masks are compared with masks worked out by hand from the definitions.
"""

import io
import json
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cribo.data import coco
from cribo.data.fetch import fetch_dataset
from cribo.data.prepare import prepare
from cribo.data.registry import ARCHIVES, get_spec
from cribo.data.segmentation import DataError, segmentation_dataset
from cribo.data.user_provided import MissingDataError, check_cityscapes, check_imagenet


def _jpeg(size=(8, 6)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (120, 30, 200)).save(buf, format="JPEG")
    return buf.getvalue()


def _png(array: np.ndarray, mode=None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def _palette_png(array: np.ndarray) -> bytes:
    img = Image.fromarray(array, mode="P")
    img.putpalette([v for i in range(256) for v in (i, 255 - i, i // 2)])
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _zip(path: Path, members: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)


def _tar(path: Path, members: dict[str, bytes], mode="w") -> None:
    with tarfile.open(path, mode) as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))


def _mat(array: np.ndarray) -> bytes:
    from scipy.io import savemat

    buf = io.BytesIO()
    savemat(buf, {"GTcls": {"Segmentation": array, "Boundaries": np.zeros(1)}})
    return buf.getvalue()


def _fetch(name, mirror_dir: Path, tmp_path: Path):
    return fetch_dataset(name, tmp_path / "downloads", tmp_path / "raw", mirror=mirror_dir.as_uri(), progress=False,
                         retries=0, backoff=0)


def _mask(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.array(img)


# ---------------------------------------------------------------- VOC + SBD


def test_voc_trainaug_from_voc_tar_and_sbd_mats(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    voc_masks = {"a": np.full((6, 8), 1, np.uint8), "d": np.full((6, 8), 2, np.uint8),
                 "v1": np.full((6, 8), 3, np.uint8)}
    voc_masks["a"][0, 0] = 255  # VOC's void border stays
    base = "VOCdevkit/VOC2012/"
    members = {f"{base}JPEGImages/{i}.jpg": _jpeg() for i in ("a", "b", "c", "d", "v1")}
    members.update({f"{base}SegmentationClass/{i}.png": _palette_png(m) for i, m in voc_masks.items()})
    members[f"{base}ImageSets/Segmentation/train.txt"] = b"a\nd\n"
    members[f"{base}ImageSets/Segmentation/val.txt"] = b"v1\n"
    _tar(mirror / "VOCtrainval_11-May-2012.tar", members)
    sbd_masks = {"a": np.full((6, 8), 7, np.uint8), "b": np.full((6, 8), 4, np.uint8),
                 "c": np.arange(48, dtype=np.uint8).reshape(6, 8) % 21, "v1": np.full((6, 8), 5, np.uint8)}
    sbd = {f"benchmark_RELEASE/dataset/cls/{i}.mat": _mat(m) for i, m in sbd_masks.items()}
    sbd["benchmark_RELEASE/dataset/train.txt"] = b"a\nb\nv1\n"
    sbd["benchmark_RELEASE/dataset/val.txt"] = b"c\n"
    _tar(mirror / "benchmark.tgz", sbd, "w:gz")
    # the tiny archives have their own checksums: drop the published ones for this test
    for name in ("voc2012", "sbd"):
        monkeypatch.setitem(ARCHIVES, name, ARCHIVES[name].__class__(**{**ARCHIVES[name].__dict__, "md5": None}))
    _fetch("voc", mirror, tmp_path)
    out = tmp_path / "voc"
    info = prepare("voc", tmp_path / "raw", out, progress=False)
    # trainaug = (SBD train + SBD val + VOC train) - VOC val = {a, b, c, d}; VOC masks win over SBD's
    assert (out / "ImageSets/Segmentation/trainaug.txt").read_text().split() == ["a", "b", "c", "d"]
    assert info["from_voc"] == 2 and info["from_sbd"] == 2
    np.testing.assert_array_equal(_mask(out / "SegmentationClassAug/a.png"), voc_masks["a"])
    np.testing.assert_array_equal(_mask(out / "SegmentationClassAug/b.png"), sbd_masks["b"])
    np.testing.assert_array_equal(_mask(out / "SegmentationClassAug/c.png"), sbd_masks["c"])
    np.testing.assert_array_equal(_mask(out / "SegmentationClassAug/d.png"), voc_masks["d"])
    # the loader reads it as the voc dataset
    spec = get_spec("voc", out)
    image, mask = segmentation_dataset(spec, out, "trainaug")[1]
    assert image.size == (8, 6) and (mask == 4).all()
    # idempotent: a second call returns the marker without redoing anything
    assert prepare("voc", tmp_path / "raw", out, progress=False) == info
    # a recorded sha256 now guards the archives without a published checksum
    assert (tmp_path / "downloads" / "benchmark.tgz.sha256").is_file()


# ---------------------------------------------------------------- ADE20K


def test_ade20k_as_distributed_with_unpaired_file_named(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    mask = np.array([[0, 1, 150], [2, 2, 0]], np.uint8)
    root = "ADEChallengeData2016/"
    members = {f"{root}images/training/ADE_train_00000001.jpg": _jpeg((3, 2)),
               f"{root}annotations/training/ADE_train_00000001.png": _png(mask),
               f"{root}images/validation/ADE_val_00000001.jpg": _jpeg((3, 2)),
               f"{root}annotations/validation/ADE_val_00000001.png": _png(mask)}
    _zip(mirror / "ADEChallengeData2016.zip", members)
    monkeypatch.setitem(ARCHIVES, "ade20k", ARCHIVES["ade20k"].__class__(**{**ARCHIVES["ade20k"].__dict__, "md5": None}))
    _fetch("ade20k", mirror, tmp_path)
    out = tmp_path / "ade20k"
    assert prepare("ade20k", tmp_path / "raw", out, progress=False)["validation"] == 1
    spec = get_spec("ade20k", out)
    _, loaded = segmentation_dataset(spec, out, "validation")[0]
    np.testing.assert_array_equal(loaded, mask)  # 0 stays 0: ignored by the spec (151 labels, ignore 0)
    assert spec.ignore_index == 0 and spec.num_classes == 151
    # an image without its annotation is named
    extra = tmp_path / "raw/ade20k/ADEChallengeData2016/images/validation/ADE_val_00000002.jpg"
    extra.write_bytes(_jpeg())
    with pytest.raises(DataError, match="ADE_val_00000002"):
        prepare("ade20k", tmp_path / "raw", tmp_path / "ade-again", progress=False, force=True)


# ---------------------------------------------------------------- COCO


def _coco_archives(mirror: Path) -> dict[str, np.ndarray]:
    """Two images (train 1, val 2) and their stuff / panoptic / stuffthing maps; returns the inputs."""
    _zip(mirror / "train2017.zip", {"train2017/000000000001.jpg": _jpeg((4, 2))})
    _zip(mirror / "val2017.zip", {"val2017/000000000002.jpg": _jpeg((4, 2))})
    stuff_categories = [
        {"id": 92, "name": "banner", "supercategory": "textile"},
        {"id": 157, "name": "sky-other", "supercategory": "sky"},
        {"id": 183, "name": "other", "supercategory": "other"},
    ]
    pixelmap = np.array([[0, 92, 157, 183], [157, 157, 92, 0]], np.uint8)
    stuff = {"annotations/stuff_val2017.json": json.dumps({"categories": stuff_categories}).encode(),
             "annotations/stuff_train2017.json": json.dumps({"categories": stuff_categories}).encode()}
    for split, image in (("train", 1), ("val", 2)):
        buf = io.BytesIO()
        _zip(buf, {f"stuff_{split}2017_pixelmaps/{image:012d}.png": _png(pixelmap)})
        stuff[f"annotations/stuff_{split}2017_pixelmaps.zip"] = buf.getvalue()
    _zip(mirror / "stuff_annotations_trainval2017.zip", stuff)
    # panoptic: segment ids 5 (person), 300 = (44, 1, 0) (dog), 7 (merged stuff), 0 unlabelled
    panoptic_ids = np.array([[5, 5, 300, 0], [7, 300, 300, 5]])
    rgb = np.stack([panoptic_ids % 256, panoptic_ids // 256 % 256, panoptic_ids // 65536], -1).astype(np.uint8)
    categories = [{"id": 1, "name": "person", "supercategory": "person", "isthing": 1},
                  {"id": 18, "name": "dog", "supercategory": "animal", "isthing": 1},
                  {"id": 184, "name": "tree-merged", "supercategory": "plant", "isthing": 0}]
    segments = [{"id": 5, "category_id": 1}, {"id": 300, "category_id": 18}, {"id": 7, "category_id": 184}]
    panoptic = {}
    for split, image in (("train", 1), ("val", 2)):
        name = f"{image:012d}.png"
        panoptic[f"annotations/panoptic_{split}2017.json"] = json.dumps(
            {"categories": categories, "annotations": [{"file_name": name, "segments_info": segments}]}).encode()
        buf = io.BytesIO()
        _zip(buf, {f"panoptic_{split}2017/{name}": _png(rgb)})
        panoptic[f"annotations/panoptic_{split}2017.zip"] = buf.getvalue()
    _zip(mirror / "panoptic_annotations_trainval2017.zip", panoptic)
    # stuffthingmaps: value = category id - 1; 255 unlabelled
    stuffthing = np.array([[0, 12, 91, 181], [255, 182, 11, 0]], np.uint8)
    _zip(mirror / "stuffthingmaps_trainval2017.zip", {"train2017/000000000001.png": _png(stuffthing),
                                                      "val2017/000000000002.png": _png(stuffthing)})
    return {"pixelmap": pixelmap, "panoptic_ids": panoptic_ids, "stuffthing": stuffthing}


def test_coco_variants_masks_equal_hand_computed(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    _coco_archives(mirror)
    for name in ("coco_train2017", "coco_val2017"):
        monkeypatch.setitem(ARCHIVES, name, ARCHIVES[name].__class__(**{**ARCHIVES[name].__dict__, "md5": None}))
    raw = tmp_path / "raw"
    i = 255
    expected = {
        # 0 thing -> ignored, 92 banner -> textile (11), 157 sky-other -> sky (8), 183 other -> ignored
        "coco-stuff15": np.array([[i, 11, 8, i], [8, 8, 11, i]]),
        # person (9), dog -> animal (1), merged stuff and unlabelled -> ignored
        "coco-things12": np.array([[9, 9, 1, i], [i, 1, 1, 9]]),
        # ids 1 -> 0, 13 -> 11 (id 12 unused), 92 -> 80 (first stuff after 80 things), 182 -> 170, 183 / 12 -> ignored
        "coco-stuff171": np.array([[0, 11, 80, 170], [i, i, i, 0]]),
    }
    for variant, want in expected.items():
        _fetch(variant, mirror, tmp_path)
        out = tmp_path / variant
        info = prepare(variant, raw, out, progress=False)
        assert info["train"] == 1 and info["val"] == 1
        np.testing.assert_array_equal(_mask(out / "SegmentationClass/000000000002.png"), want, err_msg=variant)
        spec = get_spec(variant, out)
        image, mask = segmentation_dataset(spec, out, "val")[0]  # linked image, mask values checked
        assert image.size == (4, 2)
    assert get_spec("coco-stuff15", tmp_path / "coco-stuff15").class_names[11] == "textile"
    # the unlabelled image set for pretraining: the linked train2017 folder is walked through the link
    from cribo.data.images import UnlabeledImages, list_pretrain_images

    prepare("coco", raw, tmp_path / "coco", progress=False)
    paths = list_pretrain_images(tmp_path / "coco" / "train2017", None)
    assert [p.name for p in paths] == ["000000000001.jpg"] and UnlabeledImages(paths)[0].size == (4, 2)


def test_imagenet_folder_is_a_pretraining_image_set(tmp_path):
    from cribo.data.images import list_pretrain_images

    for wnid, count in (("n01440764", 2), ("n01443537", 1)):
        (tmp_path / "train" / wnid).mkdir(parents=True)
        for i in range(count):
            (tmp_path / "train" / wnid / f"{wnid}_{i}.JPEG").write_bytes(_jpeg())
    (tmp_path / "train" / "LOC_synset_mapping.txt").write_text("not an image")
    paths = list_pretrain_images(tmp_path / "train", None)
    assert [p.parent.name for p in paths] == ["n01440764", "n01440764", "n01443537"]


def test_label_maps_follow_the_definitions():
    assert len(coco.STUFF15_CLASSES) == 15 and len(coco.THINGS12_CLASSES) == 12
    assert list(coco.STUFF15_CLASSES) == sorted(coco.STUFF15_CLASSES)  # alphabetical, as Leopart sorts them
    lut = coco.stuff171_lut()
    assert (lut != 255).sum() == 171 and lut[182] == 255 and lut[11] == 255
    with pytest.raises(coco.LabelMapError, match="'furniture'"):
        coco.stuff15_lut([{"id": 100, "name": "x", "supercategory": "furniture"}])


def test_corrupt_download_is_removed_and_reported(tmp_path):
    from cribo.data.download import DownloadError

    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "ADEChallengeData2016.zip").write_bytes(b"not the real archive")
    with pytest.raises(DownloadError, match="ADEChallengeData2016.zip"):
        _fetch("ade20k", mirror, tmp_path)  # the registry's published md5 does not match
    assert not (tmp_path / "downloads/ADEChallengeData2016.zip").exists()
    assert not list((tmp_path / "downloads").glob("*.part"))


def test_unknown_and_user_provided_names_are_explained(tmp_path):
    with pytest.raises(ValueError, match="licence or login"):
        _fetch("imagenet", tmp_path, tmp_path)
    with pytest.raises(ValueError, match="downloadable: .*coco-stuff15"):
        _fetch("pascal", tmp_path, tmp_path)


# ---------------------------------------------------------------- user-provided trees


def test_imagenet_check_names_the_missing_class_folder(tmp_path):
    for split, classes in (("train", ["n00000001", "n00000002", "n00000003"]), ("val", ["n00000001", "n00000003"])):
        for c in classes:
            (tmp_path / split / c).mkdir(parents=True)
            (tmp_path / split / c / "x.JPEG").write_bytes(b"")
    with pytest.raises(MissingDataError, match=r"val lacks class folder\(s\) present in train/: n00000002"):
        check_imagenet(tmp_path, expect_counts=False)
    with pytest.raises(MissingDataError, match="ImageNet root not found"):
        check_imagenet(tmp_path / "nope")


def test_cityscapes_check_names_a_missing_mask(tmp_path):
    for split in ("train", "val"):
        (tmp_path / "leftImg8bit" / split / "aachen").mkdir(parents=True)
        (tmp_path / "gtFine" / split / "aachen").mkdir(parents=True)
        (tmp_path / "leftImg8bit" / split / "aachen" / "aachen_1_leftImg8bit.png").write_bytes(b"")
    (tmp_path / "gtFine/train/aachen/aachen_1_gtFine_labelIds.png").write_bytes(b"")
    with pytest.raises(MissingDataError, match="gtFine/val: no gtFine_labelIds mask for 1 image.*aachen/aachen_1"):
        check_cityscapes(tmp_path, expect_counts=False)
    (tmp_path / "gtFine/val/aachen/aachen_1_gtFine_labelIds.png").write_bytes(b"")
    assert check_cityscapes(tmp_path, expect_counts=False) == {"train": 1, "val": 1}


def test_cli_data_errors_exit_non_zero_with_the_fix(tmp_path, capsys):
    from cribo.cli import main

    assert main(["data", "download", "imagenet", "--downloads", str(tmp_path), "--raw", str(tmp_path)]) == 2
    assert "licence or login" in capsys.readouterr().err
    assert main(["data", "check", "imagenet", "--root", str(tmp_path / "nope")]) == 2
    assert "ImageNet root not found" in capsys.readouterr().err
    assert main(["data", "prepare", "voc", "--raw", str(tmp_path), "--out", str(tmp_path / "voc")]) == 2
    assert "run `cribo data download` first" in capsys.readouterr().err
    assert not (tmp_path / "voc" / ".prepared.json").exists()


def test_coco_instances_for_detection(tmp_path, monkeypatch):
    # the two image zips and annotations_trainval2017.zip as distributed (annotations/instances_*2017.json)
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    _coco_archives(mirror)
    instances = {}
    for split, image in (("train", 1), ("val", 2)):
        instances[f"annotations/instances_{split}2017.json"] = json.dumps({
            "images": [{"id": image, "file_name": f"{image:012d}.jpg", "width": 4, "height": 2}],
            "annotations": [{"id": 10 + image, "image_id": image, "category_id": 18, "iscrowd": 0,
                             "bbox": [0, 0, 2, 2], "area": 4.0, "segmentation": [[0, 0, 2, 0, 2, 2, 0, 2]]}],
            "categories": [{"id": 18, "name": "dog", "supercategory": "animal"}]}).encode()
    _zip(mirror / "annotations_trainval2017.zip", instances)
    for name in ("coco_train2017", "coco_val2017", "coco_annotations"):
        monkeypatch.setitem(ARCHIVES, name, ARCHIVES[name].__class__(**{**ARCHIVES[name].__dict__, "md5": None}))
    _fetch("coco-instances", mirror, tmp_path)
    out = tmp_path / "coco-instances"
    info = prepare("coco-instances", tmp_path / "raw", out, progress=False)
    assert info["train"] == 1 and info["val"] == 1 and info["val_instances"] == 1
    # what `cribo eval detect` reads: the annotation file and the folder its file names are relative to
    from cribo.eval.detection import CocoInstances

    val = CocoInstances(out / "annotations" / "instances_val2017.json", out / "val2017", train=False)
    image, target = val[0]
    assert image.shape == (3, 2, 4) and target["labels"].tolist() == [1]
    # annotations of another release (a file name the image folder does not hold) are refused
    bad = tmp_path / "raw" / "coco_annotations" / "annotations" / "instances_val2017.json"
    bad.unlink()
    bad.write_text(instances["annotations/instances_val2017.json"].decode().replace("000000000002", "000000000009"))
    with pytest.raises(DataError, match="names 000000000009.jpg, which is not in .*val2017"):
        prepare("coco-instances", tmp_path / "raw", tmp_path / "other", progress=False)
