import math

import numpy as np
import pytest

from cribo.eval.incontext import (evaluate_incontext, patch_label_counts, predict_label_maps, rarity_scores,
                                  retrieve_soft_labels, select_memory)


def test_patch_label_counts_by_hand():
    mask = np.array([[[0, 1, 2, 2],
                      [1, 1, 2, 255],
                      [0, 0, 0, 0],
                      [0, 0, 1, 0]]], dtype=np.uint8)
    counts = patch_label_counts(mask, 2, 3)
    assert counts.shape == (1, 4, 3)
    # patches in row-major order: top-left, top-right, bottom-left, bottom-right
    assert counts[0].tolist() == [[1, 3, 0], [0, 0, 3], [4, 0, 0], [3, 1, 0]]
    with pytest.raises(ValueError, match="label 5"):
        patch_label_counts(np.full((1, 2, 2), 5, np.uint8), 2, 3)
    with pytest.raises(ValueError, match="multiple"):
        patch_label_counts(np.zeros((1, 3, 4), np.uint8), 2, 3)


def test_rarity_scores_are_bounded_by_class_frequency():
    # 4 patches: three hold only class 0 (in 3 patches), one holds classes 0 and 1.
    counts = np.zeros((1, 4, 2), np.uint16)
    counts[0, :3, 0] = 4
    counts[0, 3] = [2, 2]
    for seed in range(20):
        scores = rarity_scores(counts, np.random.default_rng(seed))[0]
        # class-0-only patches score 4 * U (class 0 is in 4 patches); the mixed one (4 + 1) * U
        assert np.all(scores[:3] <= 4) and scores[3] <= 5 and np.all(scores >= 0)
    # an unlabelled patch scores +inf: never preferred
    counts[0, 0, 0] = 0
    assert math.isinf(rarity_scores(counts, np.random.default_rng(0))[0, 0])


def test_select_memory_budget_keeps_rarest_and_drops_unlabelled_patches():
    # patch 0: unlabelled (all ignored); patches 1-3: class 0; image budget 1.
    counts = np.zeros((1, 4, 2), np.uint16)
    counts[0, 1:, 0] = 4
    counts[0, 3] = [0, 4]  # patch 3 is the only class-1 patch
    feats = np.eye(4, dtype=np.float32)[None] * 3.0
    mem, labels, budget = select_memory(feats, counts, memory_size=1, rng=np.random.default_rng(0))
    assert budget == 1 and mem.shape == (1, 4)
    # scores: patches 1,2 (class 0 present in 2 patches) -> 2*U; patch 3 -> 1*U; whichever wins,
    # the entry is a labelled patch, stored unit-norm with its label distribution
    assert np.allclose(np.linalg.norm(mem.astype(np.float32), axis=1), 1, atol=1e-3)
    assert labels.sum() == pytest.approx(1.0)
    # no budget: every labelled patch, none of the unlabelled ones
    mem, labels, budget = select_memory(feats, counts, memory_size=None, rng=np.random.default_rng(0))
    assert budget is None and mem.shape == (3, 4)
    assert labels.tolist() == [[1, 0], [1, 0], [0, 1]]
    # a budget larger than the patches available is capped at N
    mem, _, budget = select_memory(feats, counts, memory_size=100, rng=np.random.default_rng(0))
    assert budget == 4 and mem.shape == (3, 4)


def test_rare_patch_wins_as_often_as_the_noise_model_says():
    # Class 0 fills 9 patches (score 9 * U each), class 1 one patch (score 1 * U). The rare patch
    # comes first when U_r < 9 * min(U_1..U_9), with probability
    # int_0^1 (1 - s/9)^9 ds = 9/10 * (1 - (8/9)^10).
    counts = np.zeros((1, 10, 2), np.uint16)
    counts[0, :9, 0] = 1
    counts[0, 9, 1] = 1
    wins = 0
    trials = 2000
    rng = np.random.default_rng(0)
    for _ in range(trials):
        scores = rarity_scores(counts, rng)
        wins += scores[0, 9] < scores[0, :9].min()
    # P(U1 < 9 * min(U2..U10)) for i.i.d. uniforms: integral of (1 - u/9)^9 du on [0,1]
    expected = (1 - (1 - 1 / 9) ** 10) * 9 / 10
    assert abs(wins / trials - expected) < 0.03


