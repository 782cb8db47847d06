import itertools
from fractions import Fraction

import numpy as np
import pytest

from cribo.eval.metrics import ConfusionMeter, confusion_matrix, miou_from_confusion

# A 3-class 3x4 example with two ignored pixels, used by several tests.
TARGET = np.array([[0, 0, 1, 1],
                   [2, 2, 255, 1],
                   [0, 255, 2, 1]])
PRED = np.array([[0, 1, 1, 1],
                 [2, 0, 0, 1],
                 [0, 2, 2, 2]])


def test_confusion_matrix_counted_by_hand_drops_ignored_pixels():
    conf = confusion_matrix(PRED, TARGET, 3)
    # (truth, pred) pairs, reading row by row and skipping the two 255 pixels:
    # (0,0) (0,1) (1,1) (1,1) | (2,2) (2,0) (1,1) | (0,0) (2,2) (1,2)
    # truth 0: pred 0 twice, pred 1 once; truth 1: pred 1 three times, pred 2 once;
    # truth 2: pred 2 twice, pred 0 once
    assert conf.tolist() == [[2, 1, 0],
                             [0, 3, 1],
                             [1, 0, 2]]
    assert conf.dtype == np.int64
    # with nothing ignored, the 255s are out of range for 3 classes
    with pytest.raises(ValueError, match="label 255"):
        confusion_matrix(PRED, TARGET, 3, ignore_index=None)
    assert confusion_matrix(PRED[:1], TARGET[:1], 3, ignore_index=None).sum() == 4


def test_iou_worked_out_as_fractions():
    out = miou_from_confusion(confusion_matrix(PRED, TARGET, 3))
    # class 0: TP 2, FP 1 (the truth-2 pixel predicted 0), FN 1 -> 2/4
    # class 1: TP 3, FP 1, FN 1 -> 3/5
    # class 2: TP 2, FP 1, FN 1 -> 2/4
    ious = [Fraction(2, 4), Fraction(3, 5), Fraction(2, 4)]
    assert out["per_class_iou"] == pytest.approx([float(v * 100) for v in ious])
    assert out["miou"] == pytest.approx(float(sum(ious) / 3 * 100))  # 53.33
    assert out["pixel_accuracy"] == pytest.approx(70.0)  # 7 of 10 labelled pixels
    assert out["num_valid_classes"] == 3


def test_hungarian_matching_finds_the_permutation():
    target = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    pred = np.array([0, 0, 0, 2, 2, 1, 1, 1, 1])  # class 0 right, classes 1 and 2 swapped
    conf = confusion_matrix(pred, target, 3)
    identity = miou_from_confusion(conf, "identity")
    # identity: class 0 IoU 3/3; class 1: TP 0 -> 0; class 2: TP 0 -> 0
    assert identity["per_class_iou"] == pytest.approx([100.0, 0.0, 0.0])
    assert identity["miou"] == pytest.approx(100 / 3)
    assert identity["pixel_accuracy"] == pytest.approx(100 * 3 / 9)
    hungarian = miou_from_confusion(conf, "hungarian")
    assert hungarian["miou"] == pytest.approx(100.0)
    assert hungarian["pixel_accuracy"] == pytest.approx(100.0)
    with pytest.raises(ValueError, match="matching"):
        miou_from_confusion(conf, "greedy")


def test_hungarian_equals_the_best_permutation_found_by_brute_force():
    conf = np.array([[5, 1, 0, 2],
                     [0, 1, 4, 0],
                     [0, 3, 2, 1],
                     [1, 0, 1, 6]])
    rows, cols = conf.sum(1), conf.sum(0)

    def mean_iou(perm):  # class g takes predicted label perm[g]
        return np.mean([conf[g, p] / (rows[g] + cols[p] - conf[g, p]) for g, p in enumerate(perm)]) * 100

    best = max(itertools.permutations(range(4)), key=mean_iou)
    assert best != (0, 1, 2, 3)  # the example needs a non-trivial matching
    assert miou_from_confusion(conf, "hungarian")["miou"] == pytest.approx(mean_iou(best))
    assert miou_from_confusion(conf, "identity")["miou"] == pytest.approx(mean_iou((0, 1, 2, 3)))
    assert mean_iou(best) > mean_iou((0, 1, 2, 3))


def test_class_absent_from_truth_and_prediction_is_none_and_left_out_of_the_mean():
    conf = np.array([[3, 0, 0],
                     [0, 0, 0],
                     [1, 0, 1]])
    out = miou_from_confusion(conf)
    # class 0: TP 3, FP 1 -> 3/4; class 1: union 0 -> None; class 2: TP 1, FN 1 -> 1/2
    assert out["per_class_iou"][0] == pytest.approx(75.0)
    assert out["per_class_iou"][1] is None
    assert out["per_class_iou"][2] == pytest.approx(50.0)
    assert out["miou"] == pytest.approx((75 + 50) / 2)
    assert out["num_valid_classes"] == 2


def test_predicted_class_absent_from_truth_counts_as_zero():
    conf = np.array([[1, 1],
                     [0, 0]])  # class 1 never in the truth but predicted once
    out = miou_from_confusion(conf)
    assert out["per_class_iou"] == pytest.approx([50.0, 0.0])
    assert out["miou"] == pytest.approx(25.0)


def test_ignore_label_inside_the_class_range_is_excluded_from_the_mean():
    # ADE20K style: label 0 ("other") is ignored; a pixel predicted 0 is a miss for its true class
    meter = ConfusionMeter(3, ignore_index=0)
    meter.update(np.array([2, 0, 1, 2]), np.array([0, 1, 1, 2]))
    out = meter.compute()
    # class 1: TP 1, FN 1 -> 1/2; class 2: TP 1 -> 1; class 0: excluded
    assert out["per_class_iou"] == [None, pytest.approx(50.0), pytest.approx(100.0)]
    assert out["miou"] == pytest.approx(75.0)
    assert out["num_valid_classes"] == 2


def test_bad_labels_are_refused_with_the_value():
    with pytest.raises(ValueError, match="label 7"):
        confusion_matrix(np.array([0]), np.array([7]), 3)
    with pytest.raises(ValueError, match="label -1"):
        confusion_matrix(np.array([0]), np.array([-1]), 3)
    with pytest.raises(ValueError, match="predicted"):
        confusion_matrix(np.array([5]), np.array([0]), 3)
    with pytest.raises(ValueError, match="predicted"):
        confusion_matrix(np.array([-1]), np.array([0]), 3)
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(np.zeros((2, 2), int), np.zeros(4, int), 3)


def test_meter_accumulates_batches_like_one_matrix():
    meter = ConfusionMeter(3, ignore_index=255)
    meter.update(PRED[:2], TARGET[:2])
    meter.update(PRED[2:], TARGET[2:])
    assert meter.matrix.tolist() == [[2, 1, 0], [0, 3, 1], [1, 0, 2]]
    assert meter.compute()["miou"] == pytest.approx(float(Fraction(16, 30) * 100))
    meter.reset()
    assert meter.matrix.sum() == 0 and meter.compute()["miou"] == 0.0
