"""A Megatron-LM indexed dataset (PREFIX.bin / PREFIX.idx, "MMIDIDX") as our shards and manifest.

Megatron's .idx holds, after a 9-byte magic, a version (u64 = 1), the token dtype code (u8), the counts of
sequences and of document boundaries (u64 each), the tokens of every sequence (int32), each sequence's byte
offset into .bin (int64) and the document index (int64: document i is sequences idx[i] .. idx[i+1]). With
--split-sentences a sequence is a sentence, otherwise a whole document: either way it becomes one of our
`sentence_lengths`, and the tokens are copied as they are (an end-of-document id Megatron appended stays).
Nothing is tokenized again, so the tokenizer named here must be the one that made the ids: it is recorded
in the manifest as preprocessing records it, and ids outside its vocabulary are refused.

Everything is checked before anything is written; shards are written atomically and the manifest last, so
an interrupted or refused import leaves no index.json behind.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megatron_narrow.data.preprocess import build_manifest, fingerprint_of
from megatron_narrow.data.shards import (
    MANIFEST_NAME,
    DataError,
    atomic_write_bytes,
    atomic_write_json,
    encode_shard,
    shard_name,
)
from megatron_narrow.data.tokenizer import TokenizerType, load_tokenizer, tokenizer_description

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
TOKEN_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 8: np.uint16}
"""Megatron's dtype codes we read (6 and 7 are float64 and float32: not token ids)."""


@dataclass(frozen=True)
class MegatronIndex:
    """The parsed .idx: per-sequence token counts and byte offsets, and the document index."""

    dtype: type[np.integer]
    sequence_lengths: np.ndarray
    sequence_pointers: np.ndarray
    document_index: np.ndarray

    @property
    def documents(self) -> int:
        return len(self.document_index) - 1


def read_index(idx_path: Path) -> MegatronIndex:
    """Parse and check a .idx file; a DataError naming it for anything we do not read."""
    data = idx_path.read_bytes()
    header = len(INDEX_MAGIC) + 8 + 1 + 8 + 8
    if len(data) < header or not data.startswith(INDEX_MAGIC):
        raise DataError(f"{idx_path} is not a Megatron-LM indexed dataset index (no MMIDIDX header)")
    (version,) = struct.unpack_from("<Q", data, len(INDEX_MAGIC))
    if version != INDEX_VERSION:
        raise DataError(f"{idx_path}: index version {version}; only version {INDEX_VERSION} (MMIDIDX) is read")
    (code,) = struct.unpack_from("<B", data, len(INDEX_MAGIC) + 8)
    if code not in TOKEN_DTYPES:
        raise DataError(f"{idx_path}: token dtype code {code} is not an integer type we read "
                        f"(codes {sorted(TOKEN_DTYPES)})")
    sequences, boundaries = struct.unpack_from("<QQ", data, len(INDEX_MAGIC) + 9)
    expected = header + 4 * sequences + 8 * sequences + 8 * boundaries
    if len(data) != expected:
        multimodal = len(data) == expected + sequences
        raise DataError(f"{idx_path}: {len(data)} bytes, expected {expected} for {sequences} sequences and "
                        f"{boundaries} document boundaries" + (" (a multimodal index, with modes: not read)"
                                                                if multimodal else " (truncated or damaged)"))
    lengths = np.frombuffer(data, np.int32, sequences, header)
    pointers = np.frombuffer(data, np.int64, sequences, header + 4 * sequences)
    document_index = np.frombuffer(data, np.int64, boundaries, header + 12 * sequences)
    if boundaries < 1 or document_index[0] != 0 or document_index[-1] != sequences or \
            np.any(np.diff(document_index) < 0):
        raise DataError(f"{idx_path}: the document index is not a run from 0 to {sequences} sequences")
    return MegatronIndex(TOKEN_DTYPES[code], lengths, pointers, document_index)


def _check_bin(bin_path: Path, index: MegatronIndex) -> np.ndarray:
    """The .bin's tokens (memory-mapped), checked to be exactly what the index describes."""
    itemsize = np.dtype(index.dtype).itemsize
    total = int(index.sequence_lengths.sum(dtype=np.int64))
    if bin_path.stat().st_size != total * itemsize:
        raise DataError(f"{bin_path}: {bin_path.stat().st_size} bytes, the index describes {total} tokens of "
                        f"{itemsize} bytes ({total * itemsize}); truncated, or not this index's .bin")
    starts = np.concatenate([[0], np.cumsum(index.sequence_lengths[:-1], dtype=np.int64)]) * itemsize
    if not np.array_equal(starts, index.sequence_pointers):
        raise DataError(f"{bin_path}: the index's sequence offsets are not contiguous; not read")
    return np.memmap(bin_path, dtype=index.dtype, mode="r") if total else np.zeros(0, index.dtype)


