"""Datasets and loaders for pretraining: shards -> splits -> masked samples -> a resumable sampler."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from megatron_narrow.config import DataConfig, ModelConfig, TrainConfig
from megatron_narrow.data.blending import BlendedDataset
from megatron_narrow.data.samplers import DistributedPretrainingSampler
from megatron_narrow.data.samples import BertSampleDataset, split_document_ranges
from megatron_narrow.data.shards import IndexedDocuments, atomic_write_bytes
from megatron_narrow.data.tokenizer import SpecialTokens, Tokenizer, load_tokenizer


@dataclass
class PretrainingData:
    train: BertSampleDataset | BlendedDataset
    valid: BertSampleDataset | BlendedDataset | None
    special: SpecialTokens
    word_start: np.ndarray | None


def check_data_paths(data: DataConfig) -> None:
    """Refuse a missing path before any process-group work."""
    from pathlib import Path

    if not data.data_paths:
        raise ValueError("data.data_paths is empty: give the directories written by tools/preprocess_data.py")
    for path in data.data_paths:
        if not (Path(path) / "index.json").is_file():
            raise ValueError(f"data path {path} has no index.json: preprocess it with tools/preprocess_data.py")


def index_cache_dir(data: DataConfig, path: str) -> Path:
    """Where the sample indices of data path `path` are cached."""
    return Path(data.index_cache_dir) if data.index_cache_dir else Path(path) / "index_cache"


def builds_index_first(data: DataConfig, rank: int, local_rank: int) -> bool:
    """The rank that builds missing index caches while the others wait (one per node without shared storage)."""
    return local_rank == 0 if not data.index_cache_shared else rank == 0


def build_datasets_in_turn(data: DataConfig, model: ModelConfig, train: TrainConfig, total_samples: int,
                           *, rank: int, local_rank: int, barrier, tokenizer: Tokenizer | None = None
                           ) -> PretrainingData:
    """build_datasets on every rank, the index builder first: it writes the caches, the others wait at
    `barrier` and then memory-map them (every rank calls `barrier` once)."""
    first = builds_index_first(data, rank, local_rank)
    if not first:
        barrier()
    try:
        return build_datasets(data, model, train, total_samples, tokenizer)
    finally:
        if first:
            barrier()


def build_datasets(data: DataConfig, model: ModelConfig, train: TrainConfig, total_samples: int,
                   tokenizer: Tokenizer | None = None) -> PretrainingData:
    """Open every data path (checking tokenizer identity and vocabulary against the model), split by
    documents, build masked samples (their indices from the cache when it has them) and blend them.
    `tokenizer`: train.tokenizer_model already loaded (loaded here when None)."""
    identity = None
    word_start = None
    if train.tokenizer_model:
        if tokenizer is None:
            tokenizer = load_tokenizer(train.tokenizer_type or "sentencepiece", train.tokenizer_model)
        identity = tokenizer.identity
        word_start = tokenizer.word_start_mask() if data.whole_word_masking else None
    trains, valids, special = [], [], None
    for index, path in enumerate(data.data_paths):
        cache = index_cache_dir(data, path)
        documents = IndexedDocuments(path, expected_identity=identity, expected_vocab_size=model.vocab_size,
                                     check_token_ids=False)
        checked = cache / f"ids_checked-{documents.fingerprint[:20]}"  # every token id < vocab_size, once
        if not checked.is_file():
            documents.check_token_ids()
            _mark(checked)
        special = special or documents.special
        train_docs, valid_docs, _ = split_document_ranges(len(documents), data.split)
        trains.append(BertSampleDataset(documents, train_docs, data, word_start=word_start, name=f"train{index}",
                                        cache_dir=cache))
        if len(valid_docs):
            valids.append(BertSampleDataset(documents, valid_docs, data, word_start=word_start, name=f"valid{index}",
                                            cache_dir=cache))
    if any(len(d) == 0 for d in trains):
        raise ValueError("a data path gives no training samples: its train split holds no tokens")
    blend_cache = index_cache_dir(data, data.data_paths[0])
    train_set = trains[0] if len(trains) == 1 else BlendedDataset(trains, data.data_weights, total_samples,
                                                                  cache_dir=blend_cache)
    valid_set = None
    if valids:
        valid_set = valids[0] if len(valids) == 1 else BlendedDataset(valids, data.data_weights, 10 * total_samples,
                                                                      cache_dir=blend_cache)
    return PretrainingData(train=train_set, valid=valid_set, special=special, word_start=word_start)


def _mark(path: Path) -> None:
    """Create an empty marker file (atomically; concurrent writers write the same nothing)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, b"")
    except OSError as error:
        raise ValueError(f"cannot write the sample index cache in {path.parent} ({error.strerror}): set "
                         "data.index_cache_dir to a writable directory") from error


def make_loader(dataset, *, consumed_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                num_workers: int) -> DataLoader:
    """An endless loader of this rank's micro-batches, starting after `consumed_samples` global samples."""
    sampler = DistributedPretrainingSampler(total_samples=None, consumed_samples=consumed_samples,
                                            micro_batch_size=micro_batch_size, data_parallel_rank=dp_rank,
                                            data_parallel_size=dp_size)
    # its own generator: starting the loader then draws nothing from the global RNG that dropout uses, so a
    # loader started mid-run (a new sequence-length phase) leaves the resumed and the uninterrupted run alike
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate,
                      persistent_workers=num_workers > 0, generator=torch.Generator(),
                      worker_init_fn=partial(leave_signals_to_main, os.getpid()))


def leave_signals_to_main(parent_pid: int, worker_id: int) -> None:
    """SLURM's --signal and `kill` of a process group reach the DataLoader workers too. A worker that died
    of SIGTERM would make the main process raise instead of checkpointing, so workers ignore SIGTERM and
    SIGINT; the main process saves, then shuts them down, and a SIGKILL of it takes them along."""
    import signal

    from megatron_narrow.data.worker_processes import die_with_parent

    if os.getppid() == parent_pid:  # forked by the rank; a fork-server worker (Python 3.14's default) is not
        die_with_parent(parent_pid)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def collate(samples: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    return {key: torch.from_numpy(np.stack([s[key] for s in samples])) for key in samples[0]}
