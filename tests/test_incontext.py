import logging
import math

import numpy as np
import pytest
import torch

from cribo.eval.incontext import (evaluate_incontext, patch_label_counts, per_image_budget, predict_label_maps,
                                  rarity_scores, retrieve_soft_labels, select_memory)


class FixedNoise:
    """Stands in for a numpy Generator: ``random(shape)`` returns chosen values."""

    def __init__(self, values):
        self.values = np.asarray(values, dtype=np.float64)

    def random(self, shape):
        return self.values.reshape(shape).copy()


class RecordingNoise:
    """A real seeded Generator whose draws are kept, so a test can redo the scoring by hand."""

    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)
        self.draws = None

    def random(self, shape):
        self.draws = self.rng.random(shape)
        return self.draws


# --------------------------------------------------------------------------- patch_label_counts

def test_patch_label_counts_by_hand():
    mask = np.array([[[0, 1, 2, 2],
                      [1, 1, 2, 255],
                      [0, 0, 0, 0],
                      [0, 0, 1, 0]]], dtype=np.uint8)
    counts = patch_label_counts(mask, 2, 3)
    assert counts.shape == (1, 4, 3) and counts.dtype == np.uint16
    # patches in row-major order: top-left, top-right (one ignored pixel), bottom-left, bottom-right
    assert counts[0].tolist() == [[1, 3, 0], [0, 0, 3], [4, 0, 0], [3, 1, 0]]
    # torch input, and a non-square grid (1 x 2 patches): still row-major
    wide = torch.tensor([[[1, 1, 0, 255], [1, 2, 255, 255]]], dtype=torch.uint8)
    assert patch_label_counts(wide, 2, 3)[0].tolist() == [[0, 3, 1], [1, 0, 0]]


def test_patch_label_counts_refuses_bad_input():
    with pytest.raises(ValueError, match="label 5"):
        patch_label_counts(np.full((1, 2, 2), 5, np.uint8), 2, 3)
    with pytest.raises(ValueError, match="multiple"):
        patch_label_counts(np.zeros((1, 3, 4), np.uint8), 2, 3)
    with pytest.raises(ValueError, match="B x H x W"):
        patch_label_counts(np.zeros((4, 4), np.uint8), 2, 3)


# --------------------------------------------------------------------------- rarity / memory

def test_rarity_scores_by_hand_with_fixed_noise():
    # image of 4 patches: 0 and 1 hold class 0; 2 holds classes 0 and 1; 3 holds only class 2.
    # Patches per class: class 0 -> 3, class 1 -> 1, class 2 -> 1.
    counts = np.zeros((1, 4, 3), np.uint16)
    counts[0, 0, 0] = counts[0, 1, 0] = 4
    counts[0, 2] = [2, 2, 0]
    counts[0, 3, 2] = 4
    # base scores 3, 3, 3 + 1, 1; times the noise
    scores = rarity_scores(counts, FixedNoise([0.5, 0.25, 0.1, 0.9]))
    assert scores[0].tolist() == pytest.approx([1.5, 0.75, 0.4, 0.9])
    # a patch with no labelled pixel (all ignored) scores +inf whatever its noise
    counts[0, 1] = 0
    scores = rarity_scores(counts, FixedNoise([0.5, 0.25, 0.1, 0.9]))
    # class 0 now in 2 patches: 2 * 0.5, inf, (2 + 1) * 0.1, 1 * 0.9
    assert scores[0, 0] == pytest.approx(1.0) and math.isinf(scores[0, 1])
    assert scores[0, 2:].tolist() == pytest.approx([0.3, 0.9])


def _one_hot_patch_features(num_images, num_patches, scale=3.0):
    """Feature of patch n is ``scale * e_n``: the kept patch can be read off the memory."""
    return np.tile(np.eye(num_patches, dtype=np.float32)[None] * scale, (num_images, 1, 1))


