"""Task files to tensors: pairs are [CLS] a [SEP] b [SEP] with token types and longest-first truncation,
NER words are labeled at their first sub-token (the narrow query rows), bad files are named with the line."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_narrow.tasks.config import TaskConfig
from megatron_narrow.tasks.data import (
    TaskDataError,
    encode_sequences,
    encode_tokens,
    read_sequence_examples,
    read_token_examples,
)
from megatron_narrow.tasks.kinds import label_set, read_examples


@pytest.fixture(scope="module")
def tokenizer(tiny_corpus_data):
    from megatron_narrow.data.tokenizer import load_tokenizer

    return load_tokenizer("sentencepiece", tiny_corpus_data["tokenizer"])


def test_pairs_from_csv_with_types_and_longest_first_truncation(tmp_path, tokenizer):
    path = tmp_path / "mnli.csv"
    path.write_text("premise,hypothesis,label\n"
                    "\"Return the value of the default path, then the module name\",the value,entailment\n"
                    "a,\"the file, the list, the module and the string\",neutral\n")
    task = TaskConfig(text_field="premise", text_pair_field="hypothesis", max_seq_len=12)
    examples = read_sequence_examples(path, task)
    labels = label_set(task, examples)
    assert labels == ["entailment", "neutral"]
    out = encode_sequences(examples, tokenizer, labels, 12)
    special = tokenizer.special
    a, b = tokenizer.encode_batch([examples[0].text, examples[0].pair])
    assert len(a) + len(b) > 9  # it must be truncated, and the longer text loses its tail
    kept_a = 9 - len(b)
    assert out["input_ids"][0].tolist() == [special.cls, *a[:kept_a], special.sep, *b, special.sep]
    assert out["token_type_ids"][0].tolist() == [0] * (kept_a + 2) + [1] * (len(b) + 1)
    # the second row's hypothesis is the longer text: it loses its tail, the premise is kept whole
    a, b = tokenizer.encode_batch([examples[1].text, examples[1].pair])
    assert len(a) + len(b) > 9 and len(b) > len(a)
    kept_b = 9 - len(a)
    assert out["input_ids"][1].tolist() == [special.cls, *a, special.sep, *b[:kept_b], special.sep]
    assert out["token_type_ids"][1].tolist() == [0] * (len(a) + 2) + [1] * (kept_b + 1)
    assert out["labels"].tolist() == [0, 1]
    assert out["attention_mask"][1].tolist() == [1] * 12


def test_conll_words_labeled_at_their_first_piece(tmp_path, tokenizer):
    path = tmp_path / "ner.conll"
    path.write_text("-DOCSTART- -X- O\n\nalice NNP B-PER\nreturned VBD O\nto TO O\nnew NNP B-LOC\nyork NNP I-LOC\n\n"
                    "bob B-PER\n")
    task = TaskConfig(kind="token", max_seq_len=16, max_labeled_tokens=4)
    examples = read_token_examples(path, task)
    assert [e.words for e in examples] == [["alice", "returned", "to", "new", "york"], ["bob"]]
    labels = label_set(task, examples)
    assert labels == ["O", "B-LOC", "B-PER", "I-LOC"]
    encoded = encode_tokens(examples, tokenizer, labels, 16, slots=4)
    pieces = tokenizer.encode_batch(examples[0].words)
    starts = [1]
    for word in pieces[:3]:
        starts.append(starts[-1] + len(word))
    t = encoded.tensors
    assert t["positions"][0].tolist() == starts  # four slots: the fifth word is not labeled
    assert t["labels"][0].tolist() == [2, 0, 0, 1] and t["valid"][0].all()
    assert encoded.labeled_words == [4, 1]
    assert t["valid"][1].tolist() == [True, False, False, False] and t["labels"][1].tolist() == [2, -100, -100, -100]
    assert t["input_ids"][0, starts[0]] == pieces[0][0]


def _read_sequences(path, **task):
    return read_sequence_examples(path, TaskConfig(**task))


def _token_labels(path):
    task = TaskConfig(kind="token")
    return label_set(task, read_token_examples(path, task))


# file name -> (content, what reads it, the error it must name)
BAD_FILES = {
    "bad.jsonl": ('{"text": "a", "label": "x"}\n{"sentence": "b", "label": "y"}\n', _read_sequences,
                  r"bad.jsonl:2: no 'text' field"),
    "bad.conll": ("alice B-PER\nlonely\n", lambda path: read_token_examples(path, TaskConfig(kind="token")),
                  r"bad.conll:2: expected 'word ... tag'"),
    "short.tsv": ("sentence\tlabel\nonly one field\n", lambda path: _read_sequences(path, text_field="sentence"),
                  r"short.tsv:2: 1 fields where the header names 2"),
    "empty.csv": ("text,label\nsome text,\n", _read_sequences, r"empty.csv:2: empty 'label'"),
    "iobes.conll": ("alice S-PER\nsaid O\n", _token_labels, r"tags \['S-PER'\] are not BIO"),
}


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_bad_task_files_are_refused_naming_file_and_line(name, tmp_path):
    content, read, expected = BAD_FILES[name]
    (tmp_path / name).write_text(content)
    with pytest.raises(TaskDataError, match=expected):
        read(tmp_path / name)


def test_labels_outside_the_training_set_and_tsv_quotes(tmp_path, tokenizer):
    valid = tmp_path / "valid.jsonl"
    valid.write_text('{"text": "a", "label": "z"}\n')
    with pytest.raises(TaskDataError, match=r"valid.jsonl: labels \['z'\] are not in the label set"):
        encode_sequences(read_sequence_examples(valid, TaskConfig()), tokenizer, ["x", "y"], 8, str(valid))
    tsv = tmp_path / "glue.tsv"  # a field may start with a quote that closes nothing: it is text
    tsv.write_text('sentence\tlabel\n"quoted start, no end\t1\nplain\t0\nthird "one"\t1\n')
    examples = read_sequence_examples(tsv, TaskConfig(text_field="sentence"))
    assert [e.text for e in examples] == ['"quoted start, no end', "plain", 'third "one"']


def test_a_hugging_face_source_keeps_its_pooler(tmp_path, tokenizer, tiny_corpus_data):
    from transformers import BertConfig, BertModel

    from megatron_narrow.convert.checkpoint import build_hf_tokenizer
    from megatron_narrow.tasks.source import load_pretrained

    hf = BertModel(BertConfig(vocab_size=1000, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=64, max_position_embeddings=64))
    hf.save_pretrained(tmp_path / "base")
    build_hf_tokenizer("sentencepiece", tiny_corpus_data["tokenizer"], model_max_length=64).save_pretrained(
        tmp_path / "base")
    pretrained = load_pretrained(tmp_path / "base")
    torch.testing.assert_close(pretrained.state["bert.pooler.dense.weight"], hf.pooler.dense.weight.detach())
    assert not any(k.startswith("cls.") for k in pretrained.state)  # a BertModel has no MLM head to keep


PAIRS = [{"premise": "the module returns a value", "hypothesis": "a value", "label": "entailment"},
         {"premise": "a list", "hypothesis": "the string, the file and the path", "label": "neutral"},
         {"premise": "no default", "hypothesis": "a default path", "label": "contradiction"}]
TAGGED = [{"tokens": ["alice", "went", "to", "new", "york"], "tags": ["B-PER", "O", "O", "B-LOC", "I-LOC"]},
          {"tokens": ["bob"], "tags": ["B-PER"]}]


def _columnar_copies(tmp_path, records: list[dict]) -> list:
    """The same records as JSONL (the reference), Parquet written by pyarrow and a `datasets` directory."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl = tmp_path / "task.jsonl"
    jsonl.write_text("".join(json.dumps(record) + "\n" for record in records))
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "task.parquet")
    datasets.Dataset.from_list(records).save_to_disk(tmp_path / "task_ds")
    return [jsonl, tmp_path / "task.parquet", tmp_path / "task_ds"]


