"""The on-disk format: Arrow IPC stream shards, one row per document, and an `index.json` manifest.

Stream format (not the random-access "file" format) because that is what `datasets.Dataset.from_file`
memory-maps; plain `pyarrow.ipc.open_stream` reads it too. Each shard is a single record batch, so a
memory-mapped read gives zero-copy numpy views of the flat token array and its offsets.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
from pathlib import Path

import numpy as np
import pyarrow as pa

from megatron_narrow.file_safety import confined

FORMAT_NAME = "megatron_narrow.documents"
FORMAT_VERSION = 1
MANIFEST_NAME = "index.json"

SCHEMA = pa.schema(
    [
        pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("sentence_lengths", pa.list_(pa.int32()), nullable=False),
    ]
)


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.arrow"


TEMP_NAME = re.compile(r"\.\d+\.[0-9a-f]{8}\.tmp$")
"""Temp files are `NAME.<pid>.<hex>.tmp`: two writers of one file (a run and a leftover of a killed one)
never share a temp file, and a run cleaning up at start can tell them from anything else."""


def temp_path(path: Path) -> Path:
    """A temp file beside `path` that no other process or call uses (see TEMP_NAME)."""
    return path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def is_temp_file(path: Path) -> bool:
    return TEMP_NAME.search(path.name) is not None


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file so that it either does not exist or is complete: temp file, fsync, rename."""
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: dict) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode("utf-8"))


def encode_shard(doc_tokens: np.ndarray, doc_token_offsets: np.ndarray, sent_lengths: np.ndarray,
                 doc_sentence_offsets: np.ndarray) -> bytes:
    """Serialise documents given as flat arrays plus int32 offsets (len = documents + 1)."""
    input_ids = pa.ListArray.from_arrays(pa.array(doc_token_offsets, pa.int32()), pa.array(doc_tokens, pa.int32()))
    sentences = pa.ListArray.from_arrays(
        pa.array(doc_sentence_offsets, pa.int32()), pa.array(sent_lengths, pa.int32())
    )
    batch = pa.RecordBatch.from_arrays([input_ids, sentences], schema=SCHEMA)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, SCHEMA) as writer:
        writer.write_batch(batch)
    return sink.getvalue().to_pybytes()


def sha256_file(path: Path, block: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


class DataError(ValueError):
    """The data on disk disagrees with its manifest, or with the model that wants to read it."""


MANIFEST_KEYS = ("format", "format_version", "tokenizer", "shards", "totals")
TOKENIZER_KEYS = ("file", "identity", "vocab_size", "special_ids")
TOTALS_KEYS = ("documents", "tokens", "shards")
SHARD_KEYS = ("file", "documents", "bytes", "sha256")
REPAIR_HINT = "preprocess the corpus again with tools/preprocess_data.py"


def load_manifest(data_dir: str | Path) -> dict:
    """Read and check index.json; a damaged one is a DataError naming the file, never a KeyError later."""
    path = Path(data_dir) / MANIFEST_NAME
    if not path.is_file():
        raise DataError(f"{path} does not exist: is {data_dir} a directory written by tools/preprocess_data.py?")
    try:
        manifest = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"{path} is not valid JSON ({error}); {REPAIR_HINT}") from None
    if not isinstance(manifest, dict):
        raise DataError(f"{path} holds a JSON {type(manifest).__name__}, not an object; {REPAIR_HINT}")
    if manifest.get("format") != FORMAT_NAME or manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(
            f"{path}: format {manifest.get('format')!r} version {manifest.get('format_version')!r}, "
            f"expected {FORMAT_NAME!r} version {FORMAT_VERSION}"
        )
    missing = _missing_manifest_keys(manifest)
    if missing:
        raise DataError(f"{path} lacks {', '.join(missing[:5])} (damaged or edited); {REPAIR_HINT}")
    for shard in manifest["shards"]:
        try:
            confined(data_dir, str(shard["file"]), what=str(path))
        except ValueError as error:
            raise DataError(str(error)) from None
    return manifest


def _missing_manifest_keys(manifest: dict) -> list[str]:
    """The keys readers rely on that a manifest lacks (or holds with the wrong shape), as dotted paths."""
    missing = [key for key in MANIFEST_KEYS if key not in manifest]
    shards = manifest.get("shards", [])
    if not isinstance(shards, list):
        return [*missing, "shards (a list)"]
    sections = [(name, manifest[name], keys) for name, keys in (("tokenizer", TOKENIZER_KEYS), ("totals", TOTALS_KEYS))
                if name in manifest]
    sections += [(f"shards[{index}]", entry, SHARD_KEYS) for index, entry in enumerate(shards)]
    for name, section, keys in sections:
        missing += [f"{name}.{key}" for key in keys if not isinstance(section, dict) or key not in section]
    return missing


