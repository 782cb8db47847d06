"""The datasets the pipeline knows, by name, and what each looks like on disk.

A dataset spec says which layout its loader reads, how many classes its masks hold, which label
is ignored and which splits serve as the retrieval memory (``train_split``) and as queries
(``val_split``). Download URLs and checksums arrive with the real-dataset stage; the spine only
needs the layouts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    layout: str  # "voc": JPEGImages/, SegmentationClass[Aug]/, ImageSets/Segmentation/<split>.txt
    num_classes: int
    ignore_index: int
    train_split: str
    val_split: str
    class_names: tuple[str, ...] = field(default=())


VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)

_REGISTRY: dict[str, DatasetSpec] = {
    "toyscenes": DatasetSpec("toyscenes", "voc", 9, 255, "train", "val"),
    "voc": DatasetSpec("voc", "voc", 21, 255, "trainaug", "val", VOC_CLASSES),
}


class UnknownDatasetError(ValueError):
    pass


def known_datasets() -> list[str]:
    return sorted(_REGISTRY)


def get_spec(name: str, root: str | Path | None = None) -> DatasetSpec:
    """Look a dataset up by name; for ``toyscenes`` the class names come from its ``meta.json``."""
    if name not in _REGISTRY:
        raise UnknownDatasetError(
            f"unknown dataset {name!r}; known datasets: {', '.join(known_datasets())}")
    spec = _REGISTRY[name]
    if name == "toyscenes" and root is not None:
        meta_path = Path(root) / "meta.json"
        if meta_path.is_file():
            meta = json.loads(meta_path.read_text())
            spec = DatasetSpec(spec.name, spec.layout, int(meta["num_classes"]),
                               int(meta["ignore_index"]), spec.train_split, spec.val_split,
                               tuple(meta["classes"]))
    return spec