def _id_range(tokens: np.ndarray, block: int = 1 << 24) -> tuple[int, int]:
    """(smallest, largest) token id, a block at a time over the memory map."""
    blocks = [tokens[i:i + block] for i in range(0, len(tokens), block)]
    return min(int(b.min()) for b in blocks), max(int(b.max()) for b in blocks)


def import_megatron(prefix: str, output_dir: str, tokenizer_type: TokenizerType, tokenizer_model: str,
                    shard_size_bytes: int = 256 << 20) -> dict:
    """Write PREFIX's documents as our shards and index.json in `output_dir`; returns the manifest."""
    bin_path, idx_path = Path(f"{prefix}.bin"), Path(f"{prefix}.idx")
    for path in (bin_path, idx_path):
        if not path.is_file():
            raise DataError(f"{path} does not exist: --input takes the PREFIX of PREFIX.bin and PREFIX.idx")
    tokenizer = load_tokenizer(tokenizer_type, tokenizer_model)
    index = read_index(idx_path)
    tokens = _check_bin(bin_path, index)
    per_document = _document_token_counts(index)
    if not np.any(per_document > 0):
        raise DataError(f"{prefix}: no document with a token in it ({index.documents} documents)")
    smallest, largest = _id_range(tokens)
    if largest >= tokenizer.vocab_size:
        raise DataError(f"{bin_path} holds token id {largest}, outside the vocabulary of {tokenizer_model} "
                        f"({tokenizer.vocab_size} ids): give the tokenizer that made this dataset")
    if smallest < 0:
        raise DataError(f"{bin_path} holds the negative token id {smallest}: not a tokenized corpus")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards = _write_shards(out, index, tokens, per_document, shard_size_bytes)
    settings = {"source": "megatron_indexed_dataset", "token_dtype": np.dtype(index.dtype).name,
                "shard_size_bytes": shard_size_bytes}
    inputs = [{"name": path.name, "bytes": path.stat().st_size} for path in (bin_path, idx_path)]
    description = tokenizer_description(tokenizer)
    manifest = build_manifest(fingerprint=fingerprint_of(settings, description["identity"], inputs),
                              tokenizer=description, settings=settings, inputs=inputs, shards=shards,
                              rejected={"empty": int(np.count_nonzero(per_document == 0))})
    atomic_write_json(out / MANIFEST_NAME, manifest)
    return manifest


def _document_token_counts(index: MegatronIndex) -> np.ndarray:
    """Tokens per document."""
    cumulative = np.concatenate([[0], np.cumsum(index.sequence_lengths, dtype=np.int64)])
    return cumulative[index.document_index[1:]] - cumulative[index.document_index[:-1]]


def _write_shards(out: Path, index: MegatronIndex, tokens: np.ndarray, per_document: np.ndarray,
                  shard_size_bytes: int) -> list[dict]:
    """Documents with at least one token, in order, cut into shards of about `shard_size_bytes` of int32 ids."""
    token_start = np.concatenate([[0], np.cumsum(per_document, dtype=np.int64)])
    kept = np.flatnonzero(per_document > 0)
    shards, first_document, begin = [], 0, 0
    kept_ends = token_start[kept + 1]  # where each kept document's tokens end
    while begin < len(kept):  # a shard: the kept documents that end within the budget (at least one)
        limit = token_start[kept[begin]] + shard_size_bytes // 4
        end = max(begin + 1, int(np.searchsorted(kept_ends, limit, side="right")))
        documents = kept[begin:end]
        shard = _encode(index, tokens, token_start, documents)
        name = shard_name(len(shards))
        atomic_write_bytes(out / name, shard)
        shards.append({"file": name, "documents": len(documents), "tokens": int(per_document[documents].sum()),
                       "bytes": len(shard), "sha256": hashlib.sha256(shard).hexdigest(),
                       "first_document": first_document})
        first_document += len(documents)
        begin = end
    return shards


def _encode(index: MegatronIndex, tokens: np.ndarray, token_start: np.ndarray, documents: np.ndarray) -> bytes:
    """One shard of the given documents: their tokens (int32) and sentence lengths, with offsets."""
    doc_tokens = [np.asarray(tokens[token_start[d]:token_start[d + 1]], dtype=np.int32) for d in documents]
    sentences = [index.sequence_lengths[index.document_index[d]:index.document_index[d + 1]] for d in documents]
    sentences = [lengths[lengths > 0] for lengths in sentences]  # an empty sequence is no sentence
    token_offsets = np.concatenate([[0], np.cumsum([len(t) for t in doc_tokens], dtype=np.int64)]).astype(np.int32)
    sentence_offsets = np.concatenate([[0], np.cumsum([len(s) for s in sentences], dtype=np.int64)]).astype(np.int32)
    flat_tokens = np.concatenate(doc_tokens) if doc_tokens else np.zeros(0, np.int32)
    flat_sentences = np.concatenate(sentences).astype(np.int32) if sentences else np.zeros(0, np.int32)
    return encode_shard(flat_tokens, token_offsets, flat_sentences, sentence_offsets)
