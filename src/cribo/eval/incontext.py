"""In-context scene understanding by dense nearest-neighbour retrieval (the Hummingbird protocol).

Balazevic et al. (NeurIPS 2023) evaluate dense features without training anything: a memory holds
patch features of labelled training images with their soft labels (each patch's class
histogram); every validation patch takes its k nearest memory entries by cosine similarity,
weights their labels by ``softmax(similarity / temperature)``, and the resulting soft label map is
bilinearly upsampled and arg-maxed. No official code exists; open-hummingbird-eval is the
reference re-implementation, and this module follows its algorithm (rarity-based per-image patch
sampling, k = 30, temperature 0.02, exact inner-product search, bilinear upsampling, dataset-level
confusion matrix) with three deliberate departures:

- Ignored pixels (``ignore_index``, 255) are left out of the soft labels, and patches with no
  labelled pixel are never put in the memory. open-hummingbird-eval remaps 255 to class 0 before
  building the memory, which turns void pixels into a real class (background for VOC, but "road"
  for Cityscapes and real categories for the COCO super-classes).
- The per-image memory budget ``memory_size // I`` is capped at the number of patches per image
  (open-hummingbird-eval's ``torch.topk`` raises there, e.g. for the 1/128 fractions); the cap is
  logged and reported.
- The headline mIoU uses the identity label mapping (a class id is a class id); the Hungarian-
  matched mIoU that open-hummingbird-eval reports by default is returned alongside.

``protocol="open-hbird"`` undoes the three departures, for numbers comparable with those published
through open-hummingbird-eval (NeCo, its README): ignored pixels count as class 0 in the memory's
soft labels (``ignored_as_class_zero``), and the reported ``miou`` is Hungarian-matched and
averaged over all classes, absent ones counting 0 (``metrics.miou_over_all_classes``); its input
preprocessing (std 0.255, bilinear resizing) is a property of the feature stores
(``features.PREPROCESSING``). A budget above the patches of an image is still capped (there it
fails).

Shapes: I = memory images (or augmented passes), V = validation images, N = h * w patch tokens in
row-major grid order, D = feature width, C = classes, M = memory entries, Q = queries.
"""

from __future__ import annotations

import logging
import sys

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from cribo.eval.metrics import ConfusionMeter, miou_over_all_classes
from cribo.eval.search import make_searcher

log = logging.getLogger(__name__)

NORM_EPS = 1e-6
PROTOCOLS = ("clean", "open-hbird")
_CHUNK_IMAGES = 64  # images per chunk when building the memory (bounds the I x N x C temporaries)


def _as_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _normalise_rows(x: np.ndarray) -> np.ndarray:
    """L2-normalise the rows of a float32 array in place (``x / max(||x||, eps)``) and return it."""
    norms = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float32))
    x /= np.maximum(norms, NORM_EPS)[:, None]
    return x


def patch_label_counts(masks, patch_size: int, num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """Pixels of each class in each patch.

    Args:
        masks: ``B x H x W`` integer labels (numpy or torch), H and W multiples of ``patch_size``.
        patch_size: p.
        num_classes: C.
        ignore_index: label of pixels that are not counted.

    Returns:
        ``B x (H/p * W/p) x C`` uint16, patches in row-major grid order like ViT tokens. A patch's
        counts sum to ``p * p`` minus its ignored pixels.

    Raises:
        ValueError: wrong rank, size not a multiple of ``p``, ``p * p`` too large for uint16, or a
            label outside ``[0, C)`` other than ``ignore_index`` (the message names it).
    """
    masks = _as_numpy(masks)
    if masks.ndim != 3:
        raise ValueError(f"masks must be B x H x W, got shape {masks.shape}")
    b, h, w = masks.shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"mask size {h}x{w} is not a multiple of the patch size {patch_size}")
    if patch_size * patch_size > np.iinfo(np.uint16).max:
        raise ValueError(f"patch size {patch_size} too large for uint16 pixel counts")
    gh, gw = h // patch_size, w // patch_size
    # B x gh x p x gw x p -> B x N x p*p: the pixels of each patch, patches in row-major order
    labels = masks.reshape(b, gh, patch_size, gw, patch_size).transpose(0, 1, 3, 2, 4)
    labels = labels.reshape(b, gh * gw, patch_size * patch_size).astype(np.int64)
    valid = labels != ignore_index
    bad = valid & ((labels < 0) | (labels >= num_classes))
    if bad.any():
        raise ValueError(f"mask label {int(labels[bad][0])} is outside [0, {num_classes}) and is not the "
                         f"ignore label {ignore_index}")
    slot = np.arange(b * gh * gw, dtype=np.int64).reshape(b, gh * gw, 1) * num_classes + labels
    counts = np.bincount(slot[valid], minlength=b * gh * gw * num_classes)
    return counts.reshape(b, gh * gw, num_classes).astype(np.uint16)


