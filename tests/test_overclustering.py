import numpy as np
import pytest

from cribo.eval.overclustering import cluster_class_counts, match_clusters, matched_confusion, overcluster


def test_greedy_many_to_one_by_hand():
    # 2 classes, 3 clusters: cluster 0 mostly class 0, clusters 1 and 2 mostly class 1
    counts = np.array([[8, 1, 0],
                       [2, 5, 4]])
    mapping = match_clusters(counts)
    assert mapping.tolist() == [0, 1, 1]
    conf = matched_confusion(counts, mapping)
    assert conf.tolist() == [[8, 1], [2, 9]]  # rows: ground truth; clusters 1 and 2 merged into class 1


def test_hungarian_one_to_one_when_k_equals_classes():
    counts = np.array([[0, 9, 1],
                       [7, 0, 0],
                       [1, 2, 6]])
    assert match_clusters(counts).tolist() == [1, 0, 2]
    with pytest.raises(ValueError, match="K >= the number of classes"):
        match_clusters(np.ones((3, 2), dtype=int))


def test_cluster_class_counts_ignores_void_and_names_bad_labels():
    maps = np.array([[[0, 1], [1, 1]]])
    masks = np.array([[[0, 255], [1, 1]]])
    assert cluster_class_counts(maps, masks, 2, 2).tolist() == [[1, 0], [0, 2]]
    with pytest.raises(ValueError, match="mask label 7"):
        cluster_class_counts(maps, np.array([[[7, 0], [0, 0]]]), 2, 2)


def test_pixel_accuracy_counts_pixels_of_the_mapped_clusters():
    # 2 images of 2 x 1 patches, 2 classes; every patch feature is the same point, so every K-means
    # restart puts all patches in one cluster; Hungarian matching (K = 2 classes) maps it to one class.
    # Masks: class 0 covers 3 of the 4 patches' pixels, class 1 one: the single cluster goes to class 0,
    # pixel accuracy = 3/4, IoU(0) = 3/4, IoU(1) = 0 -> mIoU 37.5
    features = np.zeros((2, 2, 3))
    masks = np.array([[[0, 0], [0, 0]], [[0, 0], [1, 1]]], dtype=np.uint8)
    result = overcluster(features, masks, (2, 1), 2, 2, seeds=(0,), pca_dim=2, restarts=1)
    assert result["pixel_accuracy"] == pytest.approx(75.0)
    assert result["miou"] == pytest.approx(37.5)


def test_well_separated_features_are_recovered_perfectly():
    # 3 classes laid out in image halves/quarters; features = class centre + small noise, every
    # dimension informative (standardisation would blow pure-noise dimensions up to unit variance)
    rng = np.random.default_rng(0)
    v, h, w, size = 12, 4, 4, 8
    classes = np.zeros((v, h, w), dtype=np.int64)
    classes[:, :, 2:] = 1
    classes[::2, 2:, :] = 2
    centres = np.array([[10.0, 0, 0, 5], [0, 10, 0, -5], [0, 0, 10, 0]])
    features = centres[classes.reshape(v, h * w)] + rng.normal(0, 0.1, (v, h * w, 4))
    masks = np.repeat(np.repeat(classes, size // h, axis=1), size // w, axis=2).astype(np.uint8)
    for k in (3, 6):  # K = classes (Hungarian) and K > classes (many-to-one)
        result = overcluster(features, masks, (h, w), 3, k, seeds=(0, 1), pca_dim=3, restarts=2)
        assert result["miou"] == pytest.approx(100.0) and result["miou_std"] == pytest.approx(0.0)
        assert result["pixel_accuracy"] == pytest.approx(100.0)
        assert result["matching"] == ("hungarian" if k == 3 else "many-to-one")
    with pytest.raises(ValueError, match="cannot form"):
        overcluster(features[:1], masks[:1], (h, w), 3, 50, seeds=(0,))


def test_cli_overcluster_row(tmp_path, tiny_voc):
    import json

    from cribo.cli import main
    from cribo.config import validate_run_config
    from cribo.models.backbones import build_vit
    from cribo.train.checkpoint import save_checkpoint

    cfg = validate_run_config({"method": "random", "model": {"arch": "vit_tiny", "patch_size": 8, "img_size": 32, "depth": 1}})
    vit = build_vit(cfg["model"], drop_path_rate=0.0)
    ckpt = tmp_path / "ckpt.pth"
    save_checkpoint({"method": "random", "config": cfg, "teacher": {f"backbone.{k}": v for k, v in vit.state_dict().items()}}, ckpt)
    store = tmp_path / "val"
    assert main(["extract", "--checkpoint", str(ckpt), "--dataset", "voc", "--data-root", str(tiny_voc), "--split", "val",
                 "--out", str(store), "--no-progress"]) == 0
    out = tmp_path / "row.json"
    assert main(["eval", "overcluster", "--checkpoint", str(ckpt), "--val-features", str(store), "--clusters", "classes",
                 "--seeds", "2", "--restarts", "1", "--pca-dim", "8", "--out", str(out)]) == 0
    row = json.loads(out.read_text())
    assert row["protocol"] == "overcluster" and row["clusters"] == 21 and row["matching"] == "hungarian"
    assert len(row["per_seed_miou"]) == 2 and 0 <= row["miou"] <= 100 and len(row["checkpoint_sha256"]) == 64
    assert main(["eval", "overcluster", "--checkpoint", str(ckpt), "--val-features", str(store), "--clusters", "5",
                 "--out", str(tmp_path / "bad.json")]) == 2  # fewer clusters than the 21 classes
    assert not (tmp_path / "bad.json").exists()
