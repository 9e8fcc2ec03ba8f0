"""Columnar corpora (Parquet files, Hugging Face `datasets` directories and .arrow files) as JSONL bytes.

Every later stage of preprocessing (work chunks, workers, rejects, shards, resume) takes bytes of records.
A columnar input is turned into the bytes a JSONL file of its `--json-keys` columns holds when written with
Python's `json.dumps(row)` (its defaults: ASCII with escapes), one row a line: the same documents then give
the same chunks, shards and manifests whether they arrive as JSONL, compressed JSONL, Parquet or Arrow,
and a value that is not a string (a null, a number, bytes) is rejected as `not_a_string`, as in JSONL.
Columns not named are never read.

Parquet is read a row group at a time (bounded memory, the file's own unit); a `datasets` directory or
.arrow file through `datasets` (memory-mapped), a record batch at a time.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from megatron_narrow.data.shards import DataError

ARROW_BATCH_ROWS = 4096


def is_datasets_directory(path: str) -> bool:
    """A directory written by `datasets.Dataset.save_to_disk` (or DatasetDict's, refused later by name)."""
    return Path(path).is_dir() and any((Path(path) / name).is_file()
                                       for name in ("state.json", "dataset_info.json", "dataset_dict.json"))


def _jsonl_lines(columns: dict[str, list], keys: list[str]) -> Iterator[bytes]:
    """One canonical JSONL line per row of `columns` (each a list of the same length). A value that is not a
    string (a number, bytes, a struct, a timestamp: not all of them JSON) is written as null, which the workers
    reject as not_a_string, as they reject any non-string JSONL value."""
    for values in zip(*(columns[key] for key in keys), strict=True):
        row = {key: value if isinstance(value, str) else None for key, value in zip(keys, values, strict=True)}
        yield (json.dumps(row) + "\n").encode("ascii")


def _missing_columns(path: str, keys: list[str], columns: list[str]) -> DataError | None:
    missing = [key for key in keys if key not in columns]
    if not missing:
        return None
    return DataError(f"input {path} has no column {', '.join(map(repr, missing))} (--json-keys); its columns are "
                     f"{', '.join(columns)}")


def _parquet_batches(path: str, keys: list[str]) -> Iterator[tuple[dict[str, list], float]]:
    """(columns of one row group, fraction of the file done after it)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
        if (error := _missing_columns(path, keys, parquet.schema_arrow.names)) is not None:
            raise error
        groups = parquet.num_row_groups
        for group in range(groups):
            table = parquet.read_row_group(group, columns=keys)
            yield {key: table.column(key).to_pylist() for key in keys}, (group + 1) / groups
    except (pa.ArrowException, OSError) as error:
        raise DataError(f"input {path} is not a readable Parquet file ({error}); download or write it again") \
            from None


def _arrow_batches(path: str, keys: list[str]) -> Iterator[tuple[dict[str, list], float]]:
    """(columns of one record batch, fraction of the rows done after it), from a `datasets` directory or
    an .arrow file that `datasets` wrote."""
    import datasets
    import pyarrow as pa

    try:
        dataset = datasets.load_from_disk(path) if Path(path).is_dir() else datasets.Dataset.from_file(path)
    except (FileNotFoundError, ValueError, OSError, pa.ArrowException) as error:
        raise DataError(f"input {path} is not a readable datasets directory or .arrow file ({error})") from None
    if isinstance(dataset, datasets.DatasetDict):
        raise DataError(f"input {path} holds the splits {', '.join(dataset)} (a DatasetDict); give one split's "
                        f"directory, e.g. {Path(path) / next(iter(dataset))}")
    if (error := _missing_columns(path, keys, dataset.column_names)) is not None:
        raise error
    table = dataset.data.table.select(keys)
    done = 0
    for batch in table.to_batches(max_chunksize=ARROW_BATCH_ROWS):
        done += batch.num_rows
        yield {key: batch.column(key).to_pylist() for key in keys}, done / max(table.num_rows, 1)


def iter_jsonl_records(path: str, fmt: str, keys: list[str]) -> Iterator[tuple[bytes, float]]:
    """(canonical JSONL line, fraction of the input done) for every row of a columnar input, in order."""
    batches = _parquet_batches(path, keys) if fmt == "parquet" else _arrow_batches(path, keys)
    for columns, done in batches:
        for line in _jsonl_lines(columns, keys):
            yield line, done