def ignored_as_class_zero(label_counts: np.ndarray, patch_pixels: int) -> np.ndarray:
    """open-hummingbird-eval's memory labels: every ignored pixel of a patch counted as class 0.

    Args:
        label_counts: ``I x N x C`` pixel counts per class (ignored pixels not counted).
        patch_pixels: pixels per patch (``p * p``).

    Returns:
        ``I x N x C`` counts (same dtype) whose rows all sum to ``patch_pixels``.
    """
    counts = np.array(label_counts, copy=True)
    ignored = patch_pixels - counts.sum(axis=-1, dtype=np.int64)
    if (ignored < 0).any():
        raise ValueError(f"label counts exceed the {patch_pixels} pixels of a patch: wrong patch size?")
    counts[..., 0] += ignored.astype(counts.dtype)
    return counts


def rarity_scores(label_counts: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """open-hummingbird-eval's per-image sampling score; lower is kept first.

    For patch n of image i: ``score = U_in * sum_{c present in n} P_ic`` with ``P_ic`` the number of
    patches of image i containing class c and ``U_in ~ U[0, 1)`` drawn as one ``rng.random((I, N))``
    call. Patches of classes rare in their image thus score low, with randomisation. Patches with
    no labelled pixel score ``+inf`` (never kept before a labelled one).

    Args:
        label_counts: ``I x N x C`` pixel counts per class (ignored pixels not counted).
        rng: numpy Generator (only its ``random(shape)`` method is used).

    Returns:
        ``I x N`` float64 scores.
    """
    present = np.asarray(label_counts) > 0  # I x N x C
    patches_per_class = present.sum(axis=1, keepdims=True)  # I x 1 x C
    scores = (present * patches_per_class).sum(axis=2).astype(np.float64)  # I x N
    scores *= rng.random(scores.shape)
    scores[~present.any(axis=2)] = np.inf
    return scores


def per_image_budget(memory_size: int | None, num_images: int, num_patches: int) -> int | None:
    """Patches kept per image: ``min(memory_size // num_images, num_patches)``; None when unbounded.

    Raises ValueError when ``memory_size < num_images`` (a budget of zero patches per image).
    """
    if memory_size is None:
        return None
    budget = memory_size // num_images
    if budget < 1:
        raise ValueError(f"memory_size {memory_size} is smaller than the number of memory images "
                         f"{num_images}: no patch could be kept per image")
    if budget > num_patches:
        log.warning("memory budget %d // %d images = %d patches per image exceeds the %d patches of an "
                    "image; capped at %d (open-hummingbird-eval would fail here)",
                    memory_size, num_images, budget, num_patches, num_patches)
        budget = num_patches
    return budget


def select_memory(features, label_counts, memory_size: int | None,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Build the retrieval memory from the training patches.

    Args:
        features: ``I x N x D`` float16/float32 patch features (may be a memory-mapped array).
        label_counts: ``I x N x C`` pixel counts per class (ignored pixels not counted).
        memory_size: total budget; None keeps every labelled patch. Otherwise each image keeps its
            ``K = per_image_budget(memory_size, I, N)`` lowest ``rarity_scores`` (K capped at N).
            Patches whose counts sum to 0 (all pixels ignored) are never kept, so an image may
            contribute fewer than K entries.
        rng: numpy Generator for the rarity noise.

    Returns:
        ``M x D`` float16 L2-normalised features (normalised in float32, epsilon 1e-6) and
        ``M x C`` uint16 pixel counts (the soft label is counts / counts.sum, formed when gathered:
        half the bytes of float32 labels, exact), entries ordered by image then patch.
    """
    num_images, num_patches, dim = features.shape
    if label_counts.shape[:2] != (num_images, num_patches):
        raise ValueError(f"label counts {label_counts.shape} do not match features {features.shape} "
                         f"(expected I x N x C with I x N = {num_images} x {num_patches})")
    num_classes = label_counts.shape[2]
    budget = per_image_budget(memory_size, num_images, num_patches)
    keep = np.zeros((num_images, num_patches), dtype=bool)
    for s in range(0, num_images, _CHUNK_IMAGES):
        counts = np.asarray(label_counts[s:s + _CHUNK_IMAGES])
        labelled = counts.sum(axis=2) > 0
        if budget is None:
            keep[s:s + len(counts)] = labelled
        else:
            order = np.argsort(rarity_scores(counts, rng), axis=1, kind="stable")[:, :budget]
            chosen = np.zeros_like(labelled)
            np.put_along_axis(chosen, order, True, axis=1)
            keep[s:s + len(counts)] = chosen & labelled
    num_entries = int(keep.sum())
    mem_feats = np.empty((num_entries, dim), dtype=np.float16)
    mem_labels = np.empty((num_entries, num_classes), dtype=np.uint16)
    row = 0
    for s in range(0, num_images, _CHUNK_IMAGES):
        sel = keep[s:s + _CHUNK_IMAGES]
        n = int(sel.sum())
        feats = np.asarray(features[s:s + _CHUNK_IMAGES])[sel].astype(np.float32)
        mem_feats[row:row + n] = _normalise_rows(feats)
        mem_labels[row:row + n] = np.asarray(label_counts[s:s + _CHUNK_IMAGES])[sel]
        row += n
    return mem_feats, mem_labels


def build_index(memory_features: np.ndarray, kind: str = "exact", device: str = "cpu", **options):
    """Searcher over ``M x D`` L2-normalised features, kept in float16 (:mod:`cribo.eval.search`).

    ``kind``: ``exact`` (inner product over float32 slices of the float16 memory) or ``ivfpq``
    (approximate, for memories larger than RAM).
    """
    return make_searcher(np.asarray(memory_features, dtype=np.float16), kind, device=device, **options)


def retrieve_soft_labels(queries, memory_features, memory_labels, k: int = 30, temperature: float = 0.02,
                         batch_size: int = 16384) -> np.ndarray:
    """Label propagation from the k nearest memory entries.

    For each query q (L2-normalised): neighbours i = 1..k by exact inner product (cosine) with the
    normalised memory (float16, searched in re-normalised float32 slices), weights
    ``softmax(cos(q, m_i) / temperature)`` (max-subtracted, float32), output ``sum_i w_i * label_i``.

    Args:
        queries: ``Q x D``.
        memory_features: ``M x D`` (normalised by ``select_memory``; re-normalised here anyway).
        memory_labels: ``M x C`` soft labels or pixel counts (each gathered row is divided by its sum).
        k: neighbours per query, ``1 <= k <= M`` (ValueError otherwise).
        temperature: softmax temperature (> 0).
        batch_size: queries searched at a time (bounds the ``batch x k x C`` gather).

    Returns:
        ``Q x C`` float32 soft labels (rows sum to 1 when the memory labels do).
    """
    memory_features = _as_numpy(memory_features)
    _check_retrieval(memory_features.shape, memory_labels, k, temperature)
    return _propagate(queries, build_index(memory_features), memory_labels, k, temperature, batch_size)


def _check_retrieval(memory_shape: tuple[int, int], memory_labels, k: int, temperature: float) -> None:
    num_memory = memory_shape[0]
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if k > num_memory:
        raise ValueError(f"k = {k} neighbours requested but the memory holds only {num_memory} entries")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if memory_labels.shape[0] != num_memory:
        raise ValueError(f"{memory_labels.shape[0]} memory labels for {num_memory} memory features")


def _propagate(queries, index, memory_labels, k: int, temperature: float,
               batch_size: int = 16384) -> np.ndarray:
    """``retrieve_soft_labels`` against a prebuilt ``build_index`` (reused across val chunks)."""
    queries = _as_numpy(queries)
    if queries.ndim != 2 or queries.shape[1] != index.d:
        raise ValueError(f"queries must be Q x {index.d}, got shape {queries.shape}")
    memory_labels = np.asarray(memory_labels)
    out = np.empty((queries.shape[0], memory_labels.shape[1]), dtype=np.float32)
    for start in range(0, queries.shape[0], batch_size):
        q = _normalise_rows(np.array(queries[start:start + batch_size], dtype=np.float32, order="C", copy=True))
        sims, idx = index.search(q, k)  # Q x k float32, sorted by decreasing similarity
        logits = sims / np.float32(temperature)
        logits -= logits.max(axis=1, keepdims=True)
        weights = np.exp(logits)
        weights /= weights.sum(axis=1, keepdims=True)
        neighbours = memory_labels[idx].astype(np.float32)  # Q x k x C: counts, or soft labels
        neighbours /= np.maximum(neighbours.sum(axis=2, keepdims=True), np.float32(1e-12))
        neighbours = torch.from_numpy(neighbours)
        out[start:start + len(q)] = torch.bmm(torch.from_numpy(weights)[:, None, :], neighbours)[:, 0].numpy()
    return out


def predict_label_maps(soft_labels, out_size: tuple[int, int], max_elements: int = 1 << 26) -> np.ndarray:
    """Class maps from patch-level soft labels.

    Args:
        soft_labels: ``V x h x w x C``.
        out_size: ``(H, W)``.
        max_elements: images are upsampled a few at a time so that no ``chunk x C x H x W``
            float32 tensor exceeds this many elements (at least one image per chunk).

    Returns:
        ``V x H x W`` int64: argmax over C of the bilinear upsampling
        (``torch.nn.functional.interpolate``, ``align_corners=False``); ties go to the lowest class.
    """
    soft = torch.as_tensor(_as_numpy(soft_labels), dtype=torch.float32)
    if soft.ndim != 4:
        raise ValueError(f"soft labels must be V x h x w x C, got shape {tuple(soft.shape)}")
    v, _, _, c = soft.shape
    height, width = (int(s) for s in out_size)
    out = np.empty((v, height, width), dtype=np.int64)
    step = max(1, max_elements // max(1, c * height * width))
    for s in range(0, v, step):
        x = soft[s:s + step].permute(0, 3, 1, 2)
        x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)
        out[s:s + step] = x.argmax(dim=1).numpy()
    return out


def evaluate_incontext(train_features, train_label_counts, val_features, val_masks, grid: tuple[int, int],
                       num_classes: int, *, k: int = 30, temperature: float = 0.02, memory_size: int | None = None,
                       seed: int = 0, ignore_index: int = 255, batch_images: int = 64,
                       index_kind: str = "exact", progress: bool = False, protocol: str = "clean") -> dict:
    """Dense NN retrieval mIoU of a validation set against a labelled memory.

    Args:
        train_features: ``I x N x D``; train_label_counts: ``I x N x C`` (see ``select_memory``).
        val_features: ``V x N x D``; val_masks: ``V x H x W`` ground truth, ``ignore_index`` ignored.
        grid: ``(h, w)`` with ``h * w = N``.
        num_classes: C.
        k, temperature: retrieval (``retrieve_soft_labels``).
        memory_size, seed: memory budget and the seed of the rarity noise (``select_memory``).
        batch_images: validation images per chunk (retrieval, upsampling, confusion update).
        index_kind: ``exact`` or ``ivfpq`` (approximate; see :mod:`cribo.eval.search`). The exact
            search runs on the GPU when torch sees one.
        progress: tqdm bar over the chunks.
        protocol: ``clean`` (default) or ``open-hbird`` (module doc): the memory labels and the
            reported ``miou`` then follow open-hummingbird-eval; ``miou_identity`` keeps ours.

    Returns:
        ``{"miou": identity-mapped mIoU % (open-hbird: its Hungarian all-class mean),
        "miou_hungarian": Hungarian-matched mIoU %,
        "per_class_iou": identity per-class IoU % (None: class absent), "pixel_accuracy": %,
        "memory_entries": M, "per_image_budget": K or None, "k", "temperature"}``.
    """
    h, w = grid
    num_train, num_patches, dim = train_features.shape
    if num_patches != h * w:
        raise ValueError(f"train features hold {num_patches} patches per image but the grid is {h}x{w}")
    if val_features.shape[1:] != (num_patches, dim):
        raise ValueError(f"val features {val_features.shape} do not match train features {train_features.shape}")
    if train_label_counts.shape[2] != num_classes:
        raise ValueError(f"label counts have {train_label_counts.shape[2]} classes, expected {num_classes}")
    if val_masks.shape[0] != val_features.shape[0]:
        raise ValueError(f"{val_masks.shape[0]} val masks for {val_features.shape[0]} val feature maps")
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    if protocol == "open-hbird":
        patch_pixels = (val_masks.shape[1] // h) * (val_masks.shape[2] // w)
        train_label_counts = ignored_as_class_zero(train_label_counts, patch_pixels)
    rng = np.random.default_rng(seed)
    mem_feats, mem_labels = select_memory(train_features, train_label_counts, memory_size, rng)
    budget = None if memory_size is None else min(memory_size // num_train, num_patches)
    num_entries = mem_feats.shape[0]
    _check_retrieval(mem_feats.shape, mem_labels, k, temperature)
    index = build_index(mem_feats, index_kind, device="cuda" if torch.cuda.is_available() else "cpu")
    del mem_feats  # the index holds the float32 copy
    meter = ConfusionMeter(num_classes, ignore_index)
    for start in tqdm(range(0, val_features.shape[0], batch_images), desc="in-context retrieval",
                      disable=not progress, file=sys.stdout, mininterval=5):
        feats = np.asarray(val_features[start:start + batch_images])
        masks = np.asarray(val_masks[start:start + batch_images])
        soft = _propagate(feats.reshape(-1, dim), index, mem_labels, k, temperature)
        pred = predict_label_maps(soft.reshape(len(feats), h, w, num_classes), masks.shape[1:])
        meter.update(pred, masks)
    identity, hungarian = meter.compute("identity"), meter.compute("hungarian")
    reported = identity["miou"] if protocol == "clean" else miou_over_all_classes(meter.matrix, "hungarian")
    return {
        "miou": reported, "miou_hungarian": hungarian["miou"], "miou_identity": identity["miou"],
        "incontext_protocol": protocol,
        "per_class_iou": identity["per_class_iou"], "pixel_accuracy": identity["pixel_accuracy"],
        "memory_entries": int(num_entries), "per_image_budget": budget,
        "k": k, "temperature": temperature,
    }
