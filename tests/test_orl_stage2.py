"""ORL stage 2: box filter, kNN without self, pair top-k, seeded selective search, and the sharded steps end to end."""

import json

import numpy as np
import pytest
import torch
import yaml

from cribo.cli import main
from cribo.method.correspondence import load_correspondence
from cribo.method.discovery import knn_excluding_self, shard_range, top_pairs
from cribo.method.proposals import BoxFilter, filter_boxes, selective_search

from conftest import write_voc


def test_box_filter_hand_worked():
    boxes = [[0, 0, 10, 50],     # 10 px wide: too small
             [0, 0, 100, 400],   # aspect 4 > 3
             [0, 0, 100, 100],   # kept (first valid)
             [10, 0, 100, 100],  # IoU with the kept box 9000 / 11000 = 0.82 > 0.5: dropped
             [50, 0, 100, 100],  # IoU 5000 / 15000 = 0.33: kept
             [0, 0, 300, 100],   # aspect exactly 3: allowed; IoU with [0,0,100,100] = 1/3, with [50,..] = 1/3
             [200, 200, 96, 96]]  # kept, but top_n = 3 stops before it
    kept = filter_boxes(np.array(boxes), BoxFilter(min_size=96, max_aspect_ratio=3, max_iou=0.5, top_n=3))
    assert kept.tolist() == [[0, 0, 100, 100], [50, 0, 100, 100], [0, 0, 300, 100]]
    assert kept.dtype == np.int32


def test_box_filter_keeps_the_first_raw_box_when_nothing_survives():
    kept = filter_boxes(np.array([[3, 4, 5, 6], [0, 0, 2, 2]]), BoxFilter(min_size=96))
    assert kept.tolist() == [[3, 4, 5, 6]]
    with pytest.raises(ValueError, match="no proposal"):
        filter_boxes(np.zeros((0, 4)))


def test_knn_masks_self_even_against_a_duplicate():
    e = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]), dim=1)
    knn = knn_excluding_self(e, k=2, chunk=3)  # a chunk boundary inside the matrix
    # row 0: row 1 (cos 1), then row 2 (cos 0.6); row 2: rows 3 (0.8) then 0/1 (0.6, tie)
    # row 3: row 2 (0.8), then row 0 or 1 (cos 0, a tie)
    assert knn[0].tolist() == [1, 2] and knn[1].tolist() == [0, 2]
    assert knn[2, 0].item() == 3 and knn[2, 1].item() in (0, 1)
    assert knn[3, 0].item() == 2 and knn[3, 1].item() in (0, 1)
    assert not (knn == torch.arange(4)[:, None]).any()
    with pytest.raises(ValueError, match="at least"):
        knn_excluding_self(e, k=4)


def test_top_pairs_are_the_largest_entries_of_the_similarity_matrix():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    n = torch.tensor([[0.0, 1.0], [0.8, 0.6]])
    # similarities: [[0, .8], [1, .6], [.8, .96]] -> best (1,0)=1.0, then (2,1)=0.96, then 0.8 twice
    pairs, scores = top_pairs(q, n, ratio=0.7)  # int(0.7 * 3) = 2 pairs
    assert pairs.tolist() == [[1, 0], [2, 1]] and scores.tolist() == pytest.approx([1.0, 0.96])
    pairs, _ = top_pairs(q, n, ratio=0.1)  # int(0.3) = 0 -> at least one
    assert pairs.tolist() == [[1, 0]]


def test_shards_cover_the_images_once():
    assert [shard_range(10, s, 3) for s in range(3)] == [(0, 3), (3, 6), (6, 10)]
    with pytest.raises(ValueError):
        shard_range(10, 3, 3)


def test_selective_search_order_is_seeded_and_its_set_is_not():
    image = (np.random.default_rng(0).random((48, 64, 3)) * 255).astype(np.uint8)
    a, b, c = selective_search(image, 5), selective_search(image, 5), selective_search(image, 6)
    assert np.array_equal(a, b)
    assert sorted(map(tuple, a)) == sorted(map(tuple, c))
    assert a.shape[1] == 4 and (a[:, 2] > 0).all()


