"""The VOC07 SVM classification benchmark and its low-shot variant (ORL / OpenSelfSup protocol).

Features (``../shared/research/orl.md`` §4): the image squashed to ``S x S`` (224) and normalised
with the ImageNet statistics; a ResNet's res5 map (7 x 7 x 2048 at 224) average-pooled with kernel
6, stride 1, to 2 x 2 x 2048 = 8192-d (flattened channel-major, as OpenSelfSup's MultiPooling);
a ViT's [CLS] token concatenated with its mean patch token; every vector L2-normalised. The
kernel is ``h - 1`` for an ``h x h`` map, so other resolutions also give a 2 x 2 grid.

Classifier: one linear SVM per class (scikit-learn ``LinearSVC``, liblinear: L2 penalty, squared
hinge, dual, tol 1e-4, at most 2000 iterations, a fixed shuffling seed, class weights {+1: 2,
-1: 1}); difficult labels (0) count as negatives in training and are left out at test. The cost of
each class is picked from :data:`COST_GRID` by the mean 3-fold cross-validated average precision on
trainval (scikit-learn's ``average_precision``, unshuffled stratified folds). The test metric is VOC
AP with all-point interpolation (:func:`voc_average_precision`); mAP is the mean over classes, in
percent.

Low-shot: for each class, ``k`` positives and ``19 k`` negatives drawn from trainval (difficult
images never drawn), 5 samples. The official cost selection picks, per ``k``, the single cost with
the best mean *test* mAP over the samples (selection on test, kept for comparability and flagged
in the row); our ``cv`` variant picks each class's cost by cross-validation on the sample itself
(``min(3, k)`` folds; with ``k = 1`` no fold has a positive to score, so the class takes the cost
cross-validation chose for it on the full trainval).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

COST_GRID = (1.0, 10.0, 100.0) + tuple(2.0 ** -e for e in range(4, 20))  # 19 costs (svm_helper.parse_cost_list)
LOWSHOT_K = (1, 2, 4, 8, 16, 32, 64, 96)
LOWSHOT_NEGATIVES_PER_POSITIVE = 19
LOWSHOT_SAMPLES = 5


# ---------------------------------------------------------------- features


@torch.no_grad()
def global_descriptor(backbone, images: torch.Tensor) -> torch.Tensor:
    """``B x 3 x S x S`` -> ``B x F`` un-normalised image descriptors (see the module docstring).

    ViT: ``[CLS] ++ mean(patch tokens)`` (``F = 2 D``). Any other backbone (ResNet res5, pixel floor):
    its ``h x w`` map average-pooled with kernel ``(h - 1, w - 1)``, stride 1, to 2 x 2 (``F = 4 D``).
    """
    vit = getattr(backbone, "vit", None)
    if vit is not None:
        tokens = vit.forward_features(images)  # B x (prefix + N) x D
        return torch.cat([tokens[:, 0], tokens[:, vit.num_prefix_tokens:].mean(1)], dim=-1)
    fmap = backbone(images).permute(0, 3, 1, 2)  # B x C x h x w
    h, w = fmap.shape[-2:]
    if h < 2 or w < 2:
        raise ValueError(f"the feature map is {h} x {w}: the SVM's 2 x 2 pooling needs at least 2 x 2; "
                         f"raise --image-size to at least {2 * backbone.patch_size}")
    return F.avg_pool2d(fmap, kernel_size=(h - 1, w - 1), stride=1).flatten(1)


def l2_normalise(features: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return features / np.maximum(norms, 1e-12)


# ---------------------------------------------------------------- metric


def voc_average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """VOC AP (all-point interpolation, the devkit since 2010) of one class, in [0, 1].

    ``scores``: ``I`` classifier outputs; ``labels``: ``I`` in {1, 0, -1}, 0 (difficult) ignored.
    Precision is made monotone from the right and integrated over every recall step.
    """
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels)
    keep = labels != 0
    scores, positive = scores[keep], labels[keep] > 0
    num_positive = int(positive.sum())
    if num_positive == 0:
        raise ValueError("no positive example: AP is undefined")
    hits = positive[np.argsort(-scores, kind="stable")]
    tp, fp = np.cumsum(hits), np.cumsum(~hits)
    recall = np.concatenate([[0.0], tp / num_positive, [1.0]])
    precision = np.concatenate([[0.0], tp / (tp + fp), [0.0]])
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    steps = np.flatnonzero(recall[1:] != recall[:-1])
    return float(np.sum((recall[steps + 1] - recall[steps]) * precision[steps + 1]))


# ---------------------------------------------------------------- one SVM


def make_svm(cost: float):
    from sklearn.svm import LinearSVC

    # a fixed random_state: liblinear shuffles the samples with a seed that LinearSVC otherwise draws from
    # numpy's global RNG, so the same features would give another mAP from one run to the next
    return LinearSVC(C=cost, class_weight={1: 2, -1: 1}, penalty="l2", loss="squared_hinge", dual=True,
                     tol=1e-4, max_iter=2000, random_state=0)


def training_targets(labels: np.ndarray) -> np.ndarray:
    """{1, 0, -1} -> {1, -1}: difficult images are negatives in training (as the official code)."""
    return np.where(np.asarray(labels) == 1, 1, -1)


def cross_validated_ap(features: np.ndarray, targets: np.ndarray, cost: float, folds: int = 3) -> float:
    """Mean average precision over ``folds`` unshuffled stratified folds of one cost."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # max_iter 2000 is the protocol's cap
        scores = cross_val_score(make_svm(cost), features, targets, cv=StratifiedKFold(folds),
                                 scoring="average_precision")
    return float(np.mean(scores))


