"""BERT pretraining samples: a deterministic sample index over documents, and samples cut from it.

The index packs consecutive sentences of one document greedily up to the target length (seq_len - 2
for MLM only, seq_len - 3 with a pair task); a sentence longer than the target is cut into target-length
pieces, so every token of every document lands in exactly one sample per epoch. The index is built once
with numpy (one Python call per document to read sentence lengths) and stored as flat arrays.

`ds[i]` accepts any non-negative global index: epoch = i // len(ds), and the sample is a pure function
of (config.seed, i): the epoch's order is a permutation seeded by (seed, epoch, name) and the pair/mask
randomness comes from a Philox generator keyed by (seed, name, i). Any worker, rank or restart that asks
for sample i gets the same tensors.

With data.packing (concat or segments) an item is a row of several of those samples (data/packing.py
decides once, seeded, which samples share a row; every sample is in exactly one row), and the epoch
permutation shuffles rows. segments rows add segment_ids (1, 2, ... per segment, 0 on padding) and
position_ids that restart at every segment; each segment is masked as the sample it would be unpacked.
"""

from __future__ import annotations

import itertools
import zlib
from pathlib import Path

import numpy as np

from megatron_narrow.config import DataConfig, split_fractions
from megatron_narrow.data.documents import DocumentSource, gather_sentence_lengths
from megatron_narrow.data.index_cache import cache_key, load_or_build, load_or_save_array
from megatron_narrow.data.masking import mask_tokens
from megatron_narrow.data.packing import pack_samples

# Distinguishes the two uses of the seed (epoch shuffle vs per-sample randomness).
_SHUFFLE_SALT = 0x5EED_0001
_SAMPLE_SALT = 0x5EED_0002
_PACK_SALT = 0x5EED_0003
# The arrays of the sample index (attributes "_" + name); the packed ones exist with data.packing only.
_INDEX_ARRAYS = ("piece_start", "piece_len", "doc_first_piece", "doc_end_piece", "nonempty_docs",
                 "sample_local_doc", "sample_first_piece", "sample_end_piece")
_ROW_ARRAYS = ("row_members", "row_starts")


