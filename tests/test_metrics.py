import numpy as np
import pytest

from cribo.eval.metrics import ConfusionMeter, confusion_matrix, miou_from_confusion


def test_confusion_matrix_counts_by_hand_and_drops_ignored_pixels():
    target = np.array([[0, 0, 1], [1, 2, 255]])
    pred = np.array([[0, 1, 1], [1, 2, 0]])
    conf = confusion_matrix(pred, target, 3)
    # rows = truth: class 0 -> predicted 0 once, 1 once; class 1 -> 1 twice; class 2 -> 2 once; 255 dropped
    assert conf.tolist() == [[1, 1, 0], [0, 2, 0], [0, 0, 1]]


def test_iou_per_class_and_mean_by_hand():
    conf = np.array([[1, 1, 0], [0, 2, 0], [0, 0, 1]])
    out = miou_from_confusion(conf)
    # class 0: TP 1, FN 1, FP 0 -> 1/2; class 1: TP 2, FP 1 -> 2/3; class 2: 1/1
    assert out["per_class_iou"] == pytest.approx([50.0, 200 / 3, 100.0])
    assert out["miou"] == pytest.approx((50 + 200 / 3 + 100) / 3)
    assert out["pixel_accuracy"] == pytest.approx(4 / 5 * 100)


def test_class_absent_from_truth_and_prediction_is_left_out_of_the_mean():
    conf = np.array([[3, 0, 0], [0, 0, 0], [1, 0, 1]])
    out = miou_from_confusion(conf)
    # class 0: TP 3, FP 1 -> 3/4; class 1 absent -> None; class 2: TP 1, FN 1 -> 1/2
    assert out["per_class_iou"][1] is None
    assert out["miou"] == pytest.approx((75 + 50) / 2)
    assert out["num_valid_classes"] == 2


def test_predicted_but_absent_class_counts_as_zero():
    conf = np.array([[1, 1], [0, 0]])  # class 1 never in the truth but predicted once
    out = miou_from_confusion(conf)
    assert out["per_class_iou"] == pytest.approx([50.0, 0.0])
    assert out["miou"] == pytest.approx(25.0)


def test_hungarian_matching_undoes_a_label_permutation():
    target = np.array([0, 0, 1, 1, 1, 2])
    pred = np.array([2, 2, 0, 0, 0, 1])  # 0->2, 1->0, 2->1: a perfect but permuted prediction
    conf = confusion_matrix(pred, target, 3)
    assert miou_from_confusion(conf, "identity")["miou"] == 0.0
    assert miou_from_confusion(conf, "hungarian")["miou"] == pytest.approx(100.0)
    with pytest.raises(ValueError, match="matching"):
        miou_from_confusion(conf, "greedy")


def test_bad_labels_are_refused_with_the_value():
    with pytest.raises(ValueError, match="label 7"):
        confusion_matrix(np.array([0]), np.array([7]), 3)
    with pytest.raises(ValueError, match="predicted"):
        confusion_matrix(np.array([5]), np.array([0]), 3)


def test_meter_accumulates_batches():
    meter = ConfusionMeter(2, ignore_index=255)
    meter.update(np.array([0, 1]), np.array([0, 1]))
    meter.update(np.array([1, 1]), np.array([0, 255]))
    assert meter.matrix.tolist() == [[1, 1], [0, 1]]