def _class_label_copies(tmp_path, records: list[dict]) -> list:
    """ClassLabel columns (a pair task's label, a token task's Sequence of tags) in a `datasets` directory and in the
    Parquet file `datasets` writes, against a JSONL file spelling the names out: they read as the names."""
    from datasets import ClassLabel, Dataset, Features, Sequence, Value

    jsonl = tmp_path / "task.jsonl"
    jsonl.write_text("".join(json.dumps(record) + "\n" for record in records))
    if "tags" in records[0]:
        names = sorted({tag for record in records for tag in record["tags"]})
        features = Features({"tokens": Sequence(Value("string")), "tags": Sequence(ClassLabel(names=names))})
        columns = {"tokens": [r["tokens"] for r in records],
                   "tags": [[names.index(t) for t in r["tags"]] for r in records]}
    else:
        names = sorted({record["label"] for record in records})
        features = Features({"premise": Value("string"), "hypothesis": Value("string"),
                             "label": ClassLabel(names=names)})
        columns = {"premise": [r["premise"] for r in records], "hypothesis": [r["hypothesis"] for r in records],
                   "label": [names.index(r["label"]) for r in records]}
    dataset = Dataset.from_dict(columns, features=features)
    dataset.to_parquet(tmp_path / "task.parquet")
    dataset.save_to_disk(tmp_path / "task_ds")
    return [jsonl, tmp_path / "task.parquet", tmp_path / "task_ds"]