def test_rare_patch_wins_whenever_the_noise_ratio_allows_it():
    # Class 0 fills patches 0-2 (base score 3 each), class 1 only patch 3 (base score 1).
    # Rare patch 3 is kept with budget 1 iff 1 * U3 < 3 * min(U0, U1, U2). With multiplicative
    # U(0,1) noise on every patch no finite frequency ratio makes that certain (U3 / min U can be
    # arbitrarily large), so the certain case is built from the noise: as long as the common
    # patches draw at least 1/3, even U3 close to 1 wins.
    counts = np.zeros((1, 4, 2), np.uint16)
    counts[0, :3, 0] = 4
    counts[0, 3, 1] = 4
    feats = _one_hot_patch_features(1, 4)
    for common_noise in (0.34, 0.5, 0.99):
        for rare_noise in (0.0, 0.5, 0.99):
            noise = FixedNoise([common_noise, common_noise, 1.0 - 1e-9, rare_noise])
            mem, labels = select_memory(feats, counts, memory_size=1, rng=noise)
            assert mem.shape == (1, 4) and int(np.argmax(mem[0])) == 3
            assert labels.tolist() == [[0, 4]]  # the kept patch's pixel counts
    # and with a real generator, for every seed the kept patch is the hand-scored argmin
    for seed in range(50):
        noise = RecordingNoise(seed)
        mem, _ = select_memory(feats, counts, memory_size=1, rng=noise)
        u = noise.draws[0]
        expected = 3 if u[3] < 3 * u[:3].min() else int(np.argmin(u[:3]))
        assert int(np.argmax(mem[0])) == expected


def test_rare_patch_is_kept_as_often_as_the_noise_model_says():
    # Class 0 fills 9 patches (score 9 * U each), class 1 one patch (score 1 * U). The rare patch is
    # kept first when U_r < 9 * min(U_1..U_9): probability int_0^1 (1 - u/9)^9 du = 9/10 (1 - (8/9)^10).
    images = 4000
    counts = np.zeros((images, 10, 2), np.uint16)
    counts[:, :9, 0] = 1
    counts[:, 9, 1] = 1
    scores = rarity_scores(counts, np.random.default_rng(0))
    rate = np.mean(scores[:, 9] < scores[:, :9].min(axis=1))
    expected = 9 / 10 * (1 - (8 / 9) ** 10)  # 0.623; sampling sd 0.008
    assert abs(rate - expected) < 0.03


def test_select_memory_unbounded_keeps_every_labelled_patch_with_normalised_features():
    # patch 0: all pixels ignored; patches 1, 2: class 0; patch 3: 1 pixel of class 0, 3 of class 1
    counts = np.zeros((1, 4, 2), np.uint16)
    counts[0, 1:3, 0] = 4
    counts[0, 3] = [1, 3]
    feats = np.array([[[1.0, 0, 0], [3.0, 4.0, 0], [0, 0, 2.0], [1.0, 1.0, 1.0]]], np.float32)
    mem, labels = select_memory(feats, counts, memory_size=None, rng=np.random.default_rng(0))
    assert mem.dtype == np.float16 and labels.dtype == np.uint16  # counts: normalised when gathered
    s = 1 / math.sqrt(3)
    assert mem.astype(np.float32) == pytest.approx(np.array([[0.6, 0.8, 0], [0, 0, 1], [s, s, s]]), abs=1e-3)
    assert labels.tolist() == [[4, 0], [4, 0], [1, 3]]


def test_select_memory_budget_per_image_and_cap():
    counts = np.zeros((2, 4, 2), np.uint16)
    counts[:, :, 0] = 4
    counts[0, 0] = 0  # image 0 has one fully ignored patch
    counts[1, 2] = [0, 4]  # image 1 has one rare patch
    feats = _one_hot_patch_features(2, 4)
    # memory_size 5 over 2 images -> K = 2 per image
    assert per_image_budget(5, 2, 4) == 2
    mem, labels = select_memory(feats, counts, memory_size=5, rng=np.random.default_rng(0))
    assert mem.shape == (4, 4) and labels.shape == (4, 2)
    kept = np.argmax(mem, axis=1)
    assert 0 not in kept[:2]  # the ignored patch of image 0 is never kept
    # K > N: capped at N, logged; fully ignored patches are still dropped
    assert per_image_budget(100, 2, 4) == 4
    mem, _ = select_memory(feats, counts, memory_size=100, rng=np.random.default_rng(0))
    assert mem.shape == (7, 4)
    with pytest.raises(ValueError, match="smaller than the number of memory images"):
        select_memory(feats, counts, memory_size=1, rng=np.random.default_rng(0))
    assert per_image_budget(None, 2, 4) is None


