"""Weighted blending: prefix proportions within the stated bound, determinism, validation."""

from __future__ import annotations

import numpy as np
import pytest

from megatron_narrow.config import DataConfig
from megatron_narrow.data.blending import BlendedDataset, blending_indices
from megatron_narrow.data.documents import InMemoryDocuments
from megatron_narrow.data.samples import BertSampleDataset
from megatron_narrow.data.tokenizer import SpecialTokens


class Numbers:
    """A stand-in dataset: item k is {"k": k, "name": name}; any k >= 0 is valid (epochs wrap)."""

    def __init__(self, name: str, length: int) -> None:
        self.name = name
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, k: int) -> dict:
        return {"k": k, "name": self.name}


def _max_prefix_gap(dataset_index: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Per dataset: max over prefixes n of |count_d(n) - n * w_d|."""
    onehot = dataset_index[:, None] == np.arange(weights.size)[None, :]
    n = np.arange(1, dataset_index.size + 1)[:, None]
    return np.abs(np.cumsum(onehot, axis=0) - n * weights[None, :]).max(axis=0)


@pytest.mark.parametrize("n_datasets", [1, 2, 3, 5])
def test_prefix_proportions_within_bound(n_datasets):
    rng = np.random.default_rng(n_datasets)
    for _ in range(30):
        w = rng.random(n_datasets) ** 2 + 1e-3
        w /= w.sum()
        dataset_index, sample_index = blending_indices(w, 5000)
        gap = _max_prefix_gap(dataset_index, w)
        bound = np.maximum(0.5 + w * (n_datasets - 2) / 2, 0.5)  # the module's stated bound
        assert np.all(gap <= bound + 1e-9), (w, gap)
        if n_datasets <= 3:
            assert np.all(gap < 1)
        for d in range(n_datasets):  # each dataset's samples are taken in order 0, 1, 2, ...
            assert np.array_equal(sample_index[dataset_index == d], np.arange(np.sum(dataset_index == d)))


def test_blended_items_and_determinism():
    datasets = [Numbers("wiki", 50), Numbers("books", 10), Numbers("web", 1000)]
    a = BlendedDataset(datasets, [0.5, 0.3, 0.2], 2000)
    b = BlendedDataset(datasets, [5, 3, 2], 2000)  # weights are normalised
    assert len(a) == 2000
    assert np.array_equal(a.dataset_index, b.dataset_index)
    assert np.array_equal(a.sample_index, b.sample_index)
    counts = np.bincount(a.dataset_index, minlength=3)
    assert np.all(np.abs(counts - np.array([1000, 600, 400])) <= 1)
    # "books" has 10 samples but is asked for ~600: its indices keep growing (its epochs wrap).
    items = [a[i] for i in range(2000)]
    books = [x["k"] for x in items if x["name"] == "books"]
    assert books == list(range(len(books)))
    assert a[0]["name"] == "wiki"
    assert a[1]["name"] == "books"
    with pytest.raises(IndexError):
        a[2000]


def test_weights_none_follow_lengths_and_zero_weight_excluded():
    a = BlendedDataset([Numbers("x", 300), Numbers("y", 100)], None, 400)
    assert list(np.bincount(a.dataset_index)) == [300, 100]
    b = BlendedDataset([Numbers("x", 300), Numbers("y", 100)], [1.0, 0.0], 50)
    assert np.all(b.dataset_index == 0)


def test_weight_validation_names_dataset_and_value():
    datasets = [Numbers("wiki", 5), Numbers("books", 5)]
    with pytest.raises(ValueError, match=r"books\[1\].*-0.5"):
        BlendedDataset(datasets, [1.0, -0.5], 10)
    with pytest.raises(ValueError, match="3 weights for 2 datasets"):
        BlendedDataset(datasets, [1, 1, 1], 10)
    with pytest.raises(ValueError, match="positive sum"):
        BlendedDataset(datasets, [0, 0], 10)
    with pytest.raises(ValueError, match=r"empty\[1\] has weight 1.0 but no samples"):
        BlendedDataset([Numbers("wiki", 5), Numbers("empty", 0)], [1, 1], 10)
    with pytest.raises(ValueError, match="nan"):
        BlendedDataset(datasets, [1, float("nan")], 10)


def test_blending_real_datasets_wraps_epochs():
    special = SpecialTokens(pad=0, unk=1, cls=2, sep=3, mask=4)
    rng = np.random.default_rng(0)
    docs = InMemoryDocuments([[rng.integers(5, 100, 20).tolist()] for _ in range(6)], vocab_size=100, special=special)
    config = DataConfig(seq_len=32, max_predictions=4)
    small = BertSampleDataset(docs, np.arange(0, 2), config, name="small")
    large = BertSampleDataset(docs, np.arange(2, 6), config, name="large")
    blend = BlendedDataset([small, large], [0.5, 0.5], 40)
    for i in range(40):
        d, k = int(blend.dataset_index[i]), int(blend.sample_index[i])
        expected = [small, large][d][k]
        assert all(np.array_equal(blend[i][key], expected[key]) for key in expected)
    assert blend.sample_index[blend.dataset_index == 0].max() == 19  # 10 epochs of the 2-sample dataset
