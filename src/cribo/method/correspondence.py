"""ORL's stage-2 output as compact arrays: filtered RoIs, image neighbours and retrieved RoI pairs.

The official file is a JSON of nested lists (~0.5 GB for COCO, plus ~9 GB of raw proposals);
here one ``.npz`` (``numpy.savez``, no pickle) holds, for ``N`` images with ``k`` neighbours each:

=================  ==================  =====================================================
array              shape / dtype       content
=================  ==================  =====================================================
``image_names``    N, str              image paths relative to the dataset root (the image list)
``dataset``        scalar str          dataset name of the run that wrote it
``boxes``          R x 4, int32        filtered RoIs ``(x, y, w, h)`` of all images, image-major
``box_offsets``    N + 1, int64        image ``i``'s RoIs are rows ``box_offsets[i]:box_offsets[i+1]``
``knn``            N x k, int64        neighbour image rows (self excluded)
``pairs``          P x 2, int32        (query RoI, neighbour RoI), indices local to each image
``pair_offsets``   N * k + 1, int64    pairs of (image ``i``, neighbour slot ``s``) are rows
                                       ``pair_offsets[i*k+s]:pair_offsets[i*k+s+1]``
``pair_scores``    P, float32          cosine similarity of each pair's RoI embeddings
``settings``       scalar str (JSON)   filter and retrieval settings used
=================  ==================  =====================================================
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cribo.config import ConfigError


class CorrespondenceError(ConfigError):
    """A correspondence file that is missing, malformed, or does not belong to this run's images."""


@dataclass
class Correspondence:
    image_names: np.ndarray
    dataset: str
    boxes: np.ndarray
    box_offsets: np.ndarray
    knn: np.ndarray
    pairs: np.ndarray
    pair_offsets: np.ndarray
    pair_scores: np.ndarray
    settings: dict

    @property
    def num_images(self) -> int:
        return len(self.image_names)

    @property
    def k(self) -> int:
        return self.knn.shape[1]

    def image_boxes(self, i: int) -> np.ndarray:
        """``B_i x 4`` filtered RoIs (x, y, w, h) of image ``i``."""
        return self.boxes[self.box_offsets[i]:self.box_offsets[i + 1]]

    def neighbour_pairs(self, i: int, slot: int) -> np.ndarray:
        """``P x 2`` (query RoI, neighbour RoI) local indices for image ``i`` and its ``slot``-th neighbour."""
        row = i * self.k + slot
        return self.pairs[self.pair_offsets[row]:self.pair_offsets[row + 1]]

    def validate(self, source: str) -> None:
        """Raise :class:`CorrespondenceError` naming ``source`` if the arrays are inconsistent."""
        n, k = self.num_images, self.k

        def fail(what: str) -> None:
            raise CorrespondenceError(f"{source}: {what}; the file is damaged or was not written by "
                                      "`cribo orl merge`: rerun stage 2 (the orl_* rules)")

        if self.box_offsets.shape != (n + 1,) or self.box_offsets[0] != 0 or self.box_offsets[-1] != len(self.boxes):
            fail(f"box_offsets has shape {self.box_offsets.shape} for {n} images and {len(self.boxes)} boxes")
        if np.any(np.diff(self.box_offsets) < 1):
            fail(f"image {int(np.argmax(np.diff(self.box_offsets) < 1))} has no RoI")
        if self.knn.shape[0] != n:
            fail(f"knn has {self.knn.shape[0]} rows for {n} images")
        if n and (self.knn.min() < 0 or self.knn.max() >= n):
            fail(f"a neighbour index is out of range [0, {n}) (min {self.knn.min()}, max {self.knn.max()})")
        if np.any(self.knn == np.arange(n)[:, None]):
            fail("an image is its own neighbour")
        if self.pair_offsets.shape != (n * k + 1,) or self.pair_offsets[-1] != len(self.pairs):
            fail(f"pair_offsets has shape {self.pair_offsets.shape} for {n} x {k} neighbours and {len(self.pairs)} pairs")
        if np.any(np.diff(self.pair_offsets) < 1):
            row = int(np.argmax(np.diff(self.pair_offsets) < 1))
            fail(f"image {row // k} has no RoI pair with its neighbour {row % k} (stage 2 keeps at least one)")
        if len(self.pairs):
            counts = np.diff(self.box_offsets)
            rows = np.repeat(np.arange(n * k), np.diff(self.pair_offsets))
            query, neighbour = rows // k, self.knn.reshape(-1)[rows]
            if np.any(self.pairs[:, 0] >= counts[query]) or np.any(self.pairs[:, 1] >= counts[neighbour]) \
                    or self.pairs.min() < 0:
                fail("a pair refers to a RoI index out of range")

    def check_images(self, image_names: list[str], dataset: str, source: str) -> None:
        """The file must describe exactly this run's image list, in this order."""
        if self.dataset != dataset:
            raise CorrespondenceError(f"{source} was computed on dataset {self.dataset!r}, this run trains on "
                                      f"{dataset!r}; point orl.correspondence at this dataset's stage-2 output")
        ours = np.asarray(image_names)
        if len(ours) != self.num_images or not np.array_equal(ours, self.image_names):
            first = next((i for i, (a, b) in enumerate(zip(ours, self.image_names)) if a != b),
                         min(len(ours), self.num_images))
            raise CorrespondenceError(
                f"{source} lists {self.num_images} images, the run's image list has {len(ours)} and they differ "
                f"from position {first} on; the image list changed since stage 2: rerun stage 2 (the orl_* rules)")


FIELDS = ("image_names", "dataset", "boxes", "box_offsets", "knn", "pairs", "pair_offsets", "pair_scores", "settings")


def save_correspondence(corr: Correspondence, path: str | os.PathLike) -> None:
    """Write ``corr`` atomically (temporary name, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.npz")
    arrays = {name: getattr(corr, name) for name in FIELDS}
    arrays["dataset"] = np.asarray(corr.dataset)
    arrays["settings"] = np.asarray(json.dumps(corr.settings, sort_keys=True))
    arrays["image_names"] = np.asarray(corr.image_names, dtype=str)
    try:
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_correspondence(path: str | os.PathLike) -> Correspondence:
    """Read and validate a correspondence file; errors name the file and the fix."""
    path = Path(path)
    if not path.is_file():
        raise CorrespondenceError(f"correspondence file not found: {path}; run ORL's stage 2 first "
                                  "(`snakemake orl_correspondence` or `cribo orl merge`) or fix orl.correspondence")
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [name for name in FIELDS if name not in data.files]
            if missing:
                raise CorrespondenceError(f"{path}: not a correspondence file, arrays {missing} are missing; "
                                          "rerun stage 2")
            values = {name: data[name] for name in FIELDS}
    except (OSError, ValueError) as err:
        raise CorrespondenceError(f"{path}: cannot be read as .npz ({err}); rerun stage 2") from err
    values["dataset"] = str(values["dataset"])
    values["settings"] = json.loads(str(values["settings"]))
    corr = Correspondence(**values)
    corr.validate(str(path))
    return corr
