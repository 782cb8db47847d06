import numpy as np
import pytest

from cribo.eval.search import ExactFP16Search, IVFPQSearch, make_searcher


def _unit(rows, dim, seed):
    x = np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_sliced_exact_search_equals_brute_force_over_the_fp16_memory():
    memory = _unit(1000, 16, 0).astype(np.float16)
    queries = _unit(50, 16, 1)
    sims, idx = ExactFP16Search(memory, slice_rows=128).search(queries, 7)  # 8 slices, merged
    keys = memory.astype(np.float32)
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)  # the slices are re-normalised after float16 rounding
    brute = queries @ keys.T
    expected = np.argsort(-brute, axis=1, kind="stable")[:, :7]
    assert np.array_equal(idx, expected)
    assert np.allclose(sims, np.take_along_axis(brute, expected, axis=1), atol=1e-5)


def test_k_larger_than_a_slice_still_returns_k_neighbours():
    memory = _unit(10, 4, 2).astype(np.float16)
    sims, idx = ExactFP16Search(memory, slice_rows=3).search(_unit(2, 4, 3), 6)
    assert idx.shape == (2, 6) and len(set(idx[0])) == 6 and np.all(np.diff(sims, axis=1) <= 1e-7)


def test_ivfpq_finds_stored_vectors_most_of_the_time():
    memory = _unit(20_000, 32, 4)
    index = IVFPQSearch(memory, nlist=64, nprobe=16, sub_quantizers=16)
    _, idx = index.search(memory[:500], 1)
    assert (idx[:, 0] == np.arange(500)).mean() > 0.9  # approximate, not exact
    with pytest.raises(ValueError, match="unknown index kind"):
        make_searcher(memory, "hnsw")
