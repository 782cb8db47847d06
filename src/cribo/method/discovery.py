"""ORL stage 2 (correspondence discovery) as shardable steps over image ranges.

1. :func:`run_knn`: every image's embedding (stage-1 online projector output, L2-normalised, on
   the resize-256/224 + centre crop view) and its ``k`` nearest images by cosine similarity, the
   image itself masked out explicitly (ORL's notebook drops the first hit and assumes it is self).
2. :func:`run_proposals` (one shard = one image range): selective search, then ORL's box filter.
3. :func:`run_roi_embeddings` (per shard): each kept RoI cropped, resized to the stage-1 crop size,
   through the online backbone (pooled, L2-normalised), **once per RoI**; ORL re-encodes a query's
   and its 10 neighbours' RoIs for every query (~11x the forwards).
4. :func:`run_pairs` (per shard of query images): for each neighbour, the top ``int(ratio * B_q)``
   (at least 1) entries of the ``B_q x B_n`` cosine matrix; the neighbours' embeddings are read
   from the shard files image by image, never all loaded at once.
5. :func:`merge`: the shards -> one :class:`~cribo.method.correspondence.Correspondence` file and a
   summary (counts per image, similarity histogram).

Every output is written under a temporary name and renamed, so an interrupted shard leaves
nothing; a rerun (or a SLURM array task) redoes only the missing shards.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from cribo.config import ConfigError, atomic_write_text
from cribo.data.images import list_pretrain_images
from cribo.data.segmentation import IMAGENET_MEAN, IMAGENET_STD, load_rgb
from cribo.method.correspondence import Correspondence, save_correspondence
from cribo.method.orl import image_names
from cribo.method.proposals import BoxFilter, filter_boxes, selective_search


class Stage2Error(ConfigError):
    """Stage-2 inputs that do not fit together; the message names the file and the fix."""


# ---------------------------------------------------------------- pure pieces
def shard_range(num_images: int, shard: int, num_shards: int) -> tuple[int, int]:
    """Images ``[start, stop)`` of ``shard`` out of ``num_shards``: equal parts, the last takes the rest (as ORL's parts)."""
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard {shard} is not in [0, {num_shards})")
    size = num_images // num_shards
    return shard * size, num_images if shard == num_shards - 1 else (shard + 1) * size


def knn_excluding_self(embeddings: torch.Tensor, k: int, chunk: int = 1024) -> torch.Tensor:
    """``N x D`` L2-normalised rows -> ``N x k`` indices of the most similar *other* rows, best first.

    The diagonal is set to -inf before the top-k, so an image is never its own neighbour even when a
    duplicate ties with it. Rows are processed ``chunk`` at a time (memory ``chunk x N``, not ``N x N``).
    """
    n = embeddings.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"k={k} neighbours need at least k + 1 = {k + 1} images, got {n}")
    out = torch.empty(n, k, dtype=torch.long)
    for start in range(0, n, chunk):
        sims = embeddings[start:start + chunk] @ embeddings.T
        rows = torch.arange(sims.shape[0])
        sims[rows, rows + start] = float("-inf")
        out[start:start + chunk] = sims.topk(k, dim=1).indices
    return out