def check_tokenizer_matches(manifest: dict, *, identity: str | None, vocab_size: int | None, where: str) -> None:
    """Refuse data tokenized with another tokenizer or another vocabulary size than the model's."""
    recorded = manifest["tokenizer"]
    if vocab_size is not None and recorded["vocab_size"] != vocab_size:
        raise DataError(
            f"{where}: data was tokenized with vocabulary size {recorded['vocab_size']} but the model expects "
            f"{vocab_size}; preprocess again with the model's tokenizer"
        )
    if identity is not None and recorded["identity"] != identity:
        raise DataError(
            f"{where}: data was tokenized with {recorded['file']} ({recorded['identity'][:19]}...) but the model's "
            f"tokenizer is {identity[:19]}...; preprocess again with the model's tokenizer"
        )


def dataset_fingerprint(data_dir: str | Path) -> str:
    """sha256 of the manifest, which names every shard's size and sha256: what the dataset is, for cache keys."""
    return hashlib.sha256((Path(data_dir) / "index.json").read_bytes()).hexdigest()


def _list_views(array: pa.ListArray) -> tuple[np.ndarray, np.ndarray]:
    """(values, offsets) of a list<int32> array as numpy views of its buffers. pyarrow's to_numpy reads every
    page of a memory-mapped buffer even when it copies nothing (measured: 47 MB of RSS for a 176 MB shard);
    a view over the buffer touches only what is read later."""
    offsets = np.frombuffer(array.buffers()[1], dtype=np.int32)[array.offset:array.offset + len(array) + 1]
    values = array.values
    data = values.buffers()[1]
    flat = np.frombuffer(data, dtype=np.int32) if data is not None else np.zeros(0, dtype=np.int32)
    return flat[values.offset:values.offset + len(values)], offsets


def _ranges(counts: np.ndarray) -> np.ndarray:
    """0..c-1 for each c of `counts`, concatenated (vectorised)."""
    total = int(counts.sum())
    return np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)


