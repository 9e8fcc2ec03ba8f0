"""Raw corpus input: cutting files into chunks, splitting chunks into records, validating records.

The main process only cuts: it reads about `chunk_bytes` at a time and extends the cut to the next
record boundary (a newline; a blank line in block mode), so it does C-speed work only. Workers split
their chunk into records and decode them. Chunks never span files, and where a cut falls depends on
the bytes alone, never on the worker count. A UTF-8 byte order mark at the start of a file (editors on
Windows write one) is dropped, so it cannot spoil the first record.

JSONL and text may be compressed (.gz, .zst, .xz, .bz2: decompressed as a stream). Parquet files and
`datasets` directories / .arrow files become the JSONL bytes of their --json-keys columns
(data/columnar_input.py), cut by the same rule, so a corpus gives the same chunks in every form.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import json
import lzma
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

from megatron_narrow.data.columnar_input import is_datasets_directory, iter_jsonl_records
from megatron_narrow.data.shards import DataError

REJECT_KINDS = ("invalid_json", "missing_key", "not_a_string", "invalid_utf8", "empty", "too_large")
UTF8_BOM = b"\xef\xbb\xbf"
COMPRESSION_NAMES = {".gz": "gzip", ".zst": "zstd", ".xz": "xz", ".bz2": "bzip2"}
COMPRESSED_SUFFIXES = tuple(COMPRESSION_NAMES)

InputFormat = Literal["auto", "jsonl", "text", "parquet", "arrow"]
TextMode = Literal["line", "block"]


@dataclass(frozen=True, slots=True)
class Record:
    """One raw input record: its bytes, and where it came from (for the reject file)."""

    source: int
    line: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Chunk:
    """A run of whole records from one input file: the unit of work (preprocess.py groups consecutive
    chunks into shards)."""

    index: int
    source: int
    first_line: int
    data: bytes
    is_json: bool
    block_mode: bool

    @property
    def input_sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


def compression_of(path: str) -> str | None:
    """The compression suffix of `path` (.gz, .zst, .xz, .bz2), if any."""
    return next((suffix for suffix in COMPRESSED_SUFFIXES if path.endswith(suffix)), None)


def input_format_of(path: str, configured: InputFormat) -> Literal["jsonl", "text", "parquet", "arrow"]:
    """The format of one input: the configured one, or by name (a `datasets` directory is arrow)."""
    if configured != "auto":
        return configured
    if is_datasets_directory(path):
        return "arrow"
    suffix = compression_of(path)
    name = path[:-len(suffix)] if suffix else path
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".arrow"):
        return "arrow"
    return "jsonl" if name.endswith((".jsonl", ".json", ".ndjson")) else "text"


def input_bytes(path: str) -> int:
    """On-disk size of an input: the file's, or the files' of a `datasets` directory."""
    if Path(path).is_dir():
        return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
    return Path(path).stat().st_size


def check_input_files(paths: list[str]) -> None:
    """Refuse a missing input or a directory other than a `datasets` one (a common slip: `--input data/` for
    the files in it)."""
    for path in paths:
        if Path(path).is_dir() and not is_datasets_directory(path):
            raise ValueError(f"--input {path} is a directory; give the files in it (e.g. --input "
                             f"{Path(path) / '*.jsonl'}), or a directory written by datasets' save_to_disk")
        if not Path(path).exists():
            raise ValueError(f"input {path} does not exist")


def _decompressed(path: str, raw: BinaryIO) -> BinaryIO:
    """A readable binary stream of `path`'s uncompressed bytes (raw itself when it is not compressed)."""
    suffix = compression_of(path)
    if suffix == ".gz":
        return gzip.open(raw, "rb")
    if suffix == ".xz":
        return lzma.open(raw, "rb")
    if suffix == ".bz2":
        return bz2.open(raw, "rb")
    if suffix == ".zst":
        import pyarrow as pa

        return io.BufferedReader(pa.CompressedInputStream(pa.PythonFile(raw, mode="r"), "zstd"), 1 << 20)
    return raw


def iter_chunks(paths: list[str], *, chunk_bytes: int, input_format: InputFormat, text_mode: TextMode,
                json_keys: list[str], position: list[int] | None = None) -> Iterator[Chunk]:
    """Cut every input into chunks of about `chunk_bytes` at record boundaries, in order.

    `position[0]` is kept at the on-disk bytes consumed so far (compressed bytes for .gz), for an ETA.
    """
    position = position if position is not None else [0]
    index, done_bytes = 0, 0
    for source, path in enumerate(paths):
        fmt = input_format_of(path, input_format)
        if fmt in ("parquet", "arrow"):
            size = input_bytes(path)
            for chunk in _columnar_chunks(path, fmt, json_keys, chunk_bytes, index, source):
                position[0] = done_bytes + int(size * chunk.done)
                yield chunk.chunk
                index += 1
            done_bytes += size
            position[0] = done_bytes
            continue
        is_json = fmt == "jsonl"
        block_mode = not is_json and text_mode == "block"
        first_line, at_start = 1, True
        with open(path, "rb") as raw, _decompressed(path, raw) as f:
            try:
                while data := f.read(chunk_bytes):
                    parts = [data]
                    if not data.endswith(b"\n"):  # complete the last line (b"" at EOF)
                        parts.append(f.readline())
                    if block_mode:  # and in block mode, go on to a blank line so no block is cut
                        last_line = _last_line(b"".join(parts))
                        while last_line.strip() and (line := f.readline()):
                            parts.append(line)
                            last_line = line
                    data = b"".join(parts)
                    if at_start and data.startswith(UTF8_BOM):
                        data = data[len(UTF8_BOM):]
                    at_start = False
                    position[0] = done_bytes + raw.tell()
                    yield Chunk(index, source, first_line, data, is_json, block_mode)
                    index += 1
                    first_line += data.count(b"\n")
            except (EOFError, OSError, zlib.error, lzma.LZMAError) as error:
                if compression_of(path) is None:
                    raise
                raise _decompression_error(path, error) from None
        done_bytes += Path(path).stat().st_size
        position[0] = done_bytes


