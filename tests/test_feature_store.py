"""Feature stores: sharded, resumable extraction; augmented memory passes; memory subsets by list."""

import numpy as np
import pytest
import torch

from cribo.data.registry import get_spec
from cribo.eval.features import extract_split, extract_to_disk, load_store
from cribo.eval.protocol import run_incontext
from cribo.eval.subsets import find_list_file, read_id_list
from cribo.models.backbones import PixelPatches

from conftest import write_voc


class CountingBackbone(PixelPatches):
    """Raw pixel patches (deterministic), counting images and optionally failing after some batches."""

    def __init__(self, fail_after_batches=None):
        super().__init__(torch.zeros(3), patch_size=8)
        self.images, self.batches, self.fail_after = 0, 0, fail_after_batches

    def forward(self, images):
        if self.fail_after is not None and self.batches == self.fail_after:
            raise RuntimeError("simulated crash")
        self.batches += 1
        self.images += images.shape[0]
        return super().forward(images)


@pytest.fixture
def voc10(tmp_path):
    return write_voc(tmp_path / "voc", {"train": [f"t{i}" for i in range(10)], "val": ["v0", "v1"]})


def test_interrupted_extraction_resumes_from_its_shards(tmp_path, voc10):
    spec = get_spec("voc", voc10)
    kwargs = dict(batch_size=2, shard_images=4, progress=False)
    reference = extract_split(CountingBackbone(), spec, voc10, "train", 32, batch_size=2, progress=False)
    out = tmp_path / "store"
    with pytest.raises(RuntimeError, match="simulated crash"):  # dies in the second shard
        extract_to_disk(CountingBackbone(fail_after_batches=3), spec, voc10, "train", 32, out, **kwargs)
    assert not out.exists() and sorted(p.name for p in (tmp_path / "store.partial").glob("shard-*")) == ["shard-00000.npz"]
    resumed = CountingBackbone()
    extract_to_disk(resumed, spec, voc10, "train", 32, out, **kwargs)
    assert resumed.images == 10 - 4  # the finished shard was not recomputed
    store = load_store(out)
    assert not (tmp_path / "store.partial").exists()
    assert np.array_equal(store.features, reference.features) and np.array_equal(store.masks, reference.masks)
    assert np.array_equal(store.label_counts, reference.label_counts)
    assert store.meta["ids"] == [f"t{i}" for i in range(10)] and store.features.dtype == np.float16


def test_changed_settings_do_not_reuse_old_shards(tmp_path, voc10):
    spec = get_spec("voc", voc10)
    with pytest.raises(RuntimeError):
        extract_to_disk(CountingBackbone(fail_after_batches=2), spec, voc10, "train", 32, tmp_path / "s",
                        batch_size=2, shard_images=4, progress=False)
    fresh = CountingBackbone()
    extract_to_disk(fresh, spec, voc10, "train", 32, tmp_path / "s", batch_size=2, shard_images=4,
                    passes=2, augment=True, progress=False)
    assert fresh.images == 20  # the plan changed (two passes): everything recomputed


def test_augmented_passes_are_seeded_and_keep_labels_consistent(tmp_path, voc10):
    spec = get_spec("voc", voc10)
    a = extract_split(CountingBackbone(), spec, voc10, "train", 32, batch_size=4, progress=False, passes=2, augment=True)
    b = extract_split(CountingBackbone(), spec, voc10, "train", 32, batch_size=3, progress=False, passes=2, augment=True,
                      num_workers=1)
    assert a.features.shape[0] == 20 and a.meta["passes"] == 2 and a.meta["num_images"] == 10
    assert np.array_equal(a.features, b.features) and np.array_equal(a.masks, b.masks)  # seeded per (pass, image)
    assert not np.array_equal(a.features[:10], a.features[10:])  # the passes differ
    # counts are the masks' pixels per patch: 64 minus the ignored ones
    ignored = (a.masks == 255).reshape(20, 4, 8, 4, 8).transpose(0, 1, 3, 2, 4).reshape(20, 16, 64).sum(-1)
    assert np.array_equal(a.label_counts.sum(-1), 64 - ignored)


def test_memory_uses_every_pass_of_the_listed_images(tmp_path, voc10):
    spec = get_spec("voc", voc10)
    train = extract_split(CountingBackbone(), spec, voc10, "train", 32, progress=False, passes=2, augment=True)
    val = extract_split(CountingBackbone(), spec, voc10, "val", 32, progress=False)
    listed = tmp_path / "list.txt"
    listed.write_text("t3.jpg\nt7\n\n")
    result = run_incontext(train, val, k=5, train_ids=read_id_list(listed))
    assert result["num_train_images"] == 2 and result["memory_passes"] == 2
    # unbounded memory: every labelled patch of 2 images x 2 passes (16 patches each, all labelled here)
    assert result["memory_entries"] == 2 * 2 * 16
    listed.write_text("t3\nnot_there\n")
    with pytest.raises(ValueError, match="not in the train feature store"):
        run_incontext(train, val, k=5, train_ids=read_id_list(listed))


def test_list_files_in_the_open_hummingbird_layout(tmp_path):
    (tmp_path / "1_div_8").mkdir()
    (tmp_path / "1_div_8" / "trainaug_seed42.txt").write_text("a\n")
    (tmp_path / "1_div_8" / "trainaug_seed400.txt").write_text("b\n")
    assert find_list_file(tmp_path, 0.125, 42).name == "trainaug_seed42.txt"  # 42 does not match 400
    with pytest.raises(ValueError, match=r"no list file for fraction 0.015625 .*seed 42.*1_div_8: trainaug_seed400.txt, trainaug_seed42.txt"):
        find_list_file(tmp_path, 1 / 64, 42)
    with pytest.raises(ValueError, match="seed 7"):
        find_list_file(tmp_path, 0.125, 7)
