"""Parallel, deterministic, resumable tokenization of raw corpora into Arrow shards.

How the guarantees are met:
- Determinism for any worker count: the input is cut into chunks by raw-byte size at record
  boundaries, independently of the workers; chunk i becomes shard i, whoever tokenizes it.
- Resume after SIGKILL: a finished shard is renamed into place, then a small progress record naming
  its input checksum is renamed into `.progress/`. A rerun skips chunks whose record matches and redoes
  the rest; the manifest is written last, from the records alone, so it has no timing in it.
- Bad input costs nothing: every record is classified, rejects are counted by kind (and written to the
  reject file with their source and line), and every valid record becomes exactly one document.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from itertools import chain
from pathlib import Path

import numpy as np

from megatron_narrow.data.raw_input import (
    REJECT_KINDS,
    Chunk,
    InputFormat,
    Record,
    Rejected,
    TextMode,
    chunk_records,
    document_text,
    iter_chunks,
)
from megatron_narrow.data.shards import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    atomic_write_bytes,
    atomic_write_json,
    encode_shard,
    shard_name,
)
from megatron_narrow.data.tokenizer import TokenizerType, load_tokenizer, tokenizer_description

PROGRESS_DIR = ".progress"
TOKENIZE_BATCH_BYTES = 1 << 21  # tokenize ~2 MB of text at a time: bounded memory, long enough batches


@dataclass(kw_only=True, slots=True)
class PreprocessConfig:
    """Everything that decides the output bytes, plus the worker count and reject file (which do not)."""

    inputs: list[str]
    """Input files: JSONL or plain text, optionally gzipped (.gz)."""

    output_dir: str
    """Directory for index.json and the shards."""

    tokenizer_type: TokenizerType
    """sentencepiece (.model) or wordpiece (vocab.txt or tokenizer.json)."""

    tokenizer_model: str
    """Path of the tokenizer file."""

    workers: int = 1
    """Tokenizing processes; the output is byte-identical for any value."""

    json_keys: list[str] = field(default_factory=lambda: ["text"])
    """JSONL keys whose string values form the document, in order, each starting a new paragraph."""

    input_format: InputFormat = "auto"
    """auto: .jsonl/.json (optionally .gz) is JSONL, anything else plain text."""

    text_mode: TextMode = "line"
    """Plain text: one document per line, or one per block of lines separated by blank lines."""

    split_sentences: bool = False
    """Split paragraphs into sentences (blingfire, no download); otherwise a paragraph is one sentence."""

    max_document_bytes: int = 10_000_000
    """Documents whose UTF-8 text is larger are rejected as too_large."""

    shard_size_bytes: int = 256 << 20
    """Raw input bytes per shard; bounds each shard's size and each worker's memory."""

    reject_file: str | None = None
    """Where rejected records go (JSONL: kind, source, line, record); None keeps counts only."""

    overwrite: bool = False
    """Replace an output directory that holds a different dataset instead of refusing."""

    progress: bool = True
    """Show a progress bar and a closing summary on stderr."""

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ValueError("preprocess: give at least one --input file")
        for path in self.inputs:
            if not Path(path).is_file():
                raise ValueError(f"preprocess: input {path} does not exist")
        if self.workers < 1:
            raise ValueError(f"preprocess: --workers must be >= 1, got {self.workers}")
        if not self.json_keys:
            raise ValueError("preprocess: --json-keys needs at least one key")
        if self.max_document_bytes < 1:
            raise ValueError(f"preprocess: --max-document-bytes must be positive, got {self.max_document_bytes}")
        if self.shard_size_bytes < 1:
            raise ValueError(f"preprocess: the shard size must be positive, got {self.shard_size_bytes}")

    def output_settings(self) -> dict:
        """The settings that determine the output bytes (workers, reject file and progress do not)."""
        settings = asdict(self)
        for key in ("inputs", "output_dir", "tokenizer_model", "workers", "reject_file", "overwrite", "progress"):
            settings.pop(key)
        return settings


@lru_cache(maxsize=4)
def _cached_tokenizer(kind: str, path: str):
    """One tokenizer per worker process, loaded in the worker (never inherited across fork)."""
    return load_tokenizer(kind, path)


@lru_cache(maxsize=1)
def _sentence_splitter():
    import blingfire

    return blingfire.text_to_sentences


def split_paragraphs(text: str, split_sentences: bool) -> list[str]:
    paragraphs = [p for p in text.splitlines() if p.strip()]
    if not split_sentences:
        return paragraphs
    splitter = _sentence_splitter()
    return [s for p in paragraphs for s in splitter(p).split("\n") if s.strip()]


@dataclass(slots=True)
class ShardResult:
    """What a worker reports for one chunk; also the progress record that lets a rerun skip it."""

    index: int
    file: str
    input_sha256: str
    input_bytes: int
    documents: int
    tokens: int
    bytes: int
    sha256: str
    rejected: dict[str, int]
    fingerprint: str


def process_chunk(chunk: Chunk, config: PreprocessConfig, fingerprint: str) -> ShardResult:
    """Validate, split and tokenize one chunk; write its shard, rejects and progress record atomically."""
    tokenizer = _cached_tokenizer(config.tokenizer_type, config.tokenizer_model)
    out = Path(config.output_dir)
    rejected = dict.fromkeys(REJECT_KINDS, 0)
    reject_lines: list[bytes] = []
    token_parts: list[np.ndarray] = []
    sentence_parts: list[np.ndarray] = []
    sentences_per_doc: list[int] = []
    pending: list[list[str]] = []
    pending_bytes = 0

    def flush() -> None:
        nonlocal pending, pending_bytes
        flat = [s for doc in pending for s in doc]
        ids = tokenizer.encode_batch(flat) if flat else []
        lengths = np.fromiter(map(len, ids), dtype=np.int32, count=len(ids))
        token_parts.append(np.fromiter(chain.from_iterable(ids), dtype=np.int32, count=int(lengths.sum())))
        # sentences that tokenize to nothing (stray control characters) are dropped
        start = 0
        for doc in pending:
            doc_lengths = lengths[start:start + len(doc)]
            start += len(doc)
            doc_lengths = doc_lengths[doc_lengths > 0]
            sentence_parts.append(doc_lengths)
            sentences_per_doc.append(len(doc_lengths))
        pending, pending_bytes = [], 0

    for record in chunk_records(chunk):
        try:
            text = document_text(record, is_json=chunk.is_json, json_keys=config.json_keys,
                                 max_bytes=config.max_document_bytes)
        except Rejected as reject:
            rejected[reject.kind] += 1
            if config.reject_file:
                reject_lines.append(_reject_line(reject.kind, config.inputs[record.source], record))
            continue
        pending.append(split_paragraphs(text, config.split_sentences))
        pending_bytes += len(record.data)
        if pending_bytes >= TOKENIZE_BATCH_BYTES:
            flush()
    flush()

    tokens = np.concatenate(token_parts)
    # a chunk whose every record was rejected still becomes a (valid, empty) shard
    sentence_lengths = np.concatenate([np.zeros(0, np.int32), *sentence_parts]).astype(np.int32)
    sentence_offsets = np.concatenate([[0], np.cumsum(sentences_per_doc)]).astype(np.int32)
    token_offsets = np.concatenate([[0], np.cumsum(sentence_lengths, dtype=np.int64)])[sentence_offsets]
    if token_offsets[-1] >= 2**31:
        raise ValueError(f"chunk {chunk.index} has over 2^31 tokens; lower the shard size")
    data = encode_shard(tokens, token_offsets.astype(np.int32), sentence_lengths, sentence_offsets)

    name = shard_name(chunk.index)
    atomic_write_bytes(out / name, data)
    progress = out / PROGRESS_DIR
    if config.reject_file:
        atomic_write_bytes(progress / f"{name}.rejects.jsonl", b"".join(reject_lines))
    result = ShardResult(
        index=chunk.index, file=name, input_sha256=chunk.input_sha256, input_bytes=len(chunk.data),
        documents=len(sentences_per_doc), tokens=int(len(tokens)), bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(), rejected=rejected, fingerprint=fingerprint,
    )
    atomic_write_json(progress / f"{name}.json", asdict(result))
    return result


def _reject_line(kind: str, source: str, record: Record) -> bytes:
    entry = {"kind": kind, "source": source, "line": record.line,
             "record": record.data.decode("utf-8", errors="replace")}
    return (json.dumps(entry, ensure_ascii=False) + "\n").encode("utf-8")


def _finished(chunk: Chunk, config: PreprocessConfig, fingerprint: str) -> ShardResult | None:
    """The progress record of a chunk an earlier run finished, if its inputs and shard still match."""
    out = Path(config.output_dir)
    name = shard_name(chunk.index)
    record_path = out / PROGRESS_DIR / f"{name}.json"
    if not record_path.is_file():
        return None
    try:
        result = ShardResult(**json.loads(record_path.read_text()))
    except (json.JSONDecodeError, TypeError):
        return None
    shard = out / name
    if (result.fingerprint != fingerprint or result.input_bytes != len(chunk.data)
            or not shard.is_file() or shard.stat().st_size != result.bytes
            or result.input_sha256 != chunk.input_sha256):
        return None
    if config.reject_file and not (out / PROGRESS_DIR / f"{name}.rejects.jsonl").is_file():
        return None
    return result


def _prepare_output(config: PreprocessConfig, fingerprint: str) -> bool:
    """Create the output directory; True when it already holds this exact dataset (nothing to do)."""
    out = Path(config.output_dir)
    manifest_path = out / MANIFEST_NAME
    if manifest_path.is_file():
        try:
            previous = json.loads(manifest_path.read_text()).get("fingerprint")
        except json.JSONDecodeError:
            previous = None
        if previous == fingerprint and (not config.reject_file or Path(config.reject_file).is_file()):
            return True
        if previous != fingerprint and not config.overwrite:
            raise ValueError(
                f"{out} already holds a dataset preprocessed with other inputs or settings; "
                "choose another --output-dir or pass --overwrite"
            )
        manifest_path.unlink()
    (out / PROGRESS_DIR).mkdir(parents=True, exist_ok=True)
    for tmp in chain(out.glob("*.tmp"), (out / PROGRESS_DIR).glob("*.tmp")):
        tmp.unlink()
    return False


def run_fingerprint(config: PreprocessConfig, tokenizer_identity: str) -> str:
    inputs = [(Path(p).name, Path(p).stat().st_size) for p in config.inputs]
    blob = json.dumps({"settings": config.output_settings(), "tokenizer": tokenizer_identity, "inputs": inputs},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def preprocess(config: PreprocessConfig) -> dict:
    """Run the whole preprocessing; returns the manifest that was written."""
    tokenizer = load_tokenizer(config.tokenizer_type, config.tokenizer_model)  # validates before any work
    description = tokenizer_description(tokenizer)
    del tokenizer  # workers load their own
    fingerprint = run_fingerprint(config, description["identity"])
    out = Path(config.output_dir)
    if _prepare_output(config, fingerprint):
        manifest = json.loads((out / MANIFEST_NAME).read_text())
        if config.progress:
            print(f"{out} already holds this dataset ({manifest['totals']['documents']} documents); "
                  "nothing to do", file=sys.stderr)
        return manifest

    total_bytes = sum(Path(p).stat().st_size for p in config.inputs)
    position = [0]
    chunks = iter_chunks(config.inputs, chunk_bytes=config.shard_size_bytes, input_format=config.input_format,
                         text_mode=config.text_mode, position=position)
    meter = _Progress(total_bytes, enabled=config.progress)
    results: list[ShardResult] = []

    def consume(result: ShardResult, input_position: int, skipped: bool) -> None:
        results.append(result)
        meter.update(input_position, result, skipped)

    if config.workers == 1:
        for chunk in chunks:
            done = _finished(chunk, config, fingerprint)
            consume(done or process_chunk(chunk, config, fingerprint), position[0], done is not None)
    else:
        context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
        with cf.ProcessPoolExecutor(config.workers, mp_context=context, initializer=_single_threaded_worker) as pool:
            in_flight: deque[tuple[cf.Future | ShardResult, int]] = deque()
            for chunk in chunks:
                done = _finished(chunk, config, fingerprint)
                job = done or pool.submit(process_chunk, chunk, config, fingerprint)
                in_flight.append((job, position[0]))
                while len(in_flight) > 2 * config.workers:  # bounded memory: a few chunks in flight
                    _drain_one(in_flight, consume)
            while in_flight:
                _drain_one(in_flight, consume)

    manifest = _write_outputs(config, description, fingerprint, results)
    meter.close(manifest)
    return manifest


def _single_threaded_worker() -> None:
    """One core per worker: N workers on N cores beat N workers each spawning N tokenizer threads."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _drain_one(in_flight: deque, consume) -> None:
    job, input_position = in_flight.popleft()
    if isinstance(job, ShardResult):
        consume(job, input_position, True)
    else:
        consume(job.result(), input_position, False)


