"""The read interface between stored documents and sample building.

A document is a token array split into sentences (or, without sentence splitting, into the lines of
the raw document). Sample builders see only this protocol, so tests can feed them in-memory corpora.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from megatron_narrow.data.tokenizer import SpecialTokens


class DocumentSource(Protocol):
    """Random access to tokenized documents by global document index."""

    vocab_size: int
    special: SpecialTokens

    def __len__(self) -> int: ...

    def tokens(self, index: int) -> np.ndarray:
        """int32[n]: the document's tokens (no special tokens)."""
        ...

    def sentence_lengths(self, index: int) -> np.ndarray:
        """int32[s]: token count of each sentence, in order; sums to len(tokens(index))."""
        ...


def gather_sentence_lengths(source: DocumentSource, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int64 lengths of every sentence of the documents `indices`, in order; int64 sentences per document).

    Sources that can answer for many documents at once (IndexedDocuments.sentence_lengths_of: slices of the
    memory-mapped Arrow buffers) do; others are asked one document at a time."""
    indices = np.asarray(indices, dtype=np.int64)
    many = getattr(source, "sentence_lengths_of", None)
    if many is not None:
        return many(indices)
    per_document = [np.asarray(source.sentence_lengths(int(d)), dtype=np.int64) for d in indices]
    counts = np.array([x.size for x in per_document], dtype=np.int64)
    return (np.concatenate(per_document) if per_document else np.zeros(0, dtype=np.int64)), counts


class InMemoryDocuments:
    """A DocumentSource over Python lists: documents as lists of sentences of token ids."""

    def __init__(self, documents: list[list[list[int]]], *, vocab_size: int, special: SpecialTokens) -> None:
        self.vocab_size = vocab_size
        self.special = special
        self._tokens = [np.asarray([t for s in doc for t in s], dtype=np.int32) for doc in documents]
        self._lengths = [np.asarray([len(s) for s in doc], dtype=np.int32) for doc in documents]

    def __len__(self) -> int:
        return len(self._tokens)

    def tokens(self, index: int) -> np.ndarray:
        return self._tokens[index]

    def sentence_lengths(self, index: int) -> np.ndarray:
        return self._lengths[index]