class IndexedDocuments:
    """Memory-mapped shards of a preprocessed dataset; random access by global document index.

    Opening checks the manifest against the files (shard count, each file's size) and every token id
    against the vocabulary (one vectorised pass over each shard's memory-mapped ids: a flipped byte
    would otherwise surface as an IndexError deep into training); `verify()` also compares checksums.
    All name the offending shard.
    """

    def __init__(self, data_dir: str | Path, *, expected_identity: str | None = None,
                 expected_vocab_size: int | None = None, verify_checksums: bool = False,
                 check_token_ids: bool = True) -> None:
        """check_token_ids=False skips the pass over every token id (O(tokens) at every start) for a caller that
        runs `check_token_ids()` itself once per dataset (training/data.py records it beside its index cache)."""
        from megatron_narrow.data.tokenizer import SpecialTokens

        self.data_dir = Path(data_dir)
        self.manifest = load_manifest(self.data_dir)
        # what the dataset is, for cache keys: the manifest names every shard's size and sha256
        self.fingerprint = dataset_fingerprint(self.data_dir)
        check_tokenizer_matches(self.manifest, identity=expected_identity, vocab_size=expected_vocab_size,
                                where=str(self.data_dir))
        self.vocab_size = int(self.manifest["tokenizer"]["vocab_size"])
        self.special = SpecialTokens(**self.manifest["tokenizer"]["special_ids"])
        self.check_not_empty()
        self.check_files()
        if verify_checksums:
            self.verify()

        self._tokens: list[np.ndarray] = []
        self._token_offsets: list[np.ndarray] = []
        self._sent_lengths: list[np.ndarray] = []
        self._sent_offsets: list[np.ndarray] = []
        self._tables: list[pa.Table] = []  # keeps the memory maps alive
        doc_counts = []
        for entry in self.manifest["shards"]:
            path = self.data_dir / entry["file"]
            try:
                table = pa.ipc.open_stream(pa.memory_map(str(path), "r")).read_all()
            except (pa.ArrowInvalid, OSError) as error:
                raise DataError(f"shard {entry['file']} in {self.data_dir} cannot be read: {error}") from error
            if table.num_rows != entry["documents"]:
                raise DataError(
                    f"shard {entry['file']} in {self.data_dir} holds {table.num_rows} documents, "
                    f"manifest says {entry['documents']}"
                )
            table = table.combine_chunks()
            self._tables.append(table)
            ids, sents = table.column("input_ids"), table.column("sentence_lengths")
            ids_array = ids.chunk(0) if ids.num_chunks else pa.array([], pa.list_(pa.int32()))
            sents_array = sents.chunk(0) if sents.num_chunks else pa.array([], pa.list_(pa.int32()))
            tokens, token_offsets = _list_views(ids_array)
            self._tokens.append(tokens)
            self._token_offsets.append(token_offsets)
            sentence_lengths, sentence_offsets = _list_views(sents_array)
            self._sent_lengths.append(sentence_lengths)
            self._sent_offsets.append(sentence_offsets)
            doc_counts.append(table.num_rows)
        self._shard_starts = np.concatenate([[0], np.cumsum(doc_counts, dtype=np.int64)])
        if check_token_ids:
            self.check_token_ids()

    def check_token_ids(self) -> None:
        """Every token id of every shard must index the vocabulary (one vectorised pass per shard)."""
        for entry, tokens in zip(self.manifest["shards"], self._tokens, strict=True):
            self._check_token_ids(entry["file"], tokens)

    def check_not_empty(self) -> None:
        """A dataset without documents (every record rejected, e.g. a wrong --json-keys) cannot train."""
        if self.manifest["totals"]["documents"] > 0:
            return
        rejected = ", ".join(f"{k} {v}" for k, v in self.manifest.get("rejected", {}).items() if v) or "none"
        raise DataError(
            f"{self.data_dir} holds 0 documents (rejected records: {rejected}); {REPAIR_HINT} "
            "with the right --json-keys / --input-format"
        )

    def _check_token_ids(self, file: str, ids: np.ndarray) -> None:
        """Every id must index the vocabulary; the uint32 view folds negative ids into the same max."""
        if not len(ids) or int(ids.view(np.uint32).max()) < self.vocab_size:
            return
        bad = np.flatnonzero(ids.view(np.uint32) >= self.vocab_size)
        raise DataError(
            f"shard {file} in {self.data_dir} holds token id {int(ids[bad[0]])} (at token {int(bad[0])}; "
            f"{len(bad)} ids out of range) but the vocabulary has {self.vocab_size}: the file is corrupt; "
            f"run tools/verify_data.py {self.data_dir}, then {REPAIR_HINT}"
        )

    def check_files(self) -> None:
        shards = self.manifest["shards"]
        present = sorted(p.name for p in self.data_dir.glob("shard_*.arrow"))
        if len(present) != len(shards):
            missing = sorted({s["file"] for s in shards} - set(present))
            raise DataError(
                f"{self.data_dir}: manifest lists {len(shards)} shards, found {len(present)} on disk"
                + (f"; missing: {', '.join(missing[:5])}" if missing else "")
            )
        for entry in shards:
            path = self.data_dir / entry["file"]
            if not path.is_file():
                raise DataError(f"shard {entry['file']} listed in {self.data_dir}/index.json is missing")
            size = path.stat().st_size
            if size != entry["bytes"]:
                raise DataError(
                    f"shard {entry['file']} in {self.data_dir} is {size} bytes, manifest says {entry['bytes']} "
                    "(truncated or modified)"
                )

    def verify(self) -> None:
        """Compare every shard's sha256 with the manifest; raise naming the first shard that differs."""
        for entry in self.manifest["shards"]:
            digest = sha256_file(self.data_dir / entry["file"])
            if digest != entry["sha256"]:
                raise DataError(
                    f"shard {entry['file']} in {self.data_dir} fails its checksum (sha256 {digest[:16]}..., "
                    f"manifest {entry['sha256'][:16]}...): the file is corrupt; {REPAIR_HINT}"
                )

    def __len__(self) -> int:
        return int(self._shard_starts[-1])

    def _locate(self, index: int) -> tuple[int, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"document {index} out of range [0, {len(self)})")
        shard = int(np.searchsorted(self._shard_starts, index, side="right")) - 1
        return shard, index - int(self._shard_starts[shard])

    def tokens(self, index: int) -> np.ndarray:
        shard, row = self._locate(index)
        offsets = self._token_offsets[shard]
        return self._tokens[shard][offsets[row]:offsets[row + 1]]

    def sentence_lengths(self, index: int) -> np.ndarray:
        shard, row = self._locate(index)
        offsets = self._sent_offsets[shard]
        return self._sent_lengths[shard][offsets[row]:offsets[row + 1]]

    def sentence_lengths_of(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(lengths of every sentence of documents `indices`, in order; sentences per document), sliced from
        the shards' buffers with numpy: no Python call per document (see data.documents)."""
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"document indices must lie in [0, {len(self)})")
        if indices.size > 1 and (np.diff(indices) < 0).any():  # the fast path wants shard order
            order = np.argsort(indices, kind="stable")
            lengths, counts = self.sentence_lengths_of(indices[order])
            starts = np.cumsum(counts) - counts
            inverse = np.empty_like(order)
            inverse[order] = np.arange(order.size)
            counts_out = counts[inverse]
            take = np.repeat(starts[inverse], counts_out) + _ranges(counts_out)
            return lengths[take], counts_out
        bounds = np.searchsorted(indices, self._shard_starts)  # indices are ascending here
        parts, counts = [], []
        for shard in range(len(self._shard_starts) - 1):
            if bounds[shard] == bounds[shard + 1]:
                continue
            rows = indices[bounds[shard]:bounds[shard + 1]] - self._shard_starts[shard]
            offsets = self._sent_offsets[shard]
            first, end = offsets[rows].astype(np.int64), offsets[rows + 1].astype(np.int64)
            counts.append(end - first)
            parts.append(self._sent_lengths[shard][np.repeat(first, end - first) + _ranges(end - first)])
        if not parts:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        return np.concatenate(parts).astype(np.int64), np.concatenate(counts)

    def document_lengths(self) -> np.ndarray:
        """int64[documents]: tokens per document, for building sample indices without touching tokens."""
        return np.concatenate([np.diff(o).astype(np.int64) for o in self._token_offsets] or [np.zeros(0, np.int64)])