def _write_outputs(config: PreprocessConfig, tokenizer: dict, fingerprint: str, results: list[ShardResult]) -> dict:
    out = Path(config.output_dir)
    rejected = dict.fromkeys(REJECT_KINDS, 0)
    shards = []
    first_document = 0
    for result in results:
        for kind, count in result.rejected.items():
            rejected[kind] += count
        shards.append({"file": result.file, "documents": result.documents, "tokens": result.tokens,
                       "bytes": result.bytes, "sha256": result.sha256, "first_document": first_document})
        first_document += result.documents
    if config.reject_file:
        reject_path = Path(config.reject_file)
        reject_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = reject_path.with_name(reject_path.name + ".tmp")
        with open(tmp, "wb") as f:
            for result in results:
                with open(out / PROGRESS_DIR / f"{result.file}.rejects.jsonl", "rb") as part:
                    shutil.copyfileobj(part, f)
        tmp.replace(reject_path)
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "tokenizer": tokenizer,
        "schema": {"input_ids": "list<int32>", "sentence_lengths": "list<int32>"},
        "settings": config.output_settings(),
        "inputs": [{"name": Path(p).name, "bytes": Path(p).stat().st_size} for p in config.inputs],
        "shards": shards,
        "totals": {
            "documents": sum(s["documents"] for s in shards),
            "tokens": sum(s["tokens"] for s in shards),
            "bytes": sum(s["bytes"] for s in shards),
            "shards": len(shards),
        },
        "rejected": rejected,
        "rejected_total": sum(rejected.values()),
    }
    listed = {s["file"] for s in shards}
    for stale in out.glob("shard_*.arrow"):  # left by an earlier, different run in this directory
        if stale.name not in listed:
            stale.unlink()
    atomic_write_json(out / MANIFEST_NAME, manifest)
    shutil.rmtree(out / PROGRESS_DIR)
    return manifest


