"""Sample index and BERT samples: every token once per epoch, determinism, layouts of MLM/SOP/NSP, splits."""

from __future__ import annotations

import math

import numpy as np
import pytest

from megatron_narrow.config import DataConfig
from megatron_narrow.data.documents import InMemoryDocuments
from megatron_narrow.data.samples import BertSampleDataset, split_documents
from megatron_narrow.data.tokenizer import SpecialTokens

SPECIAL = SpecialTokens(pad=0, unk=1, cls=2, sep=3, mask=4)
VOCAB = 500
SPECIAL_IDS = list(SPECIAL.ids())


def make_corpus(n_docs: int, seed: int = 0, max_sentences: int = 12) -> InMemoryDocuments:
    """Documents of 0..max_sentences sentences of 0..40 tokens, plus a few sentences far longer than a sample."""
    rng = np.random.default_rng(seed)
    docs = []
    for d in range(n_docs):
        n_sent = int(rng.integers(0, max_sentences + 1))
        lengths = rng.integers(0, 41, n_sent)
        if d % 7 == 3 and n_sent:
            lengths[int(rng.integers(0, n_sent))] = int(rng.integers(60, 200))  # longer than any target length
        docs.append([rng.integers(5, VOCAB, int(n)).tolist() for n in lengths])
    docs[0] = []  # an empty document
    docs[1] = [[], [7, 8, 9], []]  # empty sentences
    return InMemoryDocuments(docs, vocab_size=VOCAB, special=SPECIAL)


def unmasked(sample: dict) -> np.ndarray:
    """input_ids with the original tokens restored at the target positions."""
    ids = sample["input_ids"].copy()
    valid = sample["target_valid"]
    ids[sample["target_positions"][valid]] = sample["target_ids"][valid]
    return ids


