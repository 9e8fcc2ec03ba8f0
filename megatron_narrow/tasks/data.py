"""Task files -> examples -> fixed-shape tensors.

Formats, by extension: .csv and .tsv (a header row names the columns), .jsonl (one object per line), .parquet
(one row per record), a directory written by Hugging Face `datasets`' `Dataset.save_to_disk` (one split: a
DatasetDict's directory is refused, its split is DIR/<split>), and for token classification .conll / .txt /
.bio (one `word ... tag` line per word, the tag last, sentences separated by blank lines, `-DOCSTART-` lines
skipped). Parquet and `datasets` rows are numbered from 1 in errors, as JSONL lines are. A `datasets` ClassLabel
column (a label, or a Sequence of them: token tags) is read as its names, in a `datasets` directory and in a
Parquet file that `datasets` wrote (its schema carries the features), so GLUE's labels and CoNLL's BIO tags
arrive as the names a JSONL file of the same data spells out, and the export's id2label shows them.

Sequence classification encodes `[CLS] a [SEP]` or `[CLS] a [SEP] b [SEP]` (token types 0 then 1),
truncating the longer text first. Token classification encodes each word's sub-tokens and labels the
word at its first sub-token (the convention of BERT's NER and of Hugging Face's examples); those
positions are the model's query rows (for narrow, the only rows its narrow layers compute), padded to
`task.query_slots` with a validity mask.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from megatron_narrow.data.tokenizer import Tokenizer

if TYPE_CHECKING:
    from megatron_narrow.tasks.config import TaskConfig

CONLL_SUFFIXES = (".conll", ".txt", ".bio", ".iob")


class TaskDataError(ValueError):
    """A task file that cannot be read as the task needs, with the file and line."""


@dataclass(frozen=True)
class SequenceExample:
    text: str
    pair: str | None
    label: str


@dataclass(frozen=True)
class TokenExample:
    words: list[str]
    tags: list[str]


DATASETS_FILES = ("dataset_info.json", "state.json")
"""What `Dataset.save_to_disk` writes beside its .arrow shards: a directory holding both is one split."""


def _one_line(error: BaseException) -> str:
    """An underlying reader's message, flattened so a TaskDataError stays one line."""
    return " ".join(str(error).split())


def _dataset_dict_splits(path: Path) -> list[str]:
    """The split names a DatasetDict directory records (its subdirectories if dataset_dict.json is unreadable)."""
    try:
        splits = json.loads((path / "dataset_dict.json").read_text(encoding="utf-8"))["splits"]
        return [str(split) for split in splits]
    except (OSError, ValueError, KeyError, TypeError):
        return sorted(child.name for child in path.iterdir() if child.is_dir())


def _directory_records(path: Path) -> list[tuple[int, dict]]:
    """(row number from 1, record) of a `datasets` save_to_disk directory. A DatasetDict is refused: which
    split a task file means is the config's to say, not ours to guess."""
    if (path / "dataset_dict.json").is_file():
        splits = _dataset_dict_splits(path)
        example = f", e.g. {path / splits[0]}" if splits else ""
        raise TaskDataError(f"{path} is a datasets DatasetDict with the splits {', '.join(splits) or '(none)'}; "
                            f"point at one split's directory, {path}/<split>{example}")
    if not all((path / name).is_file() for name in DATASETS_FILES):
        raise TaskDataError(f"{path} is a directory but not a datasets save_to_disk directory (expected "
                            f"{' and '.join(DATASETS_FILES)} in it); give a .csv, .tsv, .jsonl or .parquet file, "
                            "or a directory Dataset.save_to_disk wrote")
    import datasets  # slow to import: only when a task is read from such a directory

    try:
        dataset = datasets.load_from_disk(str(path))
    except (OSError, ValueError, KeyError) as error:
        raise TaskDataError(f"{path}: not a readable datasets directory ({_one_line(error)})") from None
    if isinstance(dataset, datasets.DatasetDict):  # a layout we did not recognise above
        raise TaskDataError(f"{path} is a datasets DatasetDict with the splits {', '.join(dataset)}; point at "
                            f"one split's directory, {path}/<split>")
    return list(enumerate(_with_label_names(dataset.to_list(), dataset.features), start=1))


def _with_label_names(rows: list[dict], features) -> list[dict]:
    """`rows` with every ClassLabel value (or Sequence of them) replaced by its name."""
    from datasets import ClassLabel, Sequence

    def names(feature):
        if isinstance(feature, ClassLabel):
            return feature.int2str
        inner = feature.feature if isinstance(feature, Sequence) else feature[0] if isinstance(feature, list) else None
        if isinstance(inner, ClassLabel):
            return lambda values: None if values is None else [inner.int2str(v) for v in values]
        return None

    decoders = {column: decode for column, feature in features.items() if (decode := names(feature)) is not None}
    for row in rows:
        for column, decode in decoders.items():
            if row.get(column) is not None:
                row[column] = decode(row[column])
    return rows


