"""COCO 2017 semantic-segmentation variants: label maps and per-image mask conversion.

Three variants, as the dense-evaluation papers define them (``evaluation.md`` §5.3):

- ``coco-stuff15`` (Leopart's COCO-Stuff): the stuff pixel maps of ``stuff_annotations_trainval2017``
  (0 = thing pixel, 92-182 = stuff category, 183 = "other"); each stuff category becomes the index of
  its supercategory among the 15 sorted supercategories other than "other"; things, "other" and
  unlabelled pixels are ignored (255).
- ``coco-things12`` (Leopart's COCO-Things): the panoptic PNGs (segment id = R + 256 G + 256^2 B) and
  their ``segments_info``; each thing segment becomes the index of its category's supercategory among
  the 12 sorted thing supercategories; stuff and unlabelled pixels are ignored. (The panopticapi
  converter is not needed: decoding the id image is three integer operations in numpy.)
- ``coco-stuff171`` (mmsegmentation's COCO-Stuff164k): the ``stuffthingmaps_trainval2017`` PNGs
  (value = category id - 1, 255 unlabelled); the 171 category ids in use (80 things of 1-90, 91 stuff
  of 92-182) are numbered 0-170 in increasing order; the rest is ignored.

Supercategories come from the annotation files' ``categories`` and are looked up in the fixed
lists below, so a category that the definitions do not know is an error, not a silent new class.
"""

from __future__ import annotations

import numpy as np

IGNORE = 255

STUFF15_CLASSES = ("building", "ceiling", "floor", "food-stuff", "furniture-stuff", "ground", "plant",
                   "raw-material", "sky", "solid", "structural", "textile", "wall", "water", "window")
THINGS12_CLASSES = ("accessory", "animal", "appliance", "electronic", "food", "furniture", "indoor", "kitchen",
                    "outdoor", "person", "sports", "vehicle")
# COCO thing ids 1-90 without the 10 ids that have no annotations, then the 91 stuff ids 92-182
_UNUSED_THING_IDS = {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}
STUFF171_IDS = tuple([i for i in range(1, 91) if i not in _UNUSED_THING_IDS] + list(range(92, 183)))
assert len(STUFF171_IDS) == 171


class LabelMapError(ValueError):
    """The annotation files do not match the variant's definition; the message says how."""


def stuff15_lut(categories: list[dict]) -> np.ndarray:
    """256-entry lookup table: stuff pixel-map value -> COCO-Stuff-15 class (255 = ignored).

    ``categories``: the ``categories`` list of ``stuff_{train,val}2017.json``.
    """
    lut = np.full(256, IGNORE, np.uint8)
    for cat in categories:
        cid, supercategory = int(cat["id"]), cat["supercategory"]
        if not 92 <= cid <= 182 or supercategory == "other":
            continue  # things and "other" (183) stay ignored
        if supercategory not in STUFF15_CLASSES:
            raise LabelMapError(f"stuff category {cid} ({cat.get('name')}) has supercategory {supercategory!r}, "
                                f"which is not one of the 15 COCO-Stuff classes {STUFF15_CLASSES}")
        lut[cid] = STUFF15_CLASSES.index(supercategory)
    return lut


def things12_map(categories: list[dict]) -> dict[int, int]:
    """Panoptic category id -> COCO-Things-12 class, for the thing categories (``isthing == 1``)."""
    mapping = {}
    for cat in categories:
        if not cat.get("isthing"):
            continue
        if cat["supercategory"] not in THINGS12_CLASSES:
            raise LabelMapError(f"thing category {cat['id']} ({cat.get('name')}) has supercategory "
                                f"{cat['supercategory']!r}, not one of the 12 COCO-Things classes {THINGS12_CLASSES}")
        mapping[int(cat["id"])] = THINGS12_CLASSES.index(cat["supercategory"])
    return mapping


def stuff171_lut() -> np.ndarray:
    """256-entry lookup table: stuffthingmaps value (category id - 1) -> COCO-Stuff-171 class."""
    lut = np.full(256, IGNORE, np.uint8)
    for train_id, cid in enumerate(STUFF171_IDS):
        lut[cid - 1] = train_id
    return lut


def panoptic_segment_ids(rgb: np.ndarray) -> np.ndarray:
    """``H x W x 3`` uint8 panoptic PNG -> ``H x W`` int64 segment ids (R + 256 G + 256^2 B)."""
    rgb = rgb.astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def things12_mask(rgb: np.ndarray, segments_info: list[dict], category_to_class: dict[int, int]) -> np.ndarray:
    """One panoptic annotation -> ``H x W`` uint8 COCO-Things-12 mask (255 for stuff and unlabelled)."""
    ids = panoptic_segment_ids(rgb)
    out = np.full(ids.shape, IGNORE, np.uint8)
    for segment in segments_info:
        cls = category_to_class.get(int(segment["category_id"]))
        if cls is not None:
            out[ids == int(segment["id"])] = cls
    return out
