"""Deterministic weighted interleaving of several sample datasets.

Megatron builds its blending index with a sequential "largest deficit first" loop in C++. Here the same
kind of sequence comes from a merge that numpy does in one sort: dataset d's k-th sample is due at time
(k + 1/2) / w_d (w normalised to sum 1), and samples are taken in order of due time, ties by dataset
index. After n samples every dataset has round(t * w_d) of them for the current time t ~ n, so each count
stays within about one sample of n * w_d at every prefix: with e_j = round(t * w_j) - t * w_j in
[-1/2, 1/2], count_d - n * w_d = (1 - w_d) e_d - w_d * sum_{j != d} e_j, so the gap is at most
1/2 + w_d * (D - 2) / 2 for D datasets (1/2 for two, below 1 for three).

Indices within a dataset keep growing past its length: the underlying datasets map any index onto
their epochs (as BertSampleDataset does), so a small dataset with a large weight is repeated in fresh
epochs rather than cut short.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from megatron_narrow.data.index_cache import cache_key, load_or_build


def _name(dataset: Any, position: int) -> str:
    return f"{getattr(dataset, 'name', 'dataset')!s}[{position}]"


def blending_indices(weights: Sequence[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """(dataset_index int16[size], sample_index int64[size]) of the weighted interleaving.

    Weights must be non-negative with a positive sum; they are normalised here.
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or w.size == 0 or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"blending weights must be finite, >= 0 and with a positive sum, got {list(weights)}")
    if size < 0:
        raise ValueError(f"blending size must be >= 0, got {size}")
    w = w / w.sum()
    n_datasets = w.size
    times, owners, ks = [], [], []
    for d in range(n_datasets):
        if w[d] == 0:
            continue
        # Enough candidates: at the size-th pick the time is below size + D/2, so count_d <= that * w_d + 1.
        count = min(size, math.ceil((size + n_datasets) * w[d]) + 1)
        k = np.arange(count, dtype=np.int64)
        times.append((k + 0.5) / w[d])
        owners.append(np.full(count, d, dtype=np.int16))
        ks.append(k)
    order = np.lexsort((np.concatenate(owners), np.concatenate(times)))[:size]  # by time, ties by dataset
    # Each dataset's candidates are due in k order, so the picks of dataset d are exactly its k = 0..c_d-1.
    dataset_index = np.concatenate(owners)[order]
    sample_index = np.concatenate(ks)[order]
    return dataset_index, sample_index


class BlendedDataset:
    """Samples of several datasets interleaved by weight, `size` samples in all.

    Item i is `datasets[dataset_index[i]][sample_index[i]]`, the sample dict of that dataset unchanged.
    """

    def __init__(self, datasets: Sequence[Any], weights: Sequence[float] | None, size: int,
                 cache_dir: str | Path | None = None) -> None:
        """
        Args:
            datasets: sample datasets that accept any non-negative index (they wrap across epochs).
            weights: one non-negative weight per dataset; None weighs each dataset by its len().
            size: number of samples of the blend (e.g. train_iters * global_batch_size).
            cache_dir: keep the two O(size) index arrays here, memory-mapped (data/index_cache.py), when every
                dataset has a cache entry itself; None builds them in memory.
        """
        if not datasets:
            raise ValueError("BlendedDataset needs at least one dataset")
        if size < 0:
            raise ValueError(f"BlendedDataset size must be >= 0, got {size}")
        if len(datasets) > np.iinfo(np.int16).max:
            raise ValueError(f"BlendedDataset supports at most {np.iinfo(np.int16).max} datasets, got {len(datasets)}")
        if weights is None:
            weights = [float(len(ds)) for ds in datasets]
            if sum(weights) <= 0:
                names = ", ".join(_name(ds, i) for i, ds in enumerate(datasets))
                raise ValueError(f"weights=None weighs datasets by length, but all are empty: {names}")
        weights = [float(w) for w in weights]
        if len(weights) != len(datasets):
            raise ValueError(f"got {len(weights)} weights for {len(datasets)} datasets: {weights}")
        for i, (ds, w) in enumerate(zip(datasets, weights, strict=True)):
            if not math.isfinite(w) or w < 0:
                raise ValueError(f"weight of {_name(ds, i)} must be finite and >= 0, got {w}")
            if w > 0 and len(ds) == 0:
                raise ValueError(f"{_name(ds, i)} has weight {w} but no samples")
        if sum(weights) <= 0:
            raise ValueError(f"weights must have a positive sum, got {weights}")

        self.datasets = list(datasets)
        self.weights = [w / sum(weights) for w in weights]
        self.size = int(size)
        self.cache_entry: Path | None = None
        entries = [getattr(ds, "cache_entry", None) for ds in self.datasets]
        if cache_dir is not None and all(entry is not None for entry in entries):
            key = cache_key({"datasets": [entry.name for entry in entries], "weights": self.weights, "size": self.size})
            self.cache_entry = Path(cache_dir) / f"blend-{key}"
            arrays = load_or_build(self.cache_entry, self._index_arrays)
        else:
            arrays = self._index_arrays()
        self.dataset_index, self.sample_index = arrays["dataset_index"], arrays["sample_index"]

    def _index_arrays(self) -> dict[str, np.ndarray]:
        dataset_index, sample_index = blending_indices(self.weights, self.size)
        return {"dataset_index": dataset_index, "sample_index": sample_index}

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        if not 0 <= index < self.size:
            raise IndexError(f"blended sample index {index} out of range [0, {self.size})")
        return self.datasets[int(self.dataset_index[index])][int(self.sample_index[index])]