def _parquet_records(path: Path) -> list[tuple[int, dict]]:
    """(row number from 1, record) of a Parquet file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as error:
        raise TaskDataError(f"{path}: not a readable Parquet file ({_one_line(error)})") from None
    rows = table.to_pylist()
    if b"huggingface" in (table.schema.metadata or {}):  # written by `datasets`: its features name the labels
        from datasets import Features

        rows = _with_label_names(rows, Features.from_arrow_schema(table.schema))
    return list(enumerate(rows, start=1))


def _records(path: Path) -> list[tuple[int, dict]]:
    """(line or row number, record) of a CSV/TSV/JSONL/Parquet file or a `datasets` directory."""
    if path.is_dir():
        return _directory_records(path)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _parquet_records(path)
    if suffix in (".csv", ".tsv"):
        with open(path, newline="", encoding="utf-8") as f:
            if suffix == ".tsv":  # GLUE-style TSV: a field may start with a quote that closes nothing
                reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            else:
                reader = csv.DictReader(f)
            rows = [(i + 2, row) for i, row in enumerate(reader)]
        for number, row in rows:  # DictReader pads a short row with None and keys a long one's extras None
            if None in row or any(value is None for value in row.values()):
                fields = sum(v is not None for k, v in row.items() if k is not None) + len(row.get(None) or [])
                raise TaskDataError(f"{path}:{number}: {fields} fields where the header names "
                                    f"{len(reader.fieldnames or [])}")
        return rows
    if suffix in (".jsonl", ".json"):
        out = []
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        out.append((number, json.loads(line)))
                    except json.JSONDecodeError as error:
                        raise TaskDataError(f"{path}:{number}: not JSON ({error.msg})") from None
        return out
    raise TaskDataError(f"{path}: unknown format {suffix!r} (expected .csv, .tsv, .jsonl, .parquet or a datasets "
                        "save_to_disk directory)")


def _field(record: dict, name: str, path: Path, number: int):
    if name not in record:
        raise TaskDataError(f"{path}:{number}: no {name!r} field (fields: {sorted(record)})")
    if record[name] is None:  # a columnar file has every column in every row: a row without it holds a null
        raise TaskDataError(f"{path}:{number}: {name!r} is null (fields: {sorted(record)})")
    return record[name]


UNLABELED = ""  # the label of an example read for prediction, whose file has none


def read_sequence_examples(path: str | Path, task: TaskConfig, *, labeled: bool = True) -> list[SequenceExample]:
    path = Path(path)
    if not path.exists():  # a file, or a `datasets` directory (_records says what a directory must hold)
        raise TaskDataError(f"{path} does not exist")
    examples = []
    for number, record in _records(path):
        text = str(_field(record, task.text_field, path, number))
        pair = str(_field(record, task.text_pair_field, path, number)) if task.text_pair_field else None
        label = str(_field(record, task.label_field, path, number)) if labeled else UNLABELED
        if labeled and not label.strip():
            raise TaskDataError(f"{path}:{number}: empty {task.label_field!r}")
        examples.append(SequenceExample(text, pair, label))
    if not examples:
        raise TaskDataError(f"{path} holds no examples")
    return examples


def _read_conll(path: Path, labeled: bool = True) -> list[TokenExample]:
    examples, words, tags = [], [], []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            parts = line.split()
            if not parts or parts[0] == "-DOCSTART-":
                if words:
                    examples.append(TokenExample(words, tags))
                words, tags = [], []
                continue
            if labeled and len(parts) < 2:
                raise TaskDataError(f"{path}:{number}: expected 'word ... tag', got {line.strip()!r}")
            words.append(parts[0])
            tags.append(parts[-1] if labeled else UNLABELED)
    if words:
        examples.append(TokenExample(words, tags))
    return examples


def read_token_examples(path: str | Path, task: TaskConfig, *, labeled: bool = True) -> list[TokenExample]:
    path = Path(path)
    if not path.exists():  # a file, or a `datasets` directory (_records says what a directory must hold)
        raise TaskDataError(f"{path} does not exist")
    if path.is_file() and path.suffix.lower() in CONLL_SUFFIXES:
        examples = _read_conll(path, labeled)
    else:
        examples = []
        for number, record in _records(path):
            words = [str(w) for w in _field(record, task.tokens_field, path, number)]
            tags = ([str(t) for t in _field(record, task.tags_field, path, number)] if labeled
                    else [UNLABELED] * len(words))
            if len(words) != len(tags):
                raise TaskDataError(f"{path}:{number}: {len(words)} words but {len(tags)} tags")
            if labeled and not all(t.strip() for t in tags):
                raise TaskDataError(f"{path}:{number}: an empty tag")
            examples.append(TokenExample(words, tags))
    if not examples:
        raise TaskDataError(f"{path} holds no sentences")
    return examples


def _scores(values: list[str], where: str) -> list[float]:
    """Regression targets: numbers (an input read for prediction has none: 0.0, never used)."""
    scores = []
    for number, value in enumerate(values, start=1):
        try:
            scores.append(float(value) if value != UNLABELED else 0.0)
        except ValueError:
            raise TaskDataError(f"{where}: example {number} has label {value!r}, not a number (task.kind=regression "
                                "needs numeric labels, e.g. STS-B's 0-5 similarity)") from None
    return scores


def _label_ids(labels: list[str], values: list[str], where: str) -> list[int]:
    index = {label: i for i, label in enumerate(labels)}
    index[UNLABELED] = 0  # inputs read for prediction (readers refuse empty labels otherwise): never used
    unknown = sorted(set(values) - set(index))
    if unknown:
        raise TaskDataError(f"{where}: labels {unknown[:5]} are not in the label set {labels}")
    return [index[v] for v in values]


def _pad(rows: list[list[int]], length: int, value: int) -> torch.Tensor:
    return torch.tensor([row + [value] * (length - len(row)) for row in rows], dtype=torch.long)


def encode_sequences(examples: list[SequenceExample], tokenizer: Tokenizer, labels: list[str], max_seq_len: int,
                     where: str = "examples", *, regression: bool = False) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask, token_type_ids (N, S) and labels (N,): class ids, or float scores."""
    special = tokenizer.special
    firsts = tokenizer.encode_batch([e.text for e in examples])
    seconds = tokenizer.encode_batch([e.pair for e in examples]) if examples[0].pair is not None else None
    ids, types = [], []
    for i, a in enumerate(firsts):
        b = list(seconds[i]) if seconds is not None else None
        a = list(a)
        budget = max_seq_len - (3 if b is not None else 2)
        while len(a) + len(b or []) > budget:  # truncate the longer text first (the second on a tie, as HF)
            (a if len(a) > len(b or []) else b).pop() if b is not None else a.pop()
        row = [special.cls, *a, special.sep]
        kinds = [0] * len(row)
        if b is not None:
            row += [*b, special.sep]
            kinds += [1] * (len(b) + 1)
        ids.append(row)
        types.append(kinds)
    input_ids = _pad(ids, max_seq_len, special.pad)
    return {"input_ids": input_ids, "attention_mask": (input_ids != special.pad).long() | _first(input_ids),
            "token_type_ids": _pad(types, max_seq_len, 0),
            "labels": torch.tensor(_scores([e.label for e in examples], where) if regression
                                   else _label_ids(labels, [e.label for e in examples], where))}