class _Progress:
    """tqdm bar over input bytes with documents/s and tokens/s, and a closing summary."""

    def __init__(self, total_bytes: int, *, enabled: bool) -> None:
        self.enabled = enabled
        self.start = time.perf_counter()
        self.documents = self.tokens = self.skipped = 0
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="preprocess", file=sys.stderr,
                            dynamic_ncols=True)

    def update(self, input_position: int, result: ShardResult, skipped: bool) -> None:
        self.documents += result.documents
        self.tokens += result.tokens
        self.skipped += skipped
        if self.bar is not None:
            self.bar.update(max(0, input_position - self.bar.n))
            elapsed = max(time.perf_counter() - self.start, 1e-9)
            self.bar.set_postfix(docs_per_s=f"{self.documents / elapsed:,.0f}",
                                 tokens_per_s=f"{self.tokens / elapsed:,.0f}", refresh=False)

    def close(self, manifest: dict) -> None:
        if self.bar is None:
            return
        self.bar.close()
        elapsed = time.perf_counter() - self.start
        totals = manifest["totals"]
        rejects = ", ".join(f"{k} {v}" for k, v in manifest["rejected"].items() if v) or "none"
        print(
            f"preprocessed {totals['documents']:,} documents, {totals['tokens']:,} tokens into {totals['shards']} "
            f"shards ({totals['bytes'] / 2**20:,.1f} MiB) in {elapsed:,.1f} s "
            f"({totals['tokens'] / max(elapsed, 1e-9):,.0f} tokens/s); "
            f"{self.skipped} shards reused from an earlier run; rejected: {rejects}",
            file=sys.stderr,
        )