PAIR_TASK = {"text_field": "premise", "text_pair_field": "hypothesis"}
# case -> (task fields, records, how they are written: the JSONL reference first)
COLUMNAR_CASES = {
    "sequence-pair": (PAIR_TASK, PAIRS, _columnar_copies),
    "token": ({"kind": "token"}, TAGGED, _columnar_copies),
    "class-label": (PAIR_TASK, PAIRS, _class_label_copies),
    "class-label-tags": ({"kind": "token"}, TAGGED, _class_label_copies),
}


@pytest.mark.parametrize("case", list(COLUMNAR_CASES))
def test_parquet_and_datasets_directories_read_as_their_jsonl(case, tmp_path):
    fields, records, write = COLUMNAR_CASES[case]
    task = TaskConfig(**fields)
    reference, *others = write(tmp_path, records)
    expected = read_examples(reference, task)
    assert len(expected) == len(records)
    if case == "class-label":  # names, not the ClassLabel ids
        assert [e.label for e in expected] == ["entailment", "neutral", "contradiction"]
    for path in others:
        assert read_examples(path, task) == expected, path
        assert read_examples(path, task, labeled=False) == read_examples(reference, task, labeled=False), path


def test_columnar_inputs_refused_in_one_line_naming_the_path(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = tmp_path / "no_text.parquet"  # the column is named otherwise: the first row says so
    pq.write_table(pa.table({"sentence": ["a", "b"], "label": ["x", "y"]}), parquet)
    null = tmp_path / "null.parquet"  # a row without the value: a null in the column
    pq.write_table(pa.table({"text": ["a", None], "label": ["x", "y"]}), null)
    splits = tmp_path / "glue"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(PAIRS),
                          "validation": datasets.Dataset.from_list(PAIRS)}).save_to_disk(splits)
    (tmp_path / "plain").mkdir()
    refused = {parquet: rf"{parquet}:1: no 'text' field \(fields: \['label', 'sentence'\]\)",
               null: rf"{null}:2: 'text' is null",
               splits: rf"{splits} is a datasets DatasetDict with the splits train, validation; .*{splits}/<split>",
               tmp_path / "plain": r"plain is a directory but not a datasets save_to_disk directory",
               tmp_path / "absent": r"absent does not exist"}
    for path, expected in refused.items():
        with pytest.raises(TaskDataError, match=expected) as error:
            read_examples(path, TaskConfig())
        assert "\n" not in str(error.value)
    # the split itself is read
    assert len(read_examples(splits / "validation", TaskConfig(**PAIR_TASK))) == len(PAIRS)