def _first(input_ids: torch.Tensor) -> torch.Tensor:
    mask = torch.zeros_like(input_ids)
    mask[:, 0] = 1  # [CLS] is real even if the pad id equalled it
    return mask


@dataclass
class EncodedTokens:
    tensors: dict[str, torch.Tensor]
    """input_ids, attention_mask, token_type_ids (N, S); positions, valid, labels (N, Q)."""
    labeled_words: list[int]
    """Per example, how many of its words got a query slot (the rest were truncated away)."""


def encode_tokens(examples: list[TokenExample], tokenizer: Tokenizer, labels: list[str], max_seq_len: int,
                  slots: int, where: str = "examples") -> EncodedTokens:
    special = tokenizer.special
    pieces = tokenizer.encode_batch([w for e in examples for w in e.words])
    ids_rows, positions_rows, label_rows, labeled = [], [], [], []
    cursor = 0
    for example in examples:
        row, positions, tags = [special.cls], [], []
        word_ids = _label_ids(labels, example.tags, where)
        for word, tag in zip(pieces[cursor:cursor + len(example.words)], word_ids, strict=True):
            word = list(word) or [special.unk]  # a word the tokenizer drops entirely still takes a position
            if len(row) + len(word) > max_seq_len - 1 or len(positions) == slots:
                break
            positions.append(len(row))
            tags.append(tag)
            row += word
        cursor += len(example.words)
        row.append(special.sep)
        ids_rows.append(row)
        positions_rows.append(positions)
        label_rows.append(tags)
        labeled.append(len(positions))
    input_ids = _pad(ids_rows, max_seq_len, special.pad)
    valid = _pad([[1] * len(p) for p in positions_rows], slots, 0).bool()
    tensors = {"input_ids": input_ids, "attention_mask": (input_ids != special.pad).long() | _first(input_ids),
               "token_type_ids": torch.zeros_like(input_ids), "positions": _pad(positions_rows, slots, 0),
               "valid": valid, "labels": _pad(label_rows, slots, -100)}
    return EncodedTokens(tensors, labeled)