def test_budget_cap_is_logged(caplog):
    with caplog.at_level(logging.WARNING, logger="cribo.eval.incontext"):
        assert per_image_budget(10_240_000, 160, 1024) == 1024
    assert "capped at 1024" in caplog.text


# --------------------------------------------------------------------------- retrieval

def test_retrieval_with_k1_returns_the_label_of_the_identical_item():
    memory = np.eye(4, dtype=np.float32)
    labels = np.eye(4, dtype=np.float32)[:, :3]
    labels[3] = [0.2, 0.3, 0.5]
    for j in range(4):
        out = retrieve_soft_labels(5.0 * memory[j:j + 1], memory, labels, k=1)
        assert out.shape == (1, 3) and out[0].tolist() == pytest.approx(labels[j].tolist())


def test_retrieval_weights_are_a_softmax_of_similarities_by_hand():
    memory = np.eye(3, dtype=np.float32)
    labels = np.array([[1, 0], [0, 1], [0.5, 0.5]], np.float32)
    q = np.array([[1.0, 0.6, 0.0], [0.0, 2.0, 1.0]], np.float32)
    temperature = 0.5
    out = retrieve_soft_labels(q, memory, labels, k=2, temperature=temperature, batch_size=1)
    # query 0: cos to items 0, 1 = 1/|q|, 0.6/|q|; item 2 (cos 0) is not among the 2 nearest
    n0 = math.hypot(1, 0.6)
    w = math.exp(1 / n0 / temperature) / (math.exp(1 / n0 / temperature) + math.exp(0.6 / n0 / temperature))
    assert out[0].tolist() == pytest.approx([w, 1 - w], rel=1e-5)
    # query 1: cos to items 1, 2 = 2/sqrt(5), 1/sqrt(5)
    n1 = math.sqrt(5)
    a, b = math.exp(2 / n1 / temperature), math.exp(1 / n1 / temperature)
    w1, w2 = a / (a + b), b / (a + b)
    assert out[1].tolist() == pytest.approx([0.5 * w2, w1 + 0.5 * w2], rel=1e-5)


def test_retrieval_is_stable_at_tiny_temperatures():
    # sim / T reaches ~860: exp would overflow float32 without subtracting the max
    memory = np.eye(3, dtype=np.float32)
    labels = np.array([[1, 0], [0, 1], [0.5, 0.5]], np.float32)
    out = retrieve_soft_labels(np.array([[1.0, 0.6, 0.0]]), memory, labels, k=3, temperature=1e-3)
    assert np.isfinite(out).all() and out[0].tolist() == pytest.approx([1.0, 0.0], abs=1e-6)


def test_retrieval_refuses_bad_arguments():
    memory = np.eye(3, dtype=np.float32)
    labels = np.eye(3, dtype=np.float32)
    with pytest.raises(ValueError, match="only 3 entries"):
        retrieve_soft_labels(memory, memory, labels, k=4)
    with pytest.raises(ValueError, match="at least 1"):
        retrieve_soft_labels(memory, memory, labels, k=0)
    with pytest.raises(ValueError, match="temperature"):
        retrieve_soft_labels(memory, memory, labels, k=1, temperature=0)
    with pytest.raises(ValueError, match="Q x 3"):
        retrieve_soft_labels(np.ones((2, 4), np.float32), memory, labels, k=1)


# --------------------------------------------------------------------------- upsampling

