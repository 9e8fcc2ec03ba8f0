"""Parallel, deterministic, resumable tokenization of raw corpora into Arrow shards.

How the guarantees are met:
- Determinism for any worker count: the input is cut into work chunks by raw-byte size at record
  boundaries (`work_chunk_bytes`, small enough to keep every worker busy on a modest corpus), independently
  of the workers; shard k holds work chunks k*m .. k*m + m - 1 (m = shard size / work chunk size),
  whoever tokenized them. Workers tokenize; the main process writes each shard in order.
- Resume after SIGKILL: a finished shard is renamed into place, then a small progress record naming
  its input checksum is renamed into `.progress/`. A rerun skips chunks whose record matches and redoes
  the rest; the manifest is written last, from the records alone, so it has no timing in it.
- Bad input costs nothing: every record is classified, rejects are counted by kind (and written to the
  reject file with their source and line), and every valid record becomes exactly one document. A run
  that keeps no document at all (a wrong --json-keys, say) is refused and writes no manifest.
- One run per output directory: an exclusive flock on OUTPUT_DIR/.lock, holding the runner's pid. Workers
  die with the main process (Linux: PR_SET_PDEATHSIG), so a killed run leaves nothing that could race a
  rerun, and temp files carry pid and a random token, so two writers never share one.
"""

from __future__ import annotations

import concurrent.futures as cf
import fcntl
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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
    check_input_files,
    chunk_records,
    document_text,
    input_bytes,
    iter_chunks,
)
from megatron_narrow.data.shards import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    DataError,
    atomic_write_bytes,
    atomic_write_json,
    encode_shard,
    is_temp_file,
    shard_name,
    temp_path,
)
from megatron_narrow.data.tokenizer import TokenizerType, load_tokenizer, tokenizer_description
from megatron_narrow.data.worker_processes import die_with_parent

PROGRESS_DIR = ".progress"
LOCK_NAME = ".lock"
TOKENIZE_BATCH_BYTES = 1 << 21  # tokenize ~2 MB of text at a time: bounded memory, long enough batches
WORK_CHUNK_BYTES = 4 << 20  # the unit of work: a 40 MB corpus is 10 of them, for up to 10 workers