def test_retrieval_weights_are_a_softmax_of_similarities():
    memory = np.eye(3, dtype=np.float32)
    labels = np.array([[1, 0], [0, 1], [0.5, 0.5]], np.float32)
    # a query equal to item 1 with k=1 gets item 1's label
    assert retrieve_soft_labels(np.array([[0, 2.0, 0]]), memory, labels, k=1).tolist() == [[0, 1]]
    # query at equal angle between items 0 and 1: neighbours 0 and 1 with the same similarity
    q = np.array([[1.0, 0.6, 0.0]], np.float32)
    out = retrieve_soft_labels(q, memory, labels, k=2, temperature=0.5)
    s0, s1 = 1 / math.hypot(1, 0.6), 0.6 / math.hypot(1, 0.6)
    w0 = math.exp(s0 / 0.5) / (math.exp(s0 / 0.5) + math.exp(s1 / 0.5))
    assert out[0] == pytest.approx([w0, 1 - w0], rel=1e-5)
    with pytest.raises(ValueError, match="only 3 entries"):
        retrieve_soft_labels(q, memory, labels, k=4)


def test_bilinear_upsampling_then_argmax_by_hand():
    soft = np.zeros((1, 2, 2, 2), np.float32)
    soft[0, 0, 0] = [1, 0]
    soft[0, 0, 1] = [0, 1]
    soft[0, 1, 0] = [1, 0]
    soft[0, 1, 1] = [0, 1]
    pred = predict_label_maps(soft, (4, 4))
    # align_corners=False: output column j samples input x = (j + 0.5) / 2 - 0.5 -> -0.25, 0.25, 0.75, 1.25
    # columns 0,1 weigh the left cell more (class 0), columns 2,3 the right (class 1)
    assert pred[0].tolist() == [[0, 0, 1, 1]] * 4
    soft[0, 0, 1] = [0.7, 0.3]  # top-right now favours class 0 too
    # at row 0 (y=-0.25 -> clamped to the top row), column 2 (x=0.75): 0.25*[1,0] + 0.75*[0.7,0.3] -> class 0
    assert predict_label_maps(soft, (4, 4))[0, 0, 2] == 0


def test_end_to_end_one_hot_features_are_perfect_and_random_ones_are_not():
    rng = np.random.default_rng(0)
    grid, patch, classes = (4, 4), 2, 3

    def make(n):
        # each patch is uniform in one class, so upsampled soft labels reproduce the mask exactly
        patch_classes = rng.integers(0, classes, size=(n, *grid))
        masks = np.repeat(np.repeat(patch_classes, patch, axis=1), patch, axis=2).astype(np.uint8)
        return patch_classes.reshape(n, -1), masks

    train_cls, train_masks = make(20)
    val_cls, val_masks = make(5)
    counts = patch_label_counts(train_masks, patch, classes)
    onehot = lambda c: (np.eye(8)[c] + 0.01 * rng.normal(size=(*c.shape, 8))).astype(np.float16)  # noqa: E731
    out = evaluate_incontext(onehot(train_cls), counts, onehot(val_cls), val_masks, grid, classes, k=5)
    assert out["miou"] == pytest.approx(100.0) and out["memory_entries"] == 20 * 16
    noise = lambda c: rng.normal(size=(*c.shape, 8)).astype(np.float16)  # noqa: E731
    out = evaluate_incontext(noise(train_cls), counts, noise(val_cls), val_masks, grid, classes, k=5)
    assert out["miou"] < 60