def sample_tokens(ds: BertSampleDataset, i: int) -> np.ndarray:
    """The document tokens behind global sample i, from the index (for checking the built sample)."""
    s = ds.epoch_permutation(i // len(ds))[i % len(ds)]
    starts, ends = ds.sample_token_ranges
    return ds.documents.tokens(int(ds.sample_documents[s]))[starts[s] : ends[s]]


@pytest.mark.parametrize("pair_task", ["none", "sop"])
def test_index_covers_every_token_exactly_once(pair_task):
    docs = make_corpus(200)
    indices = np.arange(3, 200, 2)  # a split that is not all documents
    config = DataConfig(seq_len=48, max_predictions=8, pair_task=pair_task)
    ds = BertSampleDataset(docs, indices, config)
    target = 46 if pair_task == "none" else 45
    assert ds.target_length == target
    starts, ends = ds.sample_token_ranges
    assert np.all(ends - starts >= 1)
    assert np.all(ends - starts <= target)
    for d in range(len(docs)):
        mine = ds.sample_documents == d
        n_tokens = len(docs.tokens(d))
        if d not in indices:
            assert not mine.any()
            continue
        # Samples of one document tile [0, n_tokens) with no gap and no overlap.
        s, e = starts[mine], ends[mine]
        order = np.argsort(s)
        s, e = s[order], e[order]
        assert (s.size == 0 and n_tokens == 0) or (s[0] == 0 and e[-1] == n_tokens and np.array_equal(s[1:], e[:-1]))
    assert (ends - starts).sum() == sum(len(docs.tokens(int(d))) for d in indices)
    # Greedy packing: a sample plus the next sentence piece of its document would not have fit.
    lengths_ok = 0
    for d in indices[:30]:
        sent_ends = np.cumsum(docs.sentence_lengths(int(d)))
        mine = np.flatnonzero(ds.sample_documents == d)
        for k in mine[:-1]:
            nxt = sent_ends[sent_ends > ends[k]]
            next_piece_end = min(nxt[0], ends[k] + target) if nxt.size else ends[k] + target
            assert next_piece_end - starts[k] > target
            lengths_ok += 1
    assert lengths_ok > 10


def test_epoch_visits_every_sample_once():
    ds = BertSampleDataset(make_corpus(100), np.arange(100), DataConfig(seq_len=64, max_predictions=10))
    for epoch in range(3):
        assert np.array_equal(np.sort(ds.epoch_permutation(epoch)), np.arange(len(ds)))
    assert not np.array_equal(ds.epoch_permutation(0), ds.epoch_permutation(1))


def test_mlm_layout_and_masking():
    config = DataConfig(seq_len=64, max_predictions=10)
    ds = BertSampleDataset(make_corpus(120), np.arange(120), config)
    n = len(ds)
    for i in range(n + 5):  # a little into epoch 1
        sample = ds[i]
        assert set(sample) == {
            "input_ids",
            "attention_mask",
            "token_type_ids",
            "target_positions",
            "target_ids",
            "target_valid",
        }
        assert sample["input_ids"].shape == sample["attention_mask"].shape == (64,)
        assert sample["target_positions"].shape == (10,)
        assert sample["target_valid"].dtype == bool
        tokens = sample_tokens(ds, i)
        length = len(tokens)
        ids = unmasked(sample)
        assert ids[0] == SPECIAL.cls
        assert ids[1 + length] == SPECIAL.sep
        assert np.array_equal(ids[1 : 1 + length], tokens)
        assert np.all(ids[2 + length :] == SPECIAL.pad)
        assert np.array_equal(sample["attention_mask"], (np.arange(64) < length + 2).astype(np.int64))
        assert not sample["token_type_ids"].any()
        valid = sample["target_valid"]
        assert valid.sum() == min(10, math.floor(0.15 * length + 0.5))
        pos = sample["target_positions"][valid]
        assert np.all((pos >= 1) & (pos <= length))


def test_sample_is_pure_function_of_seed_and_index():
    docs = make_corpus(80)
    config = DataConfig(seq_len=64, max_predictions=10, pair_task="sop", seed=7)
    a = BertSampleDataset(docs, np.arange(80), config)
    b = BertSampleDataset(docs, np.arange(80), config)
    n = len(a)
    # Fresh object, out-of-order access, far-away epochs: identical samples.
    for i in [5, 0, 3 * n + 2, n - 1, 10 * n + 7, 5]:
        x, y = a[i], b[i]
        assert all(np.array_equal(x[k], y[k]) for k in x)
    # Another epoch and another seed give other samples.
    epoch0 = np.stack([a[i]["input_ids"] for i in range(n)])
    epoch1 = np.stack([a[n + i]["input_ids"] for i in range(n)])
    assert np.mean(np.any(epoch0 != epoch1, axis=1)) > 0.9
    other = BertSampleDataset(docs, np.arange(80), DataConfig(seq_len=64, max_predictions=10, pair_task="sop", seed=8))
    other0 = np.stack([other[i]["input_ids"] for i in range(n)])
    assert np.mean(np.any(epoch0 != other0, axis=1)) > 0.9
    # The same underlying sample in two epochs is masked differently.
    s0 = a.epoch_permutation(0)
    j1 = int(np.flatnonzero(a.epoch_permutation(1) == s0[0])[0])
    assert not np.array_equal(a[0]["target_positions"], a[n + j1]["target_positions"])


def _pair_parts(sample: dict) -> tuple[np.ndarray, np.ndarray]:
    """Split an unmasked [CLS] A [SEP] B [SEP] sample, checking the token types on the way."""
    ids = unmasked(sample)
    real = int(sample["attention_mask"].sum())
    seps = np.flatnonzero(ids[:real] == SPECIAL.sep)
    assert ids[0] == SPECIAL.cls
    assert len(seps) == 2
    assert seps[1] == real - 1
    types = sample["token_type_ids"]
    assert not types[: seps[0] + 1].any()
    assert np.all(types[seps[0] + 1 : real] == 1)
    assert not types[real:].any()
    assert np.all(ids[real:] == SPECIAL.pad)
    valid = sample["target_valid"]
    assert np.all(np.isin(sample["target_positions"][valid], np.r_[1 : seps[0], seps[0] + 1 : real - 1]))
    return ids[1 : seps[0]], ids[seps[0] + 1 : real - 1]


def _piece_starts(lens: np.ndarray, target_length: int) -> set[int]:
    """Token offsets where a sentence, or a target-length piece of a long sentence, starts."""
    cuts = set()
    for lo, n in zip(np.cumsum(lens) - lens, lens, strict=True):
        cuts.update(range(int(lo), int(lo + n), target_length))
    return cuts


def _boundaries(ds: BertSampleDataset, i: int) -> set[int]:
    """Sentence and piece boundaries inside global sample i, as token offsets from its start."""
    s = ds.epoch_permutation(i // len(ds))[i % len(ds)]
    starts, ends = ds.sample_token_ranges
    cuts = _piece_starts(ds.documents.sentence_lengths(int(ds.sample_documents[s])), ds.target_length)
    return {c - int(starts[s]) for c in cuts if starts[s] < c < ends[s]}


def test_sop_layout_and_labels():
    config = DataConfig(seq_len=64, max_predictions=10, pair_task="sop")
    ds = BertSampleDataset(make_corpus(300, seed=1), np.arange(300), config)
    labels = []
    for i in range(600):
        sample = ds[i]
        a, b = _pair_parts(sample)
        label = int(sample["pair_label"])
        assert sample["pair_label"].dtype == np.int64
        assert sample["pair_label"].shape == ()
        tokens = sample_tokens(ds, i)
        first, second = (b, a) if label == 1 else (a, b)
        assert np.array_equal(np.concatenate([first, second]), tokens)
        cuts = _boundaries(ds, i)
        # The split is at a sentence (piece) boundary when there is one, else in the middle.
        assert len(first) in cuts if cuts else len(first) == max(1, len(tokens) // 2)
        labels.append(label)
    assert abs(np.mean(labels) - 0.5) < 0.07  # 600 fair coins: sd 0.02


def test_nsp_layout_and_labels():
    docs = make_corpus(300, seed=2)
    config = DataConfig(seq_len=64, max_predictions=10, pair_task="nsp")
    ds = BertSampleDataset(docs, np.arange(300), config)
    labels, located = [], 0
    for i in range(600):
        sample = ds[i]
        a, b = _pair_parts(sample)
        tokens = sample_tokens(ds, i)
        label = int(sample["pair_label"])
        assert np.array_equal(a, tokens[: len(a)])
        if label == 1 and len(b) < 3:
            labels.append(label)  # a B of one or two tokens matches somewhere by chance: nothing to locate
            continue
        if label == 0:
            assert np.array_equal(b, tokens[len(a) :])
        else:
            # B: a run of another document starting at one of its sentence (piece) boundaries.
            s = ds.epoch_permutation(i // len(ds))[i % len(ds)]
            own = int(ds.sample_documents[s])
            assert len(a) + len(b) <= ds.target_length
            assert len(b) >= 1
            found = False
            for d in range(len(docs)):
                toks, lens = docs.tokens(d), docs.sentence_lengths(d)
                if d == own or len(toks) == 0:
                    continue
                for start in _piece_starts(lens, ds.target_length):
                    if np.array_equal(toks[start : start + len(b)], b):
                        found = True
                        break
                if found:
                    break
            assert found
            located += 1
        labels.append(label)
    assert abs(np.mean(labels) - 0.5) < 0.07
    assert located > 100, f"only {located} random-next B of 3+ tokens were located"


def test_samples_fit_seq_len_with_long_sentences():
    # Sentences of 150 tokens with seq_len 32: cut into pieces of 29 (pair task), never over seq_len.
    docs = InMemoryDocuments([[list(range(5, 155))], [list(range(5, 40)), [6] * 3]], vocab_size=VOCAB, special=SPECIAL)
    ds = BertSampleDataset(docs, np.arange(2), DataConfig(seq_len=32, max_predictions=5, pair_task="sop"))
    starts, ends = ds.sample_token_ranges
    assert list(ends - starts) == [29, 29, 29, 29, 29, 5, 29, 9]
    order = ds.epoch_permutation(0)
    for i in range(len(ds)):
        assert ds[i]["attention_mask"].sum() == ends[order[i]] - starts[order[i]] + 3


def test_bad_arguments():
    docs = make_corpus(10)
    with pytest.raises(ValueError, match="word_start"):
        BertSampleDataset(docs, np.arange(10), DataConfig(seq_len=32, max_predictions=5, whole_word_masking=True))
    with pytest.raises(ValueError, match="document_indices"):
        BertSampleDataset(docs, np.arange(11), DataConfig(seq_len=32, max_predictions=5))
    ds = BertSampleDataset(docs, np.arange(10), DataConfig(seq_len=32, max_predictions=5))
    with pytest.raises(IndexError):
        ds[-1]
    empty = BertSampleDataset(docs, np.array([0]), DataConfig(seq_len=32, max_predictions=5))
    assert len(empty) == 0


def test_whole_word_masking_dataset():
    word_start = np.zeros(VOCAB, dtype=bool)
    word_start[5:250] = True
    docs = make_corpus(60, seed=3)
    config = DataConfig(seq_len=64, max_predictions=10, whole_word_masking=True)
    ds = BertSampleDataset(docs, np.arange(60), config, word_start=word_start)
    continuations_picked = 0
    for i in range(len(ds)):
        sample = ds[i]
        ids = unmasked(sample)
        picked = np.zeros(64, dtype=bool)
        picked[sample["target_positions"][sample["target_valid"]]] = True
        # A continuation piece is picked exactly when the piece before it is (inside the text).
        real = int(sample["attention_mask"].sum())
        assert sample["target_valid"].sum() > 0 or real < 7, i
        for p in range(2, real - 1):
            if not word_start[ids[p]]:
                assert picked[p] == picked[p - 1]
                continuations_picked += int(picked[p])
    assert continuations_picked > 20, "whole words of several pieces must be masked together"


# ----------------------------------------------------------------------------------- splits


def test_split_documents_covers_all_once_with_right_sizes():
    train, valid, test = split_documents(1000, "949,50,1")
    assert (len(train), len(valid), len(test)) == (949, 50, 1)
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(0, 5000))
        parts = rng.integers(0, 100, 3)
        if parts.sum() == 0:
            continue
        splits = split_documents(n, ",".join(map(str, parts)))
        assert np.array_equal(np.concatenate(splits), np.arange(n))
        exact = np.cumsum(parts / parts.sum()) * n
        bounds = np.cumsum([len(s) for s in splits])
        assert np.all(np.abs(bounds - exact) <= 0.5 + 1e-9)
        assert all(abs(len(s) - n * p / parts.sum()) < 1 + 1e-9 for s, p in zip(splits, parts, strict=True))
    assert [len(s) for s in split_documents(10, "1")] == [10, 0, 0]
    assert [len(s) for s in split_documents(7, "1,1,1")] == [2, 3, 2]
    with pytest.raises(ValueError, match=r"data\.split"):
        split_documents(10, "a,b")