def _stage1(tmp_path):
    root = write_voc(tmp_path / "voc", {"train": [f"t{i}" for i in range(6)]}, size=48)
    cfg = {"method": "byol", "seed": 0, "data": {"dataset": "voc", "root": str(root), "split": "train"},
           "model": {"arch": "vit_tiny", "patch_size": 8, "img_size": 32, "depth": 1, "embed_dim": 32, "num_heads": 2},
           "byol": {"projector_hidden_dim": 32, "out_dim": 16, "predictor_hidden_dim": 32},
           "optim": {"epochs": 1, "batch_size": 3, "warmup_epochs": 0, "optimizer": "sgd", "lr": 0.1},
           "train": {"device": "cpu", "num_workers": 0, "progress": False, "threads": 1}}
    path = tmp_path / "byol.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", "--config", str(path), "--output-dir", str(tmp_path / "byol")]) == 0
    return cfg, tmp_path / "byol" / "checkpoint.pth"


@pytest.mark.slow  # a tiny BYOL run, the five stage-2 steps and a tiny ORL run: about 12 s
def test_stage2_steps_end_to_end_then_stage3(tmp_path, capsys):
    cfg, ckpt = _stage1(tmp_path)
    s2 = tmp_path / "stage2"
    assert main(["orl", "knn", "--checkpoint", str(ckpt), "--k", "2", "--out", str(s2 / "knn.npz")]) == 0
    props, rois, pairs = ([str(s2 / f"{kind}-{s}.{ext}") for s in range(2)]
                          for kind, ext in (("proposals", "npz"), ("rois", "npy"), ("pairs", "npz")))
    for s in range(2):
        assert main(["orl", "proposals", "--knn", str(s2 / "knn.npz"), "--shard", str(s), "--num-shards", "2",
                     "--min-size", "8", "--top-n", "5", "--out", props[s]]) == 0
        assert main(["orl", "roi-embed", "--checkpoint", str(ckpt), "--knn", str(s2 / "knn.npz"),
                     "--proposals", props[s], "--out", rois[s]]) == 0
    for s in range(2):
        assert main(["orl", "pairs", "--knn", str(s2 / "knn.npz"), "--proposals", *props, "--rois", *rois,
                     "--shard", str(s), "--num-shards", "2", "--ratio", "0.5", "--out", pairs[s]]) == 0
    assert main(["orl", "merge", "--knn", str(s2 / "knn.npz"), "--proposals", *props, "--pairs", *pairs,
                 "--settings", json.dumps({"min_size": 8}), "--out", str(s2 / "corr.npz"),
                 "--summary", str(s2 / "summary.json"), "--figure", str(s2 / "pairs.png")]) == 0
    corr = load_correspondence(s2 / "corr.npz")
    assert corr.num_images == 6 and corr.k == 2 and corr.settings == {"min_size": 8}
    counts = np.diff(corr.box_offsets)
    assert counts.min() >= 1 and counts.max() <= 5
    for i in range(6):  # boxes inside the 48 px images, pairwise IoU <= 0.5 unless a fallback box
        b = corr.image_boxes(i)
        assert (b[:, 0] >= 0).all() and (b[:, 0] + b[:, 2] <= 48).all() and (b[:, 1] + b[:, 3] <= 48).all()
        for slot in range(2):  # max(1, int(0.5 * B_i)) pairs per neighbour
            assert len(corr.neighbour_pairs(i, slot)) == max(1, int(0.5 * counts[i]))
    summary = json.loads((s2 / "summary.json").read_text())
    assert summary["rois_per_image"]["total"] == len(corr.boxes) and summary["images"] == 6
    assert sum(summary["pair_similarity_histogram"]["counts"]) == len(corr.pairs)
    assert (s2 / "pairs.png").stat().st_size > 0
    # RoI embeddings: one forward per RoI, against (1 + k) x RoIs per query when re-encoding per pair
    cached = sum(np.load(r).shape[0] for r in rois)
    per_pair = sum(counts[i] + counts[corr.knn[i]].sum() for i in range(6))
    assert cached == len(corr.boxes) and per_pair == cached * 3
    # stage 3 on it
    orl = {**cfg, "method": "orl", "orl": {"correspondence": str(s2 / "corr.npz"), "roi_size": 16}}
    (tmp_path / "orl.yaml").write_text(yaml.safe_dump(orl))
    assert main(["train", "--config", str(tmp_path / "orl.yaml"), "--output-dir", str(tmp_path / "orl")]) == 0


def test_stage2_refuses_a_changed_image_list(tmp_path, capsys):
    cfg, ckpt = _stage1(tmp_path)
    (tmp_path / "voc" / "ImageSets" / "Segmentation" / "train.txt").write_text("t0\nt1\nt2\n")
    assert main(["orl", "knn", "--checkpoint", str(ckpt), "--k", "2", "--out", str(tmp_path / "knn.npz")]) != 0
    assert "image list changed between stage 1 and stage 2" in capsys.readouterr().err
    assert not (tmp_path / "knn.npz").exists()