def split_documents(num_documents: int, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """split_document_ranges as int64 index arrays."""
    return tuple(np.arange(r.start, r.stop, dtype=np.int64) for r in split_document_ranges(num_documents, split))


def split_document_ranges(num_documents: int, split: str) -> tuple[range, range, range]:
    """Contiguous (train, valid, test) document ranges by the normalised fractions of `split`.

    Boundaries are the cumulative fractions times num_documents, rounded half up, with the last one
    pinned to num_documents: every document lands in exactly one split and each split is within one
    document of its exact share.
    """
    if num_documents < 0:
        raise ValueError(f"num_documents must be >= 0, got {num_documents}")
    fractions = split_fractions(split)
    bounds = [0]
    cumulative = 0.0
    for fraction in fractions[:-1]:
        cumulative += fraction
        bounds.append(min(num_documents, int(np.floor(cumulative * num_documents + 0.5))))
    bounds.append(num_documents)
    return tuple(range(lo, hi) for lo, hi in itertools.pairwise(bounds))


def _bounds(indices: np.ndarray | range) -> tuple[int, int]:
    """(smallest, largest) document index (0, -1 when empty), without iterating a range."""
    if len(indices) == 0:
        return 0, -1
    if isinstance(indices, range):
        return indices.start, indices.stop - 1
    return int(indices.min()), int(indices.max())


def _as_key(indices: np.ndarray | range) -> list[int] | np.ndarray:
    """A split's documents for a cache key: [start, stop) when contiguous (a range, or an array that is one)."""
    if isinstance(indices, range):
        return [indices.start, indices.stop]
    if indices.size == 0 or (indices.size == indices[-1] - indices[0] + 1 and (np.diff(indices) == 1).all()):
        return [int(indices[0]), int(indices[-1]) + 1] if indices.size else [0, 0]
    return indices


class BertSampleDataset:
    """Static-shape BERT samples over the documents of one split.

    Each item is a dict of numpy arrays: input_ids, attention_mask, token_type_ids (int64[S]),
    target_positions, target_ids (int64[M]), target_valid (bool[M]), and pair_label (int64 scalar array)
    when config.pair_task is not "none". Layout: `[CLS] A [SEP]`, or `[CLS] A [SEP] B [SEP]` with token
    type 1 on B and its [SEP]. packing=concat: `[CLS] A1 [SEP] A2 [SEP] ...`; packing=segments:
    `[CLS] A1 [SEP] [CLS] A2 [SEP] ...` plus segment_ids and position_ids (int64[S]).
    """

    def __init__(
        self,
        documents: DocumentSource,
        document_indices: np.ndarray | range,
        config: DataConfig,
        *,
        word_start: np.ndarray | None = None,
        name: str = "train",
        cache_dir: str | Path | None = None,
    ) -> None:
        """
        Args:
            documents: where tokens and sentence lengths come from.
            document_indices: the global document indices of this split (e.g. from split_documents), or a
                range (split_document_ranges), which costs no memory per document.
            config: sequence length, masking and pair task; config.seed seeds everything.
            word_start: bool[vocab_size], True where a token starts a word; needed for whole-word masking.
            name: salts the shuffle and masking streams, so the train and valid splits draw differently.
            cache_dir: keep the index (and epoch orders) here as memory-mapped .npy files, built once for
                every process that asks for the same one (data/index_cache.py); None builds it in memory.
                Needs a source with a `fingerprint` (IndexedDocuments).
        """
        self.documents = documents
        if isinstance(document_indices, range) and document_indices.step == 1:
            self.document_indices = document_indices
        else:
            self.document_indices = np.asarray(document_indices, dtype=np.int64)
        self.config = config
        self.name = name
        self.vocab_size = int(documents.vocab_size)
        self.special = documents.special
        if isinstance(self.document_indices, np.ndarray) and self.document_indices.ndim != 1:
            raise ValueError(f"document_indices must be 1-D, got shape {self.document_indices.shape}")
        low, high = _bounds(self.document_indices)
        if len(self.document_indices) and (low < 0 or high >= len(documents)):
            raise ValueError(f"document_indices must lie in [0, {len(documents)}), got range [{low}, {high}]")
        if config.whole_word_masking:
            if word_start is None:
                raise ValueError("data.whole_word_masking=True needs word_start (tokenizer.word_start_mask())")
            word_start = np.asarray(word_start, dtype=bool)
            if word_start.shape != (self.vocab_size,):
                raise ValueError(f"word_start must be bool[{self.vocab_size}], got shape {word_start.shape}")
        self.word_start = word_start
        self.target_length = config.seq_len - config.special_slots

        salt = zlib.crc32(name.encode("utf-8"))
        self._shuffle_seed = [config.seed, salt, _SHUFFLE_SALT]
        # Philox key = (hash of seed and name, global sample index): one independent stream per sample.
        self._key_high = int(np.random.SeedSequence([config.seed, salt, _SAMPLE_SALT]).generate_state(1, np.uint64)[0])
        self._perm_epoch = -1
        self._perm = np.zeros(0, dtype=np.int64)
        self._row_members = self._row_starts = None
        self.cache_entry: Path | None = None
        fingerprint = getattr(documents, "fingerprint", None)
        if cache_dir is not None and fingerprint is not None:
            key = cache_key({"documents": fingerprint, "document_indices": _as_key(self.document_indices),
                             "seq_len": config.seq_len, "pair_task": config.pair_task, "packing": config.packing,
                             "max_segments": config.max_segments, "seed": config.seed, "name": name})
            self.cache_entry = Path(cache_dir) / f"{name}-{key}"
            arrays = load_or_build(self.cache_entry, self._index_arrays)
        else:
            arrays = self._index_arrays()
        for array_name, array in arrays.items():
            setattr(self, "_" + array_name, array)

    def _index_arrays(self) -> dict[str, np.ndarray]:
        """Build the sample index (and the packed rows) in memory: the arrays a cache entry holds."""
        self._build_index()
        names = _INDEX_ARRAYS
        if self.config.packing != "none":
            self._build_rows()
            names += _ROW_ARRAYS
        return {name: getattr(self, "_" + name) for name in names}

    # ----------------------------------------------------------------------------------- index

    def _build_index(self) -> None:
        """Cut sentences into pieces <= target_length and pack consecutive pieces of a document greedily."""
        t = self.target_length
        indices = self.document_indices
        indices = np.arange(indices.start, indices.stop, dtype=np.int64) if isinstance(indices, range) else indices
        sent_len, sent_counts = gather_sentence_lengths(self.documents, indices)
        n_docs = len(self.document_indices)
        sent_doc = np.repeat(np.arange(n_docs, dtype=np.int64), sent_counts)
        # Token offset of each sentence inside its document.
        global_start = np.cumsum(sent_len) - sent_len
        first_sentence = np.cumsum(sent_counts) - sent_counts
        doc_base = np.zeros(n_docs, dtype=np.int64)
        has_sentences = sent_counts > 0
        doc_base[has_sentences] = global_start[first_sentence[has_sentences]]
        sent_start = global_start - np.repeat(doc_base, sent_counts)

        # Pieces: ceil(len / t) per sentence (none for an empty sentence), each t long but the last. When every
        # sentence is one piece (the usual case at BERT's lengths), the pieces are the sentences.
        n_pieces = -(-sent_len // t)
        if sent_len.size and n_pieces.min() == 1 and n_pieces.max() == 1:
            piece_start, piece_len = sent_start, sent_len
        else:
            piece_sent = np.repeat(np.arange(sent_len.size, dtype=np.int64), n_pieces)
            first_piece_of_sent = np.cumsum(n_pieces) - n_pieces
            k = np.arange(piece_sent.size, dtype=np.int64) - first_piece_of_sent[piece_sent]
            piece_start = sent_start[piece_sent] + k * t
            piece_len = np.minimum(t, sent_len[piece_sent] - k * t)
        pieces_per_doc = np.bincount(sent_doc, weights=n_pieces, minlength=n_docs).astype(np.int64)
        self._doc_end_piece = np.cumsum(pieces_per_doc)
        self._doc_first_piece = self._doc_end_piece - pieces_per_doc
        self._piece_start = piece_start
        self._piece_len = piece_len
        self._nonempty_docs = np.flatnonzero(self._doc_end_piece > self._doc_first_piece)

        # Greedy packing, one sample per document per round, all documents at once: from piece `cur`,
        # take pieces while the running token total stays <= t (searchsorted on the global cumsum; a
        # document whose rest fits takes it all without a search: most documents of a short-text corpus).
        cum = np.concatenate([[0], np.cumsum(piece_len)])
        doc = self._nonempty_docs
        cur = self._doc_first_piece[doc]
        end = self._doc_end_piece[doc]
        out_doc, out_first, out_end = [], [], []
        while doc.size:
            stop = end.copy()
            long = cum[end] - cum[cur] > t
            stop[long] = np.minimum(np.searchsorted(cum, cum[cur[long]] + t, side="right") - 1, end[long])
            out_doc.append(doc)
            out_first.append(cur)
            out_end.append(stop)
            more = stop < end
            doc, cur, end = doc[more], stop[more], end[more]
        sample_doc = np.concatenate(out_doc) if out_doc else np.zeros(0, dtype=np.int64)
        sample_first = np.concatenate(out_first) if out_first else np.zeros(0, dtype=np.int64)
        sample_end = np.concatenate(out_end) if out_end else np.zeros(0, dtype=np.int64)
        # Document order, then position: a document's round-r sample goes to its first slot + r (no sort).
        rounds = np.repeat(np.arange(len(out_doc), dtype=np.int64), [d.size for d in out_doc])
        per_doc = np.bincount(sample_doc, minlength=n_docs)
        destination = (np.cumsum(per_doc) - per_doc)[sample_doc] + rounds
        self._sample_local_doc = np.empty_like(sample_doc)
        self._sample_first_piece = np.empty_like(sample_first)
        self._sample_end_piece = np.empty_like(sample_end)
        self._sample_local_doc[destination] = sample_doc
        self._sample_first_piece[destination] = sample_first
        self._sample_end_piece[destination] = sample_end

    def _build_rows(self) -> None:
        """packing: which samples share a row. A sample of n tokens costs n + 2 slots as a segment
        ([CLS] and [SEP]) and n + 1 in a concat row (its [SEP]; the row's one [CLS] is set aside)."""
        start, end = self.sample_token_ranges
        segments = self.config.packing == "segments"
        capacity = self.config.seq_len if segments else self.config.seq_len - 1
        rng = np.random.default_rng([*self._shuffle_seed, _PACK_SALT])
        self._row_members, self._row_starts = pack_samples(end - start + (2 if segments else 1), capacity, rng,
                                                           self.config.max_segments)

    @property
    def sample_documents(self) -> np.ndarray:
        """int64[N]: global document index of each sample (index order, before shuffling)."""
        indices = self.document_indices
        if isinstance(indices, range):
            return indices.start + np.asarray(self._sample_local_doc, dtype=np.int64)
        return indices[self._sample_local_doc]

    @property
    def sample_token_ranges(self) -> tuple[np.ndarray, np.ndarray]:
        """(start, end) int64[N]: each sample's token range inside its document (A and B together)."""
        last = self._sample_end_piece - 1
        return self._piece_start[self._sample_first_piece], self._piece_start[last] + self._piece_len[last]

    def __len__(self) -> int:
        """Samples (packed rows, with packing) per epoch."""
        if self._row_starts is not None:
            return int(self._row_starts.size - 1)
        return int(self._sample_local_doc.size)

    @property
    def num_unpacked_samples(self) -> int:
        """Ordinary samples per epoch (the rows' segments, with packing)."""
        return int(self._sample_local_doc.size)

    def real_token_fraction(self) -> float:
        """Real slots (tokens and their [CLS]/[SEP]) over all slots of one epoch, exact from the index."""
        start, end = self.sample_token_ranges
        samples = self.num_unpacked_samples
        overhead = {"none": self.config.special_slots, "segments": 2, "concat": 1}[self.config.packing]
        real = int((end - start).sum()) + overhead * samples + (len(self) if self.config.packing == "concat" else 0)
        return real / max(len(self) * self.config.seq_len, 1)

    def row_members(self, row: int) -> np.ndarray:
        """packing: the index-order samples of packed row `row`."""
        return self._row_members[self._row_starts[row]:self._row_starts[row + 1]]

    # ----------------------------------------------------------------------------------- samples

    def epoch_permutation(self, epoch: int) -> np.ndarray:
        """int64[N]: index-order sample behind each position of `epoch`; the current epoch's is kept (with a
        cache: memory-mapped from `epoch_E.npy` in the cache entry, written by whoever needs it first)."""
        if epoch != self._perm_epoch:
            if self.cache_entry is None:
                self._perm = self._compute_permutation(epoch)
            else:
                self._perm = load_or_save_array(self.cache_entry / f"epoch_{epoch}.npy",
                                                lambda: self._compute_permutation(epoch), len(self))
            self._perm_epoch = epoch
        return self._perm

    def _compute_permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([*self._shuffle_seed, epoch]).permutation(len(self))

    def sample_rng(self, index: int) -> np.random.Generator:
        """The generator of global sample `index`: a pure function of (seed, name, index)."""
        return np.random.Generator(np.random.Philox(key=(self._key_high << 64) | index))

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        n = len(self)
        if index < 0:
            raise IndexError(f"sample index must be >= 0, got {index}")
        if n == 0:
            raise IndexError(f"dataset {self.name!r} has no samples (its documents hold no tokens)")
        epoch, j = divmod(index, n)
        s = int(self.epoch_permutation(epoch)[j])
        rng = self.sample_rng(index)
        if self._row_starts is not None:
            pieces = [self._sample_tokens(int(m))[0] for m in self.row_members(s)]
            return self._packed_segments(pieces, rng) if self.config.packing == "segments" else \
                self._packed_concat(pieces, rng)

        tokens, local_doc, first, stop, start = self._sample_tokens(s)
        pair_label = None
        if self.config.pair_task == "none":
            a, b = tokens, None
        else:
            a, b, pair_label = self._pair(rng, tokens, local_doc, first, stop, start)
        sample = self._layout(a, b, rng)
        if pair_label is not None:
            sample["pair_label"] = np.array(pair_label, dtype=np.int64)
        return sample

    def _sample_tokens(self, s: int) -> tuple[np.ndarray, int, int, int, int]:
        """(tokens, local document, first piece, end piece, token start) of index-order sample `s`."""
        local_doc = int(self._sample_local_doc[s])
        first, stop = int(self._sample_first_piece[s]), int(self._sample_end_piece[s])
        start = int(self._piece_start[first])
        end = int(self._piece_start[stop - 1] + self._piece_len[stop - 1])
        doc_tokens = self.documents.tokens(int(self.document_indices[local_doc]))
        if end > len(doc_tokens):
            raise ValueError(
                f"document {self.document_indices[local_doc]} has {len(doc_tokens)} tokens but its sentence "
                f"lengths reach {end}"
            )
        return doc_tokens[start:end], local_doc, first, stop, start

    def _pair(
        self, rng: np.random.Generator, tokens: np.ndarray, local_doc: int, first: int, stop: int, start: int
    ) -> tuple[np.ndarray, np.ndarray, int]:
        """Split the packed tokens into A and B for SOP (swap, label 1 = swapped) or NSP (label 1 = random B)."""
        if stop - first >= 2:
            # A random sentence (piece) boundary inside the sample.
            cut = int(self._piece_start[first + int(rng.integers(1, stop - first))]) - start
        else:
            cut = max(1, len(tokens) // 2)  # the middle; a one-token sample keeps it in A
        a, b = tokens[:cut], tokens[cut:]
        if self.config.pair_task == "sop":
            if rng.random() < 0.5:
                return b, a, 1
            return a, b, 0
        # NSP: with probability 0.5, B is taken from a random other (non-empty) document of the split.
        others = self._nonempty_docs.size - 1
        if others < 1 or rng.random() >= 0.5:
            return a, b, 0
        r = int(rng.integers(0, others))
        r += r >= int(np.searchsorted(self._nonempty_docs, local_doc))  # skip this sample's own document
        other = int(self._nonempty_docs[r])
        piece = int(rng.integers(self._doc_first_piece[other], self._doc_end_piece[other]))
        other_tokens = self.documents.tokens(int(self.document_indices[other]))
        b_start = int(self._piece_start[piece])
        b = other_tokens[b_start : b_start + self.target_length - len(a)]
        return a, b, 1

    def _mask(self, input_ids: np.ndarray, candidates: np.ndarray, rng: np.random.Generator):
        return mask_tokens(input_ids, candidate_mask=candidates, config=self.config, rng=rng,
                           vocab_size=self.vocab_size, special=self.special, word_start=self.word_start)

    def _packed_concat(self, pieces: list[np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        """`[CLS] A1 [SEP] A2 [SEP] ...`, full attention, masked as one sample."""
        seq_len, sp = self.config.seq_len, self.special
        input_ids = np.full(seq_len, sp.pad, dtype=np.int64)
        candidates = np.zeros(seq_len, dtype=bool)
        input_ids[0] = sp.cls
        offset = 1
        for tokens in pieces:
            input_ids[offset:offset + len(tokens)] = tokens
            candidates[offset:offset + len(tokens)] = True
            offset += len(tokens)
            input_ids[offset] = sp.sep
            offset += 1
        attention_mask = (np.arange(seq_len) < offset).astype(np.int64)
        masked, positions, ids, valid = self._mask(input_ids, candidates, rng)
        return {"input_ids": masked, "attention_mask": attention_mask,
                "token_type_ids": np.zeros(seq_len, dtype=np.int64), "target_positions": positions,
                "target_ids": ids, "target_valid": valid}

    def _packed_segments(self, pieces: list[np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        """`[CLS] A1 [SEP] [CLS] A2 [SEP] ...`: each segment laid out and masked as its own sample would be."""
        seq_len, m = self.config.seq_len, self.config.max_predictions
        row = {key: np.zeros(seq_len, dtype=np.int64) for key in
               ("input_ids", "attention_mask", "token_type_ids", "segment_ids", "position_ids")}
        row["input_ids"][:] = self.special.pad
        target_positions, target_ids = [], []
        offset = 0
        for number, tokens in enumerate(pieces, start=1):
            alone = self._layout(tokens, None, rng, length=len(tokens) + 2)
            span = slice(offset, offset + len(tokens) + 2)
            row["input_ids"][span] = alone["input_ids"]
            row["attention_mask"][span] = 1
            row["segment_ids"][span] = number
            row["position_ids"][span] = np.arange(len(tokens) + 2)
            valid = alone["target_valid"]
            target_positions.append(alone["target_positions"][valid] + offset)
            target_ids.append(alone["target_ids"][valid])
            offset += len(tokens) + 2
        positions, ids = np.concatenate(target_positions), np.concatenate(target_ids)
        if positions.size > m:  # training/setup.check_packed_targets sizes M for the worst row
            raise ValueError(f"a packed row needs {positions.size} targets but data.max_predictions={m}")
        row["target_positions"] = np.zeros(m, dtype=np.int64)
        row["target_ids"] = np.full(m, self.special.pad, dtype=np.int64)
        row["target_valid"] = np.arange(m) < positions.size
        row["target_positions"][:positions.size] = positions
        row["target_ids"][:positions.size] = ids
        return row

    def _layout(self, a: np.ndarray, b: np.ndarray | None, rng: np.random.Generator,
                length: int | None = None) -> dict[str, np.ndarray]:
        """Place [CLS] A [SEP] (B [SEP]) into static-shape arrays of `length` (seq_len) and mask them."""
        seq_len, sp = length or self.config.seq_len, self.special
        la = len(a)
        lb = 0 if b is None else len(b)
        real = la + 2 + (0 if b is None else lb + 1)
        if real > seq_len:  # cannot happen with the index's target length; guards a bad source
            raise ValueError(f"sample of {real} tokens exceeds seq_len={seq_len}")
        input_ids = np.full(seq_len, sp.pad, dtype=np.int64)
        token_type_ids = np.zeros(seq_len, dtype=np.int64)
        attention_mask = np.zeros(seq_len, dtype=np.int64)
        candidates = np.zeros(seq_len, dtype=bool)
        input_ids[0] = sp.cls
        input_ids[1 : 1 + la] = a
        input_ids[1 + la] = sp.sep
        candidates[1 : 1 + la] = True
        if b is not None:
            input_ids[2 + la : 2 + la + lb] = b
            input_ids[2 + la + lb] = sp.sep
            token_type_ids[2 + la : 3 + la + lb] = 1
            candidates[2 + la : 2 + la + lb] = True
        attention_mask[:real] = 1
        masked, positions, ids, valid = self._mask(input_ids, candidates, rng)
        return {
            "input_ids": masked,
            "attention_mask": attention_mask,
            "token_type_ids": token_type_ids,
            "target_positions": positions,
            "target_ids": ids,
            "target_valid": valid,
        }