def _bilinear_weights(out_len, in_len):
    """align_corners=False: output j samples input x = (j + 0.5) * in/out - 0.5, clamped below at 0;
    the two nearest cells share the weight linearly (the upper index clamped at in_len - 1)."""
    w = np.zeros((out_len, in_len))
    for j in range(out_len):
        x = max((j + 0.5) * in_len / out_len - 0.5, 0.0)
        lo = min(int(math.floor(x)), in_len - 1)
        hi = min(lo + 1, in_len - 1)
        frac = x - lo
        w[j, lo] += 1 - frac
        w[j, hi] += frac
    return w


def test_bilinear_upsampling_then_argmax_by_hand():
    # Probability of class 1 in the 2x2 cells; class 0 has 1 - p.
    p = np.array([[0.0, 0.6],
                  [0.9, 0.1]])
    soft = np.stack([1 - p, p], axis=-1)[None].astype(np.float32)  # 1 x 2 x 2 x 2
    # rows/columns 0..3 sample x = -0.25 (-> 0), 0.25, 0.75, 1.25 (-> cell 1 only): weights
    # (1, 0), (0.75, 0.25), (0.25, 0.75), (0, 1)
    wy = wx = _bilinear_weights(4, 2)
    assert wx.tolist() == [[1, 0], [0.75, 0.25], [0.25, 0.75], [0, 1]]
    p_up = wy @ p @ wx.T
    # e.g. pixel (2, 1): 0.25*0.75*0 + 0.25*0.25*0.6 + 0.75*0.75*0.9 + 0.75*0.25*0.1 = 0.5625 -> class 1
    #      pixel (1, 2): 0.75*0.25*0 + 0.75*0.75*0.6 + 0.25*0.25*0.9 + 0.25*0.75*0.1 = 0.4125 -> class 0
    assert p_up[2, 1] == pytest.approx(0.5625) and p_up[1, 2] == pytest.approx(0.4125)
    expected = (p_up > 0.5).astype(np.int64)
    assert not np.any(np.isclose(p_up, 0.5))
    pred = predict_label_maps(soft, (4, 4))
    assert pred.dtype == np.int64 and pred.shape == (1, 4, 4)
    assert pred[0].tolist() == expected.tolist()
    assert pred[0, 2, 1] == 1 and pred[0, 1, 2] == 0
    # upsampling one image at a time gives the same maps
    three = predict_label_maps(np.repeat(soft, 3, axis=0), (4, 4), max_elements=1)
    assert all(m.tolist() == expected.tolist() for m in three)


def test_non_square_upsampling_factor():
    # a 1 x 2 map to 2 x 6 (factor 3 along x): x = (j + 0.5) / 3 - 0.5
    p = np.array([[0.2, 0.7]])
    soft = np.stack([1 - p, p], axis=-1)[None].astype(np.float32)
    p_up = _bilinear_weights(2, 1) @ p @ _bilinear_weights(6, 2).T
    assert predict_label_maps(soft, (2, 6))[0].tolist() == (p_up > 0.5).astype(int).tolist()


# --------------------------------------------------------------------------- end to end

def _synthetic(rng, n, grid, patch, classes):
    """Each patch uniform in one class, so upsampled soft labels can reproduce the mask exactly."""
    patch_classes = rng.integers(0, classes, size=(n, *grid))
    masks = np.repeat(np.repeat(patch_classes, patch, axis=1), patch, axis=2).astype(np.uint8)
    return patch_classes.reshape(n, -1), masks


