"""Pascal Context (59 classes, mmseg's setting) from a tiny VOC2010 tar and a tiny Detail JSON."""

import io
import json
import tarfile

import numpy as np
from PIL import Image

from cribo.data.fetch import fetch_dataset
from cribo.data.prepare import prepare
from cribo.data.registry import ARCHIVES, PASCAL_CONTEXT_CLASSES, get_spec
from cribo.data.segmentation import segmentation_dataset


def _jpeg(size) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 60)).save(buf, format="JPEG")
    return buf.getvalue()


def _compressed_rle(mask: np.ndarray) -> dict:
    from pycocotools import mask as rle_mask

    rle = rle_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode()}  # as JSON stores it


def test_pascal_context_masks_from_the_detail_json(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    h, w = 4, 6
    base = "VOCdevkit/VOC2010/JPEGImages/"
    with tarfile.open(mirror / "VOCtrainval_03-May-2010.tar", "w") as t:
        for name in ("2008_000001", "2008_000002", "2008_000003"):
            data = _jpeg((w, h))
            info = tarfile.TarInfo(base + name + ".jpg")
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    left = np.zeros((h, w), bool)
    left[:, :3] = True
    top = np.zeros((h, w), bool)
    top[0] = True
    corner = np.zeros((h, w), bool)
    corner[3, 0] = True
    annotations = {
        "images": [
            {"image_id": 1, "file_name": "2008_000001.jpg", "height": h, "width": w, "phase": "train"},
            {"image_id": 2, "file_name": "2008_000002.jpg", "height": h, "width": w, "phase": "val"},
            {"image_id": 3, "file_name": "2008_000003.jpg", "height": h, "width": w, "phase": "test"},
        ],
        "annos_segmentation": [
            # image 1: aeroplane (id 2) on the left half, then wood (458) over the top row, then
            # id 1 (not one of the 59) on the bottom-left pixel
            {"id": 10, "image_id": 1, "category_id": 2, "segmentation": _compressed_rle(left)},
            {"id": 11, "image_id": 1, "category_id": 458, "segmentation": _compressed_rle(top)},
            {"id": 12, "image_id": 1, "category_id": 1, "segmentation": _compressed_rle(corner)},
            # image 2: bag (id 9) on the last column, as uncompressed RLE (column-major runs:
            # 5 columns x 4 rows = 20 pixels off, then 4 on)
            {"id": 13, "image_id": 2, "category_id": 9, "segmentation": {"size": [h, w], "counts": [20, 4]}},
        ],
        "categories": [],
    }
    (mirror / "trainval_merged.json").write_text(json.dumps(annotations))
    monkeypatch.setitem(ARCHIVES, "voc2010", ARCHIVES["voc2010"].__class__(**{**ARCHIVES["voc2010"].__dict__,
                                                                                "md5": None}))
    fetch_dataset("pascal-context", tmp_path / "downloads", tmp_path / "raw", mirror=mirror.as_uri(),
                  progress=False, retries=0, backoff=0)
    out = tmp_path / "pascal-context"
    info = prepare("pascal-context", tmp_path / "raw", out, progress=False)
    assert info["train"] == 1 and info["val"] == 1  # the test-phase image is left out

    # class index = rank of the id among the 59 sorted ids: 2 -> 0 (aeroplane), 458 -> 58 (wood),
    # 9 -> 1 (bag); background and ids outside the 59 -> 255 (ignored)
    expected_1 = np.full((h, w), 255, np.uint8)
    expected_1[:, :3] = 0
    expected_1[0] = 58
    expected_1[3, 0] = 255
    expected_2 = np.full((h, w), 255, np.uint8)
    expected_2[:, 5] = 1
    spec = get_spec("pascal-context", out)
    assert spec.num_classes == 59 and spec.ignore_index == 255
    assert (PASCAL_CONTEXT_CLASSES[0], PASCAL_CONTEXT_CLASSES[1], PASCAL_CONTEXT_CLASSES[58]) == (
        "aeroplane", "bag", "wood")
    _, mask = segmentation_dataset(spec, out, "train")[0]
    np.testing.assert_array_equal(mask, expected_1)
    _, mask = segmentation_dataset(spec, out, "val")[0]
    np.testing.assert_array_equal(mask, expected_2)
    assert (tmp_path / "downloads" / "trainval_merged.json.sha256").is_file()  # no published checksum