@dataclass(frozen=True, slots=True)
class _ColumnarChunk:
    chunk: Chunk
    done: float  # fraction of the input read


def _columnar_chunks(path: str, fmt: str, json_keys: list[str], chunk_bytes: int, index: int,
                     source: int) -> Iterator[_ColumnarChunk]:
    """Chunks of a columnar input's canonical JSONL lines, cut as iter_chunks cuts a JSONL file: at the first
    line end at or past `chunk_bytes`."""
    lines: list[bytes] = []
    size, first_line, done = 0, 1, 0.0
    for line, done in iter_jsonl_records(path, fmt, json_keys):
        lines.append(line)
        size += len(line)
        if size >= chunk_bytes:
            yield _ColumnarChunk(Chunk(index, source, first_line, b"".join(lines), True, False), done)
            index, first_line, lines, size = index + 1, first_line + len(lines), [], 0
    if lines:
        yield _ColumnarChunk(Chunk(index, source, first_line, b"".join(lines), True, False), done)


def _decompression_error(path: str, error: Exception) -> DataError:
    """A compressed input that cannot be decompressed, as a DataError naming the file and what to do."""
    if isinstance(error, gzip.BadGzipFile) and str(error).startswith("Not a gzipped file"):
        return DataError(f"input {path} is not gzip-compressed ({error}); rename it without .gz if it is plain text")
    kind = COMPRESSION_NAMES.get(compression_of(path) or "", "compressed")
    return DataError(f"input {path} is a truncated or corrupt {kind} file ({error}); download or compress it again")


def _last_line(data: bytes) -> bytes:
    return data[data.rfind(b"\n", 0, len(data) - 1) + 1:]


def chunk_records(chunk: Chunk) -> Iterator[Record]:
    """Split a chunk into records: lines, or blocks of non-blank lines in block mode."""
    lines = chunk.data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # the chunk ends with a newline
    if not chunk.block_mode:
        for offset, line in enumerate(lines):
            yield Record(chunk.source, chunk.first_line + offset, line)
        return
    block: list[bytes] = []
    block_line = chunk.first_line
    for offset, line in enumerate(lines):
        if line.strip():
            if not block:
                block_line = chunk.first_line + offset
            block.append(line)
        elif block:
            yield Record(chunk.source, block_line, b"\n".join(block))
            block = []
    if block:
        yield Record(chunk.source, block_line, b"\n".join(block))


class Rejected(Exception):
    """A record that is not a valid document; `kind` is one of REJECT_KINDS."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


def document_text(record: Record, *, is_json: bool, json_keys: list[str], max_bytes: int) -> str:
    """Decode and validate one record; raises Rejected(kind) for every kind of bad input."""
    try:
        raw = record.data.decode("utf-8")
    except UnicodeDecodeError:
        raise Rejected("invalid_utf8") from None
    if is_json:
        if not raw.strip():
            raise Rejected("empty")
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError:
            raise Rejected("invalid_json") from None
        if not isinstance(obj, dict):
            raise Rejected("invalid_json")
        values = []
        for key in json_keys:
            if key not in obj:
                raise Rejected("missing_key")
            if not isinstance(obj[key], str):
                raise Rejected("not_a_string")
            values.append(obj[key])
        text = "\n".join(values)
        if not text.isascii():
            try:
                text.encode("utf-8")  # JSON escapes can smuggle lone surrogates in
            except UnicodeEncodeError:
                raise Rejected("invalid_utf8") from None
    else:
        text = raw
    if not text.strip():
        raise Rejected("empty")
    if len(record.data) > max_bytes and len(text.encode("utf-8")) > max_bytes:
        raise Rejected("too_large")
    return text


def iter_documents(paths: list[str], *, json_keys: list[str], input_format: InputFormat = "auto",
                   text_mode: TextMode = "line", max_bytes: int = 10_000_000) -> Iterator[str]:
    """The valid documents of the inputs in order, skipping bad records exactly as preprocessing does."""
    for chunk in iter_chunks(paths, chunk_bytes=1 << 24, input_format=input_format, text_mode=text_mode,
                             json_keys=json_keys):
        for record in chunk_records(chunk):
            try:
                yield document_text(record, is_json=chunk.is_json, json_keys=json_keys, max_bytes=max_bytes)
            except Rejected:
                continue