def top_pairs(query: torch.Tensor, neighbour: torch.Tensor, ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """ORL's RoI-pair retrieval between two images.

    ``B_q x D`` and ``B_n x D`` L2-normalised RoI embeddings -> (``P x 2`` (query RoI, neighbour
    RoI) indices, ``P`` cosine similarities), the ``P = max(1, int(ratio * B_q))`` largest entries
    of the flattened ``B_q x B_n`` similarity matrix, best first. No threshold and no one-to-one
    constraint: a RoI may appear in several pairs.
    """
    sims = query.float() @ neighbour.float().T
    count = min(max(1, int(ratio * query.shape[0])), sims.numel())
    scores, flat = sims.flatten().topk(count)
    return torch.stack([flat // sims.shape[1], flat % sims.shape[1]], dim=1), scores


# ---------------------------------------------------------------- stage-1 network
def load_stage1(checkpoint: str | Path, device: torch.device):
    """The stage-1 online backbone and projector (eval mode) and the run config, from a byol/orl checkpoint."""
    from cribo.method.byol import MLPHead
    from cribo.models.backbones import build_backbone
    from cribo.models.backbones import strip_prefix
    from cribo.train.checkpoint import load_checkpoint

    ckpt = load_checkpoint(checkpoint)
    if ckpt.get("method") not in ("byol", "orl"):
        raise Stage2Error(f"{checkpoint} is a {ckpt.get('method')!r} checkpoint; ORL's stage 2 needs the stage-1 "
                          "BYOL checkpoint (a run with method: byol)")
    cfg = ckpt["config"]
    backbone = build_backbone(cfg["model"], drop_path_rate=0.0)
    projector = MLPHead(backbone.embed_dim, cfg["byol"]["projector_hidden_dim"], cfg["byol"]["out_dim"])
    backbone.load_state_dict(strip_prefix(ckpt["student"], "module.backbone."))
    projector.load_state_dict(strip_prefix(ckpt["student"], "module.projector."))
    return backbone.to(device).eval(), projector.to(device).eval(), cfg, ckpt.get("num_images")


def _normalise():
    return [T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]


def _image_list(cfg: dict) -> tuple[list[Path], list[str]]:
    paths = list_pretrain_images(cfg["data"]["root"], cfg["data"]["split"])
    return paths, image_names(paths, cfg["data"]["root"])


def _save_npz(path: Path, **arrays) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.npz")
    try:
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _load_npz(path: Path, what: str) -> dict:
    if not Path(path).is_file():
        raise Stage2Error(f"{what} not found: {path}; run the previous stage-2 step first")
    with np.load(path, allow_pickle=False) as data:
        return {name: data[name] for name in data.files}


def _check_names(names: list[str], stored: np.ndarray, source: Path) -> None:
    if len(names) != len(stored) or not np.array_equal(np.asarray(names), stored):
        raise Stage2Error(f"{source} was computed on {len(stored)} images, the dataset now lists {len(names)} "
                          "(or another order): the image list changed; rerun stage 2 from the kNN step")


# ---------------------------------------------------------------- steps
@torch.no_grad()
def run_knn(checkpoint, output, k: int = 10, batch_size: int = 64, device: str = "cpu") -> dict:
    """Step 1: ``output`` (.npz) = ``image_names``, ``dataset``, ``knn`` (N x k) over the stage-1 run's image list."""
    dev = torch.device(device)
    backbone, projector, cfg, trained_on = load_stage1(checkpoint, dev)
    paths, names = _image_list(cfg)
    if trained_on is not None and trained_on != len(paths):
        raise Stage2Error(f"{checkpoint} was trained on {trained_on} images, {cfg['data']['root']} now lists "
                          f"{len(paths)}: the image list changed between stage 1 and stage 2; retrain stage 1")
    size = cfg["model"]["img_size"]
    view = T.Compose([T.Resize(round(size * 256 / 224), interpolation=InterpolationMode.BILINEAR, antialias=True),
                      T.CenterCrop(size)] + _normalise())
    chunks = []
    for start in range(0, len(paths), batch_size):
        images = torch.stack([view(load_rgb(p)) for p in paths[start:start + batch_size]]).to(dev)
        chunks.append(F.normalize(projector(backbone(images)).float(), dim=1).cpu())
    knn = knn_excluding_self(torch.cat(chunks), k)
    _save_npz(Path(output), image_names=np.asarray(names), dataset=np.asarray(cfg["data"]["dataset"]),
              root=np.asarray(str(cfg["data"]["root"])), knn=knn.numpy())
    return {"images": len(paths), "k": k}


def run_proposals(knn_file, output, shard: int, num_shards: int, settings: BoxFilter) -> dict:
    """Step 2, one shard: selective search + filter of images ``shard_range(N, shard, num_shards)``."""
    knn = _load_npz(knn_file, "kNN file")
    root, names = Path(str(knn["root"])), knn["image_names"]
    start, stop = shard_range(len(names), shard, num_shards)
    boxes, offsets, raw, fallback = [], [0], [], []
    for index in range(start, stop):
        path = root / str(names[index])
        image = np.asarray(load_rgb(path))
        proposals = selective_search(image, seed=index)
        if len(proposals) == 0:
            raise Stage2Error(f"{path}: selective search found no region at all (blank or tiny image?); "
                              "remove the image from the dataset and rerun stage 2")
        kept = filter_boxes(proposals, settings)
        fallback.append(bool(kept[0, 2] < settings.min_size or kept[0, 3] < settings.min_size
                             or max(kept[0, 2], kept[0, 3]) > settings.max_aspect_ratio * min(kept[0, 2], kept[0, 3])))
        boxes.append(kept)
        offsets.append(offsets[-1] + len(kept))
        raw.append(len(proposals))
    _save_npz(Path(output), start=np.asarray(start), stop=np.asarray(stop),
              boxes=np.concatenate(boxes) if boxes else np.zeros((0, 4), np.int32),
              box_offsets=np.asarray(offsets, np.int64), raw_counts=np.asarray(raw, np.int64),
              fallback=np.asarray(fallback, bool))
    return {"images": stop - start, "boxes": int(offsets[-1])}


@torch.no_grad()
def run_roi_embeddings(checkpoint, knn_file, proposals_file, output, device: str = "cpu") -> dict:
    """Step 3, one shard: ``output`` (.npy, float16) = one embedding per kept RoI of the shard, in order."""
    dev = torch.device(device)
    backbone, _, cfg, _ = load_stage1(checkpoint, dev)
    knn = _load_npz(knn_file, "kNN file")
    props = _load_npz(proposals_file, "proposals shard")
    root = Path(str(knn["root"]))
    paths = [root / str(name) for name in knn["image_names"]]
    size = cfg["model"]["img_size"]
    normalise = T.Compose(_normalise())
    rows = []
    for local, index in enumerate(range(int(props["start"]), int(props["stop"]))):
        image = load_rgb(paths[index])
        boxes = props["boxes"][props["box_offsets"][local]:props["box_offsets"][local + 1]]
        crops = torch.stack([normalise(image.resize((size, size), box=(int(x), int(y), int(x + w), int(y + h)),
                                                    resample=Image.BILINEAR))
                             for x, y, w, h in boxes]).to(dev)
        rows.append(F.normalize(backbone(crops).float(), dim=1).cpu().half().numpy())
    array = np.concatenate(rows) if rows else np.zeros((0, backbone.embed_dim), np.float16)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}.npy")
    try:
        np.save(tmp, array)
        os.replace(tmp, output)
    finally:
        tmp.unlink(missing_ok=True)
    return {"rois": len(array), "forwards": len(array)}


class ShardedRoIs:
    """All RoI embeddings, read from the shard files on demand: ``image(i) -> B_i x D`` float32.

    Each read is one positioned file read of that image's rows (no memory map: the neighbours are
    scattered over the index, and mapping would pull whole pages ranges into the process), so the
    memory held is that of the current query and neighbour, whatever the size of the index.
    """

    def __init__(self, proposal_files: list[Path], roi_files: list[Path]):
        self.ranges, self.offsets, self.files = [], [], []
        for prop_file, roi_file in zip(proposal_files, roi_files):
            props = _load_npz(prop_file, "proposals shard")
            if not Path(roi_file).is_file():
                raise Stage2Error(f"RoI embeddings not found: {roi_file}; run `cribo orl roi-embed` for that shard")
            fh = open(roi_file, "rb")
            version = np.lib.format.read_magic(fh)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(fh)
            if len(shape) != 2 or fortran or shape[0] != props["box_offsets"][-1]:
                fh.close()
                raise Stage2Error(f"{roi_file} holds {shape[0] if shape else 0} RoIs, {prop_file} "
                                  f"{props['box_offsets'][-1]}: stale shard; delete it and rerun `cribo orl roi-embed`")
            self.ranges.append((int(props["start"]), int(props["stop"])))
            self.offsets.append(props["box_offsets"])
            self.files.append((fh, fh.tell(), dtype, shape[1]))

    def image(self, i: int) -> np.ndarray:
        for (start, stop), offsets, (fh, data_start, dtype, dim) in zip(self.ranges, self.offsets, self.files):
            if start <= i < stop:
                first, last = offsets[i - start], offsets[i - start + 1]
                row = dim * dtype.itemsize
                fh.seek(data_start + int(first) * row)
                rows = np.frombuffer(fh.read(int(last - first) * row), dtype=dtype)
                return rows.reshape(-1, dim).astype(np.float32)
        raise Stage2Error(f"image {i} is in no RoI shard; the shards do not cover the image list, rerun stage 2")

    def close(self) -> None:
        for fh, *_ in self.files:
            fh.close()


def run_pairs(knn_file, proposal_files, roi_files, output, shard: int, num_shards: int, ratio: float = 0.1) -> dict:
    """Step 4, one shard of query images: the top RoI pairs with each of their neighbours."""
    knn = _load_npz(knn_file, "kNN file")["knn"]
    rois = ShardedRoIs([Path(p) for p in proposal_files], [Path(p) for p in roi_files])
    start, stop = shard_range(len(knn), shard, num_shards)
    pairs, scores, offsets = [], [], [0]
    try:
        for i in range(start, stop):
            query = torch.from_numpy(rois.image(i))
            for j in knn[i]:
                found, sims = top_pairs(query, torch.from_numpy(rois.image(int(j))), ratio)
                pairs.append(found.numpy().astype(np.int32))
                scores.append(sims.numpy().astype(np.float32))
                offsets.append(offsets[-1] + len(found))
    finally:
        rois.close()
    _save_npz(Path(output), start=np.asarray(start), stop=np.asarray(stop),
              pairs=np.concatenate(pairs) if pairs else np.zeros((0, 2), np.int32),
              pair_scores=np.concatenate(scores) if scores else np.zeros(0, np.float32),
              pair_offsets=np.asarray(offsets, np.int64))
    return {"queries": stop - start, "pairs": int(offsets[-1])}


def merge(knn_file, proposal_files, pair_files, output, summary_file, settings: dict) -> dict:
    """Step 5: the shards -> ``output`` (:class:`Correspondence` .npz) and ``summary_file`` (JSON)."""
    knn = _load_npz(knn_file, "kNN file")
    props = [_load_npz(p, "proposals shard") for p in proposal_files]
    pairs = [_load_npz(p, "pairs shard") for p in pair_files]
    n, k = knn["knn"].shape
    for what, shards in (("proposals", props), ("pairs", pairs)):
        covered = [(int(s["start"]), int(s["stop"])) for s in shards]
        if [c for c in covered if c[0] < c[1]] and (covered[0][0] != 0 or covered[-1][1] != n
                                                    or any(a[1] != b[0] for a, b in zip(covered, covered[1:]))):
            raise Stage2Error(f"the {what} shards cover {covered}, not [0, {n}) in order; rerun stage 2 "
                              "with the same number of shards for every step")
    box_counts = np.concatenate([np.diff(p["box_offsets"]) for p in props])
    pair_counts = np.concatenate([np.diff(p["pair_offsets"]) for p in pairs])
    corr = Correspondence(
        image_names=knn["image_names"], dataset=str(knn["dataset"]),
        boxes=np.concatenate([p["boxes"] for p in props]).astype(np.int32),
        box_offsets=np.concatenate([[0], np.cumsum(box_counts)]).astype(np.int64), knn=knn["knn"].astype(np.int64),
        pairs=np.concatenate([p["pairs"] for p in pairs]).astype(np.int32),
        pair_offsets=np.concatenate([[0], np.cumsum(pair_counts)]).astype(np.int64),
        pair_scores=np.concatenate([p["pair_scores"] for p in pairs]).astype(np.float32), settings=settings)
    corr.validate(str(output))
    save_correspondence(corr, output)
    raw = np.concatenate([p["raw_counts"] for p in props])
    # fp16 embeddings can put a cosine a hair outside [-1, 1]
    hist, edges = np.histogram(np.clip(corr.pair_scores, -1.0, 1.0), bins=20, range=(-1.0, 1.0))
    per_image_pairs = pair_counts.reshape(n, k).sum(axis=1)
    summary = {"images": int(n), "neighbours_per_image": int(k), "settings": settings,
               "proposals_per_image": _stats(raw), "rois_per_image": _stats(box_counts),
               "pairs_per_image": _stats(per_image_pairs),
               "images_without_a_valid_box": int(np.concatenate([p["fallback"] for p in props]).sum()),
               "pair_similarity_histogram": {"edges": edges.round(3).tolist(), "counts": hist.tolist()},
               "file_bytes": os.path.getsize(output)}
    atomic_write_text(summary_file, json.dumps(summary, indent=1) + "\n")
    return summary


def _stats(values: np.ndarray) -> dict:
    values = np.asarray(values, dtype=np.float64)
    return {"mean": round(float(values.mean()), 3), "min": int(values.min()), "max": int(values.max()),
            "total": int(values.sum())}


def plot_top_pairs(corr: Correspondence, root: str | Path, output: str | Path, count: int = 8) -> None:
    """The ``count`` most similar cross-image RoI pairs, query RoI above its neighbour RoI (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = np.argsort(-corr.pair_scores, kind="stable")
    rows = np.searchsorted(corr.pair_offsets, np.arange(len(corr.pairs)), side="right") - 1
    chosen, seen = [], set()
    for p in order:  # one pair per query image, for variety
        query = int(rows[p] // corr.k)
        if query not in seen:
            seen.add(query)
            chosen.append(p)
        if len(chosen) == count:
            break
    fig, axes = plt.subplots(2, max(len(chosen), 1), figsize=(1.6 * max(len(chosen), 1), 3.6), squeeze=False)
    for col, p in enumerate(chosen):
        query, slot = divmod(int(rows[p]), corr.k)
        neighbour = int(corr.knn[query, slot])
        for row, (image_index, box_index) in enumerate(((query, corr.pairs[p, 0]), (neighbour, corr.pairs[p, 1]))):
            x, y, w, h = corr.image_boxes(image_index)[box_index]
            image = load_rgb(Path(root) / str(corr.image_names[image_index]))
            axes[row, col].imshow(image.crop((int(x), int(y), int(x + w), int(y + h))).resize((96, 96)))
            axes[row, col].set_axis_off()
        axes[0, col].set_title(f"{corr.pair_scores[p]:.2f}", fontsize=8)
    fig.suptitle("top cross-image RoI pairs (query above, neighbour below; cosine)", fontsize=8)
    fig.tight_layout()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, output)