def select_cost(features: np.ndarray, targets: np.ndarray, costs=COST_GRID, folds: int = 3) -> tuple[float, list[float]]:
    """The cost of ``costs`` with the best cross-validated AP (the first in grid order on ties), and every CV AP."""
    aps = [cross_validated_ap(features, targets, c, folds) for c in costs]
    return float(costs[int(np.argmax(aps))]), aps


def fit_and_score(train_x: np.ndarray, train_targets: np.ndarray, test_x: np.ndarray, test_labels: np.ndarray,
                  cost: float) -> float:
    """Train one SVM at ``cost``; its VOC AP on the test labels."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        svm = make_svm(cost).fit(train_x, train_targets)
    return voc_average_precision(svm.decision_function(test_x), test_labels)


# ---------------------------------------------------------------- the benchmarks


def check_features(train_x: np.ndarray, test_x: np.ndarray, train_labels: np.ndarray, test_labels: np.ndarray) -> None:
    if train_x.ndim != 2 or test_x.ndim != 2 or train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"SVM features of mixed dimension: train {train_x.shape}, test {test_x.shape}; both must "
                         "come from the same backbone and settings (delete the feature folders and extract again)")
    if train_labels.shape != (train_x.shape[0], test_labels.shape[1]) or test_labels.shape[0] != test_x.shape[0]:
        raise ValueError(f"labels {train_labels.shape} / {test_labels.shape} do not match the features "
                         f"{train_x.shape} / {test_x.shape}")


def scorable_classes(train_labels: np.ndarray, test_labels: np.ndarray) -> list[int]:
    """Classes with a positive and a negative in both splits (the others have no AP)."""
    return [c for c in range(train_labels.shape[1])
            if (train_labels[:, c] == 1).any() and (train_labels[:, c] != 1).any()
            and (test_labels[:, c] == 1).any() and (test_labels[:, c] == -1).any()]


def _parallel(tasks, workers: int):
    from joblib import Parallel, delayed

    if workers <= 1:
        return [fn(*args) for fn, args in tasks]
    return Parallel(n_jobs=workers)(delayed(fn)(*args) for fn, args in tasks)


def _full_one(train_x, train_col, test_x, test_col, costs, folds):
    targets = training_targets(train_col)
    cost, cv_aps = select_cost(train_x, targets, costs, folds)
    return cost, cv_aps, fit_and_score(train_x, targets, test_x, test_col, cost)


def svm_benchmark(train_x: np.ndarray, train_labels: np.ndarray, test_x: np.ndarray, test_labels: np.ndarray,
                  costs=COST_GRID, folds: int = 3, workers: int = 1) -> dict:
    """The full VOC07 SVM benchmark: per class a cost by ``folds``-fold CV AP on train, then test AP.

    ``*_x``: ``I x F`` L2-normalised features; ``*_labels``: ``I x C`` in {1, 0, -1}.
    Returns ``map`` (percent, mean over scorable classes), per-class ``ap`` and ``cost``.
    """
    check_features(train_x, test_x, train_labels, test_labels)
    classes = scorable_classes(train_labels, test_labels)
    if not classes:
        raise ValueError("no class has both positives and negatives in both splits: nothing to score")
    results = _parallel([(_full_one, (train_x, train_labels[:, c], test_x, test_labels[:, c], costs, folds))
                         for c in classes], workers)
    ap = [float("nan")] * train_labels.shape[1]
    chosen = [None] * train_labels.shape[1]
    for c, (cost, _, class_ap) in zip(classes, results):
        ap[c], chosen[c] = 100 * class_ap, cost
    return {"map": float(np.nanmean(ap)), "ap_per_class": ap, "cost_per_class": chosen,
            "classes_scored": len(classes), "costs": list(costs), "cv_folds": folds}


def lowshot_sample(labels: np.ndarray, k: int, seed: int, sample: int, class_index: int) -> np.ndarray:
    """Sorted trainval indices of one low-shot training set: ``k`` positives and ``19 k`` negatives of
    one class (fewer negatives if the split has fewer), drawn without replacement under
    ``(seed, k, sample, class)``; difficult images are never drawn."""
    positives, negatives = np.flatnonzero(labels == 1), np.flatnonzero(labels == -1)
    if len(positives) < k:
        raise ValueError(f"class {class_index} has {len(positives)} positive training images, fewer than k = {k}; "
                         "drop that k (--k) or use more images")
    rng = np.random.default_rng([seed, k, sample, class_index])
    chosen = np.concatenate([rng.choice(positives, k, replace=False),
                             rng.choice(negatives, min(len(negatives), LOWSHOT_NEGATIVES_PER_POSITIVE * k),
                                        replace=False)])
    return np.sort(chosen)


def _lowshot_test_one(train_x, col, test_x, test_col, k, seed, sample, c, costs):
    """Test AP of every cost for one (sample, class)."""
    idx = lowshot_sample(col, k, seed, sample, c)
    targets = training_targets(col[idx])
    return [fit_and_score(train_x[idx], targets, test_x, test_col, cost) for cost in costs]


def _lowshot_cv_one(train_x, col, test_x, test_col, k, seed, sample, c, costs, fallback_cost):
    idx = lowshot_sample(col, k, seed, sample, c)
    targets = training_targets(col[idx])
    cost = select_cost(train_x[idx], targets, costs, min(3, k))[0] if k >= 2 else fallback_cost
    return cost, fit_and_score(train_x[idx], targets, test_x, test_col, cost)


def lowshot_benchmark(train_x: np.ndarray, train_labels: np.ndarray, test_x: np.ndarray, test_labels: np.ndarray,
                      k: int, selection: str = "test", samples: int = LOWSHOT_SAMPLES, seed: int = 0,
                      costs=COST_GRID, workers: int = 1, fallback_costs: list | None = None) -> dict:
    """Low-shot SVMs with ``k`` positives per class: ``map`` (percent, mean over samples), ``map_std``
    (sample standard deviation over samples), per-sample mAPs and the selected cost(s).

    ``selection``: ``test`` (official: one cost for all classes, the best mean test mAP) or ``cv``
    (each class and sample by cross-validation on its own training set). ``fallback_costs``
    (per class, for ``k = 1`` under ``cv``) default to a CV selection on the full trainval.
    """
    if selection not in ("test", "cv"):
        raise ValueError(f"cost selection {selection!r}: choose 'test' (official) or 'cv'")
    check_features(train_x, test_x, train_labels, test_labels)
    classes = scorable_classes(train_labels, test_labels)
    if not classes:
        raise ValueError("no class has both positives and negatives in both splits: nothing to score")
    pairs = [(s, c) for s in range(samples) for c in classes]
    if selection == "test":
        aps = _parallel([(_lowshot_test_one, (train_x, train_labels[:, c], test_x, test_labels[:, c], k, seed, s,
                                              c, costs)) for s, c in pairs], workers)
        grid = np.array(aps).reshape(samples, len(classes), len(costs))  # sample x class x cost
        per_sample_by_cost = grid.mean(axis=1)  # sample x cost: mAP of each sample at each cost
        best = int(np.argmax(per_sample_by_cost.mean(axis=0)))
        per_sample = 100 * per_sample_by_cost[:, best]
        chosen = {"cost": float(costs[best])}
    else:
        if k < 2 and fallback_costs is None:
            fallback_costs = [None] * train_labels.shape[1]
            for c in classes:
                fallback_costs[c] = select_cost(train_x, training_targets(train_labels[:, c]), costs)[0]
        results = _parallel([(_lowshot_cv_one, (train_x, train_labels[:, c], test_x, test_labels[:, c], k, seed, s,
                                                c, costs, (fallback_costs or [None] * (c + 1))[c]))
                             for s, c in pairs], workers)
        per_sample = 100 * np.array([ap for _, ap in results]).reshape(samples, len(classes)).mean(axis=1)
        chosen = {"cost_per_sample_class": [[cost for cost, _ in results[s * len(classes):(s + 1) * len(classes)]]
                                            for s in range(samples)]}
    return {"map": float(per_sample.mean()), "map_std": float(per_sample.std(ddof=1)) if samples > 1 else 0.0,
            "map_per_sample": per_sample.tolist(), "k": k, "samples": samples, "sample_seed": seed,
            "cost_selection": selection, "selects_on_test": selection == "test", "classes_scored": len(classes),
            "costs": list(costs), **chosen}