@dataclass(kw_only=True, slots=True)
class PreprocessConfig:
    """Everything that decides the output bytes, plus the worker count and reject file (which do not)."""

    inputs: list[str]
    """Input files: JSONL or plain text (optionally .gz, .zst, .xz, .bz2), Parquet, or a `datasets` directory
    (save_to_disk) or .arrow file."""

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
    """auto: by name: .jsonl/.json/.ndjson (optionally compressed) JSONL, .parquet Parquet, a `datasets`
    directory or .arrow file arrow, anything else plain text."""

    text_mode: TextMode = "line"
    """Plain text: one document per line, or one per block of lines separated by blank lines."""

    split_sentences: bool = False
    """Split paragraphs into sentences (blingfire, no download); otherwise a paragraph is one sentence."""

    max_document_bytes: int = 10_000_000
    """Documents whose UTF-8 text is larger are rejected as too_large."""

    shard_size_bytes: int = 256 << 20
    """Raw input bytes per shard; bounds each shard's size and the main process's memory."""

    work_chunk_bytes: int = WORK_CHUNK_BYTES
    """Raw input bytes per unit of work (a worker's task); a shard is shard_size_bytes // work_chunk_bytes
    consecutive units (at least one). Part of what decides the output, so fixed by default."""

    reject_file: str | None = None
    """Where rejected records go (JSONL: kind, source, line, record); None keeps counts only."""

    partition: tuple[int, int] | None = None
    """(I, N): process only the I-th of N parts of the inputs (whole files, split by size in input order), for
    one node of a multi-node run; tools/merge_datasets.py joins the N outputs into the single-node dataset."""

    overwrite: bool = False
    """Replace an output directory that holds a different dataset instead of refusing."""

    progress: bool = True
    """Show a progress bar and a closing summary on stderr."""

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ValueError("preprocess: give at least one --input file")
        check_input_files(self.inputs)
        if Path(self.output_dir).exists() and not Path(self.output_dir).is_dir():
            raise ValueError(f"preprocess: --output-dir {self.output_dir} is an existing file, not a directory; "
                             "give the path of a directory (it is created if missing)")
        if self.workers < 1:
            raise ValueError(f"preprocess: --workers must be >= 1, got {self.workers}")
        if not self.json_keys:
            raise ValueError("preprocess: --json-keys needs at least one key")
        if self.max_document_bytes < 1:
            raise ValueError(f"preprocess: --max-document-bytes must be positive, got {self.max_document_bytes}")
        if self.shard_size_bytes < 1:
            raise ValueError(f"preprocess: the shard size must be positive, got {self.shard_size_bytes}")
        if self.work_chunk_bytes < 1:
            raise ValueError(f"preprocess: the work chunk size must be positive, got {self.work_chunk_bytes}")
        if self.partition is not None:
            index, count = self.partition
            if not 0 <= index < count:
                raise ValueError(f"preprocess: --partition {index}/{count}: the part must be in 0..{count - 1}")

    @property
    def my_inputs(self) -> list[str]:
        """The inputs this run tokenizes: all of them, or its partition's (partition_inputs)."""
        if self.partition is None:
            return list(self.inputs)
        return partition_inputs(self.inputs, *self.partition)

    @property
    def chunks_per_shard(self) -> int:
        return max(1, self.shard_size_bytes // self.work_chunk_bytes)

    @property
    def chunk_bytes(self) -> int:
        """The size the inputs are cut at: the work chunk, or the shard if it is smaller."""
        return min(self.work_chunk_bytes, self.shard_size_bytes)

    def output_settings(self) -> dict:
        """The settings that determine the output bytes (workers, reject file and progress do not)."""
        settings = asdict(self)
        for key in ("inputs", "output_dir", "tokenizer_model", "workers", "reject_file", "overwrite", "progress",
                    "partition"):
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
    """What the main process wrote for one shard; also the progress record that lets a rerun skip it."""

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


@dataclass(slots=True)
class TokenizedChunk:
    """A worker's result for one work chunk: its documents as flat arrays, its rejects."""

    tokens: np.ndarray
    sentence_lengths: np.ndarray
    sentences_per_doc: np.ndarray
    rejected: dict[str, int]
    reject_lines: list[bytes]


def tokenize_chunk(chunk: Chunk, config: PreprocessConfig, sources: list[str]) -> TokenizedChunk:
    """Validate, split and tokenize one work chunk (a worker's task; it writes nothing). `sources`: the input
    paths that `record.source` indexes (this run's, config.my_inputs), for the reject file."""
    tokenizer = _cached_tokenizer(config.tokenizer_type, config.tokenizer_model)
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
                reject_lines.append(_reject_line(reject.kind, sources[record.source], record))
            continue
        pending.append(split_paragraphs(text, config.split_sentences))
        pending_bytes += len(record.data)
        if pending_bytes >= TOKENIZE_BATCH_BYTES:
            flush()
    flush()
    return TokenizedChunk(tokens=np.concatenate(token_parts),
                          sentence_lengths=np.concatenate([np.zeros(0, np.int32), *sentence_parts]).astype(np.int32),
                          sentences_per_doc=np.asarray(sentences_per_doc, dtype=np.int64), rejected=rejected,
                          reject_lines=reject_lines)


def group_input_digest(group: list[Chunk]) -> tuple[str, int]:
    """(sha256 over the group's chunk digests, raw bytes): what a shard was made from."""
    digest = hashlib.sha256()
    for chunk in group:
        digest.update(chunk.input_sha256.encode())
    return digest.hexdigest(), sum(len(chunk.data) for chunk in group)


def write_shard(index: int, group: list[Chunk], parts: list[TokenizedChunk], config: PreprocessConfig,
                fingerprint: str) -> ShardResult:
    """Join a shard's tokenized chunks; write the shard, its rejects and its progress record atomically."""
    out = Path(config.output_dir)
    tokens = np.concatenate([np.zeros(0, np.int32), *(part.tokens for part in parts)])
    # a shard whose every record was rejected is still a (valid, empty) shard
    sentence_lengths = np.concatenate([np.zeros(0, np.int32), *(part.sentence_lengths for part in parts)])
    per_doc = np.concatenate([np.zeros(0, np.int64), *(part.sentences_per_doc for part in parts)])
    sentence_offsets = np.concatenate([[0], np.cumsum(per_doc)]).astype(np.int64)
    token_offsets = np.concatenate([[0], np.cumsum(sentence_lengths, dtype=np.int64)])[sentence_offsets]
    if token_offsets[-1] >= 2**31:
        raise ValueError(f"shard {index} has over 2^31 tokens; lower the shard size")
    data = encode_shard(tokens, token_offsets.astype(np.int32), sentence_lengths, sentence_offsets.astype(np.int32))
    name = shard_name(index)
    atomic_write_bytes(out / name, data)
    progress = out / PROGRESS_DIR
    if config.reject_file:
        atomic_write_bytes(progress / f"{name}.rejects.jsonl", b"".join(line for p in parts for line in p.reject_lines))
    rejected = {kind: sum(part.rejected[kind] for part in parts) for kind in REJECT_KINDS}
    input_sha256, input_bytes = group_input_digest(group)
    result = ShardResult(
        index=index, file=name, input_sha256=input_sha256, input_bytes=input_bytes,
        documents=int(per_doc.size), tokens=int(len(tokens)), bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(), rejected=rejected, fingerprint=fingerprint,
    )
    atomic_write_json(progress / f"{name}.json", asdict(result))
    return result


def _reject_line(kind: str, source: str, record: Record) -> bytes:
    entry = {"kind": kind, "source": source, "line": record.line,
             "record": record.data.decode("utf-8", errors="replace")}
    return (json.dumps(entry, ensure_ascii=False) + "\n").encode("utf-8")


def _finished(index: int, group: list[Chunk], config: PreprocessConfig, fingerprint: str) -> ShardResult | None:
    """The progress record of shard `index` an earlier run finished, if its inputs and file still match."""
    out = Path(config.output_dir)
    name = shard_name(index)
    record_path = out / PROGRESS_DIR / f"{name}.json"
    if not record_path.is_file():
        return None
    try:
        result = ShardResult(**json.loads(record_path.read_text()))
    except (json.JSONDecodeError, TypeError):
        return None
    shard = out / name
    input_sha256, input_bytes = group_input_digest(group)
    if (result.fingerprint != fingerprint or result.input_bytes != input_bytes
            or not shard.is_file() or shard.stat().st_size != result.bytes
            or result.input_sha256 != input_sha256):
        return None
    if config.reject_file and not (out / PROGRESS_DIR / f"{name}.rejects.jsonl").is_file():
        return None
    return result


def _prepare_output(config: PreprocessConfig, fingerprint: str) -> bool:
    """Set up the (locked) output directory; True when it already holds this exact dataset (nothing to do)."""
    out = Path(config.output_dir)
    manifest_path = out / MANIFEST_NAME
    if manifest_path.is_file():
        previous, documents = _previous_run(manifest_path)
        # a manifest of 0 documents (written before such runs were refused) is redone, and so refused
        if (previous == fingerprint and documents > 0
                and (not config.reject_file or Path(config.reject_file).is_file())):
            return True
        if previous != fingerprint and not config.overwrite:
            raise ValueError(
                f"{out} already holds a dataset preprocessed with other inputs or settings; "
                "choose another --output-dir or pass --overwrite"
            )
        manifest_path.unlink()
    (out / PROGRESS_DIR).mkdir(parents=True, exist_ok=True)
    for path in chain(out.iterdir(), (out / PROGRESS_DIR).iterdir()):
        if is_temp_file(path):  # left by a killed run; we hold the lock, so no writer is using it
            path.unlink()
    return False


def _previous_run(manifest_path: Path) -> tuple[str | None, int]:
    """Fingerprint and document count of an existing manifest; (None, 0) where it is unreadable."""
    try:
        manifest = json.loads(manifest_path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None, 0
    if not isinstance(manifest, dict):
        return None, 0
    totals = manifest.get("totals")
    documents = totals.get("documents") if isinstance(totals, dict) else None
    return manifest.get("fingerprint"), documents if isinstance(documents, int) else 0


@contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold OUTPUT_DIR/.lock for a whole run: two runs writing one directory would mix their shards.

    flock dies with its holders, so a killed run never leaves a stale lock; forked workers share it,
    so a rerun is refused until they too are gone. The file is removed before it is unlocked, and a
    run that locked a removed file locks the new one instead (see _acquire_lock).
    """
    path = out / LOCK_NAME
    fd = _acquire_lock(path)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)


def _acquire_lock(path: Path) -> int:
    """Lock `path` without waiting; a held lock is a one-line refusal naming the holder's pid."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ValueError(
                f"{path.parent} is in use by another preprocessing run (pid {holder}, lock {path}); "
                "wait for it to finish or stop it, or choose another --output-dir"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        if _is_same_file(fd, path):
            return fd
        os.close(fd)  # the previous holder removed the file between our open and our lock


def _is_same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def partition_inputs(inputs: list[str], index: int, count: int) -> list[str]:
    """Part `index` of `count` of the inputs: whole files, in order, cut where the running total of their sizes
    crosses index/count of all bytes. A pure function of the file list and sizes, so every node agrees."""
    sizes = np.array([input_bytes(p) for p in inputs], dtype=np.float64)
    starts = np.concatenate([[0.0], np.cumsum(sizes)[:-1]]) / max(sizes.sum(), 1.0)
    part = np.minimum((starts * count).astype(np.int64), count - 1)
    return [path for path, owner in zip(inputs, part, strict=True) if owner == index]


def input_list(paths: list[str]) -> list[dict]:
    """The manifest's record of the inputs: names and sizes (paths differ between machines)."""
    return [{"name": Path(p).name, "bytes": input_bytes(p)} for p in paths]


def fingerprint_of(settings: dict, tokenizer_identity: str, inputs: list[dict]) -> str:
    """What a dataset was made from: settings, tokenizer and inputs (never worker counts or paths)."""
    pairs = [(entry["name"], entry["bytes"]) for entry in inputs]
    blob = json.dumps({"settings": settings, "tokenizer": tokenizer_identity, "inputs": pairs}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def run_fingerprint(config: PreprocessConfig, tokenizer_identity: str) -> str:
    """The whole dataset's fingerprint; a partition's adds its part (its output is not the dataset)."""
    fingerprint = fingerprint_of(config.output_settings(), tokenizer_identity, input_list(config.inputs))
    if config.partition is None:
        return fingerprint
    return hashlib.sha256(f"{fingerprint}/partition/{config.partition[0]}/{config.partition[1]}".encode()).hexdigest()


def build_manifest(*, fingerprint: str, tokenizer: dict, settings: dict, inputs: list[dict], shards: list[dict],
                   rejected: dict[str, int]) -> dict:
    """index.json, from what the shards hold: one builder for a run and for a merge of partitions, so that a
    merged dataset's manifest is byte for byte the single-node run's."""
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "tokenizer": tokenizer,
        "schema": {"input_ids": "list<int32>", "sentence_lengths": "list<int32>"},
        "settings": settings,
        "inputs": inputs,
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


def preprocess(config: PreprocessConfig) -> dict:
    """Run the whole preprocessing; returns the manifest that was written."""
    tokenizer = load_tokenizer(config.tokenizer_type, config.tokenizer_model)  # validates before any work
    description = tokenizer_description(tokenizer)
    del tokenizer  # workers load their own
    fingerprint = run_fingerprint(config, description["identity"])
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with output_lock(out):
        if _prepare_output(config, fingerprint):
            manifest = json.loads((out / MANIFEST_NAME).read_text())
            if config.progress:
                print(f"{out} already holds this dataset ({manifest['totals']['documents']} documents); "
                      "nothing to do", file=sys.stderr)
            return manifest
        return _run(config, description, fingerprint)


def _run(config: PreprocessConfig, description: dict, fingerprint: str) -> dict:
    """Tokenize every shard's work chunks (or reuse an earlier run's shard), then write the manifest."""
    mine = config.my_inputs
    total_bytes = sum(input_bytes(p) for p in mine)
    position = [0]
    chunks = iter_chunks(mine, chunk_bytes=config.chunk_bytes, input_format=config.input_format,
                         text_mode=config.text_mode, json_keys=config.json_keys, position=position)
    meter = _Progress(total_bytes, enabled=config.progress)
    results: list[ShardResult] = []

    def consume(result: ShardResult, input_position: int, skipped: bool) -> None:
        results.append(result)
        meter.update(input_position, result, skipped)

    try:
        if config.workers == 1:
            with _one_core():
                _run_inline(config, fingerprint, chunks, mine, position, consume)
        else:
            _run_pool(config, fingerprint, chunks, mine, position, consume)
        if config.partition is None:  # a part may hold no document; the merge refuses an empty whole
            _refuse_empty(config, results)
        manifest = _write_outputs(config, description, fingerprint, results)
    finally:
        meter.close()  # before an error's message, so that it starts on a line of its own
    meter.summary(manifest)
    return manifest


@contextmanager
def _one_core() -> Iterator[None]:
    """--workers 1 tokenizes on one core, as each pool worker does (_init_worker): `tokenizers` would
    otherwise spread a batch over every core, and --workers would not say how many cores a run uses."""
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous


def _run_inline(config: PreprocessConfig, fingerprint: str, chunks: Iterator[Chunk], sources: list[str],
                position: list[int],
                consume: Callable[[ShardResult, int, bool], None]) -> None:
    for index, group in enumerate(_groups(chunks, config.chunks_per_shard)):
        done = _finished(index, group, config, fingerprint)
        parts = [] if done else [tokenize_chunk(chunk, config, sources) for chunk in group]
        result = done or write_shard(index, group, parts, config, fingerprint)
        consume(result, position[0], done is not None)


def _groups(chunks: Iterator[Chunk], size: int) -> Iterator[list[Chunk]]:
    """Consecutive work chunks of one input file, `size` at a time: one shard's worth. A shard never spans
    two files, so a partition of whole files makes exactly the single-node run's shards."""
    group: list[Chunk] = []
    for chunk in chunks:
        if group and (len(group) == size or chunk.source != group[-1].source):
            yield group
            group = []
        group.append(chunk)
    if group:
        yield group


def _run_pool(config: PreprocessConfig, fingerprint: str, chunks: Iterator[Chunk], sources: list[str],
              position: list[int],
              consume: Callable[[ShardResult, int, bool], None]) -> None:
    """Work chunks go to the workers as they are read; shards are written here, in order, once all of their
    chunks are back. At most about two shards' input plus a few chunks per worker are held at once."""
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    with cf.ProcessPoolExecutor(config.workers, mp_context=context, initializer=_init_worker,
                                initargs=(os.getpid(),)) as pool:
        in_flight: deque[tuple[int, list[Chunk], ShardResult | list[cf.Future], int]] = deque()

        def busy() -> int:
            return sum(len(jobs) for _, _, jobs, _ in in_flight if isinstance(jobs, list))

        for index, group in enumerate(_groups(chunks, config.chunks_per_shard)):
            done = _finished(index, group, config, fingerprint)
            jobs = done or [pool.submit(tokenize_chunk, chunk, config, sources) for chunk in group]
            in_flight.append((index, group, jobs, position[0]))
            while len(in_flight) > 1 and busy() > 2 * config.workers + config.chunks_per_shard:
                _drain_one(in_flight, config, fingerprint, consume)
        while in_flight:
            _drain_one(in_flight, config, fingerprint, consume)


def _refuse_empty(config: PreprocessConfig, results: list[ShardResult]) -> None:
    """No document at all is a wrong --json-keys or --input-format, not a dataset: refuse it, before the manifest."""
    if any(result.documents for result in results):
        return
    rejected = {kind: sum(result.rejected[kind] for result in results) for kind in REJECT_KINDS}
    counts = ", ".join(f"{kind} {count}" for kind, count in rejected.items() if count) or "none, the inputs are empty"
    inputs = ", ".join(config.inputs[:5]) + (f" and {len(config.inputs) - 5} more" if len(config.inputs) > 5 else "")
    raise DataError(
        f"no valid documents in {inputs} (rejected records: {counts}); check --json-keys "
        f"(now: {' '.join(config.json_keys)}), --input-format and the inputs"
    )


def _init_worker(parent_pid: int) -> None:
    """Worker set-up: one core per worker (N workers on N cores beat N workers each spawning N tokenizer
    threads), and no life after the main process (see data.worker_processes)."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    die_with_parent(parent_pid)


def _drain_one(in_flight: deque, config: PreprocessConfig, fingerprint: str, consume) -> None:
    """Write the oldest shard in flight once its chunks are tokenized (or report the one a rerun kept)."""
    index, group, jobs, input_position = in_flight.popleft()
    if isinstance(jobs, ShardResult):
        consume(jobs, input_position, True)
    else:
        consume(write_shard(index, group, [job.result() for job in jobs], config, fingerprint), input_position, False)


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
        tmp = temp_path(reject_path)
        with open(tmp, "wb") as f:
            for result in results:
                with open(out / PROGRESS_DIR / f"{result.file}.rejects.jsonl", "rb") as part:
                    shutil.copyfileobj(part, f)
        tmp.replace(reject_path)
    manifest = build_manifest(fingerprint=fingerprint, tokenizer=tokenizer, settings=config.output_settings(),
                              inputs=input_list(config.my_inputs), shards=shards, rejected=rejected)
    if config.partition is not None:  # what tools/merge_datasets.py needs to rebuild the whole dataset's manifest
        manifest["partition"] = {"index": config.partition[0], "count": config.partition[1],
                                 "all_inputs": input_list(config.inputs)}
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

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def summary(self, manifest: dict) -> None:
        if not self.enabled:
            return
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