def test_end_to_end_one_hot_features_are_perfect_and_random_ones_are_not():
    rng = np.random.default_rng(0)
    grid, patch, classes, dim = (4, 4), 2, 3, 8
    train_cls, train_masks = _synthetic(rng, 20, grid, patch, classes)
    val_cls, val_masks = _synthetic(rng, 5, grid, patch, classes)
    val_masks[0, 0, 0] = 255  # ignored ground-truth pixel
    counts = patch_label_counts(train_masks, patch, classes)

    def one_hot(c):
        return (np.eye(dim)[c] + 0.01 * rng.normal(size=(*c.shape, dim))).astype(np.float16)

    out = evaluate_incontext(one_hot(train_cls), counts, one_hot(val_cls), val_masks, grid, classes, k=5,
                             batch_images=2)
    assert out["miou"] == pytest.approx(100.0) and out["miou_hungarian"] == pytest.approx(100.0)
    assert out["pixel_accuracy"] == pytest.approx(100.0)
    assert out["memory_entries"] == 20 * 16 and out["per_image_budget"] is None
    assert out["k"] == 5 and out["temperature"] == 0.02
    # bounded memory: 8 patches per image
    out = evaluate_incontext(one_hot(train_cls), counts, one_hot(val_cls), val_masks, grid, classes, k=5,
                             memory_size=20 * 8)
    assert out["miou"] == pytest.approx(100.0)
    assert out["memory_entries"] == 20 * 8 and out["per_image_budget"] == 8

    def noise(c):
        return rng.normal(size=(*c.shape, dim)).astype(np.float16)

    out = evaluate_incontext(noise(train_cls), counts, noise(val_cls), val_masks, grid, classes, k=5)
    assert out["miou"] < 60 and out["pixel_accuracy"] < 70


def test_end_to_end_ignored_train_pixels_never_become_labels():
    # Train: every patch whose class is 0 is fully ignored (255). The memory then holds no class 0,
    # so no val pixel can be predicted 0: class 0 IoU is exactly 0 (open-hummingbird-eval's
    # 255 -> 0 remap would instead teach class 0 from the void pixels).
    rng = np.random.default_rng(1)
    grid, patch, classes = (4, 4), 2, 3
    train_cls, train_masks = _synthetic(rng, 10, grid, patch, classes)
    train_masks[train_masks == 0] = 255
    val_cls, val_masks = _synthetic(rng, 3, grid, patch, classes)
    counts = patch_label_counts(train_masks, patch, classes)
    assert counts[..., 0].sum() == 0
    feats = np.eye(4)[train_cls].astype(np.float32)
    out = evaluate_incontext(feats, counts, np.eye(4)[val_cls].astype(np.float32), val_masks, grid, classes, k=1)
    assert out["memory_entries"] == int((train_cls != 0).sum())
    assert out["per_class_iou"][0] == 0.0
    assert out["per_class_iou"][1:] != [None, None] and out["miou"] < 100


def test_end_to_end_checks_shapes():
    feats = np.zeros((2, 16, 4), np.float32)
    counts = np.ones((2, 16, 3), np.uint16)
    masks = np.zeros((2, 8, 8), np.uint8)
    with pytest.raises(ValueError, match="grid"):
        evaluate_incontext(feats, counts, feats, masks, (4, 3), 3)
    with pytest.raises(ValueError, match="classes"):
        evaluate_incontext(feats, counts, feats, masks, (4, 4), 4)
    with pytest.raises(ValueError, match="only 32 entries"):
        evaluate_incontext(feats, counts, feats, masks, (4, 4), 3, k=33)


def test_select_memory_keeps_image_order_across_chunks():
    # 150 images (more than one internal chunk), 2 patches each; patch 1 is always fully ignored
    images, classes, dim = 150, 3, 5
    counts = np.zeros((images, 2, classes), np.uint16)
    counts[np.arange(images), 0, np.arange(images) % classes] = 4
    feats = np.zeros((images, 2, dim), np.float16)
    feats[np.arange(images), 0, np.arange(images) % dim] = 2.0
    feats[:, 1] = 1.0
    for memory_size in (None, 2 * images):
        mem, labels = select_memory(feats, counts, memory_size, rng=np.random.default_rng(0))
        assert mem.shape == (images, dim)
        assert labels.tolist() == (4 * np.eye(classes, dtype=int))[np.arange(images) % classes].tolist()
        assert mem.astype(np.float32).tolist() == np.eye(dim)[np.arange(images) % dim].tolist()
