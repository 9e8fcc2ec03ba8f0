"""megatron_narrow/tasks/example_tasks.py: the pair task is balanced and never names a library, no valid sentence
is in any train file, the labels are what the tasks state, and every file has the registry's fields and reads
back as its kind. The files are built once from the standard library's held-out sentences (the module fixture:
reading the docstrings takes ~6 s on two cores, ~12 s on a cold file cache)."""

from __future__ import annotations

import itertools
import json
import random
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from megatron_narrow.data.offline_corpus import iter_stdlib_docstrings
from megatron_narrow.tasks.config import TaskConfig
from megatron_narrow.tasks.example_tasks import (
    EXAMPLE_TASKS,
    held_out_sentences,
    library_docstrings,
    names_library,
    same_library_examples,
    split_sentences,
    top_libraries,
    write_example_tasks,
)
from megatron_narrow.tasks.kinds import read_examples, task_kind

from .runs import run_tool

SIZES = (300, 100)


@pytest.fixture(scope="module")
def sentences() -> list[tuple[str, str]]:
    return held_out_sentences(packages=False)


@pytest.fixture(scope="module")
def files(sentences, tmp_path_factory) -> dict[str, dict[str, str]]:
    return write_example_tasks(sentences, tmp_path_factory.mktemp("example_tasks"), SIZES, seed=0)


@pytest.fixture(scope="module")
def libraries_of(sentences) -> dict[str, set[str]]:
    """sentence -> the libraries it is held out under (one, but for a text repeated across libraries)."""
    found: dict[str, set[str]] = {}
    for library, sentence in sentences:
        found.setdefault(sentence, set()).add(library)
    return found


def read_jsonl(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def record_sentences(task: str, record: dict) -> list[str]:
    """The held-out sentences a record is made of, without a final full stop (sentence_ends removed some):
    a sentence_ends run is cut after each B-END word."""
    if task == "sentence_ends":
        cuts = [i + 1 for i, tag in enumerate(record["tags"]) if tag == "B-END"]
        bounds = zip([0, *cuts], [*cuts, len(record["tokens"])], strict=True)
        return [" ".join(record["tokens"][lo:hi]).rstrip(".") for lo, hi in bounds]
    return [record[key].rstrip(".") for key in ("text", "text_pair") if key in record]


def synthetic_pool() -> tuple[list[tuple[str, str]], dict[str, str]]:
    """Six libraries of 20 sentences that do not name them and 5 that do; and sentence -> library."""
    pool = [(lib, f"sentence {i} of group {k} here.") for k, lib in enumerate(("numpy", "torch", "email", "http",
                                                                             "json", "csv")) for i in range(20)]
    pool += [(lib, f"sentence {i} about {lib} here.") for lib in ("numpy", "torch") for i in range(5)]
    return pool, {sentence: library for library, sentence in pool}


def test_the_stdlib_walk_holds_out_what_the_quality_study_holds_out():
    """packages=False walks the standard library as iter_stdlib_docstrings does (the same texts, in the same
    order: the same docstrings held out), naming each top-level module its library."""
    pairs = list(itertools.islice(zip(library_docstrings(packages=False), iter_stdlib_docstrings(), strict=False), 300))
    assert len(pairs) == 300 and all(text == stdlib_text for (_, text), stdlib_text in pairs)
    assert all(library.isidentifier() for (library, _), _ in pairs)


def test_pairs_are_balanced_yes_within_a_library_no_across_never_naming_it():
    pool, library_of = synthetic_pool()
    examples = same_library_examples(pool, top_libraries(pool), 100, random.Random(0))
    assert Counter(e["label"] for e in examples) == {"yes": 50, "no": 50}
    for e in examples:
        assert set(e) == {"text", "text_pair", "label"} and e["text"] != e["text_pair"]
        same = library_of[e["text"]] == library_of[e["text_pair"]]
        assert e["label"] == ("yes" if same else "no")
        assert not any(names_library(library_of[s], s) for s in (e["text"], e["text_pair"]))
    # libraries uniform in both halves: neither sentence alone tells the label
    first = {label: Counter(library_of[e["text"]] for e in examples if e["label"] == label) for label in ("yes", "no")}
    assert set(first["yes"]) == set(first["no"]) == set(top_libraries(pool))
    # at most as many pairs as sentences (each sentence in two pairs on average), an even number
    assert len(same_library_examples(pool, top_libraries(pool), 10_000, random.Random(0))) == 120


def test_an_exclusive_split_keeps_a_text_held_out_under_two_libraries_out_of_train():
    pool = [(lib, f"shared sentence {i}.") for i in range(20) for lib in ("a", "b")]
    for exclusive, leaks in ((True, False), (False, True)):
        splits = split_sentences(pool, (1, 1), random.Random(0), exclusive)
        shared = {s for _, s in splits["train"]} & {s for _, s in splits["valid"]}
        assert bool(shared) == leaks
        assert len(splits["valid"]) == 20  # the valid side is the cut's either way; train loses the shared texts


def test_no_valid_sentence_is_in_any_train_file(files, libraries_of):
    seen = {split: {s for task, paths in files.items() for r in read_jsonl(paths[split])
                    for s in record_sentences(task, r)} for split in ("train", "valid")}
    held_out = {sentence.rstrip(".") for sentence in libraries_of}
    assert seen["train"] <= held_out and seen["valid"] <= held_out  # the runs were cut where the tags say
    assert seen["train"] and seen["valid"] and not seen["train"] & seen["valid"]


def test_the_pair_task_is_balanced_and_never_names_a_library(files, libraries_of):
    for split in ("train", "valid"):
        records = read_jsonl(files["same_library"][split])
        assert Counter(r["label"] for r in records) == {"yes": len(records) // 2, "no": len(records) // 2}
        assert len(records) >= 50
        for r in records:
            a, b = libraries_of[r["text"]], libraries_of[r["text_pair"]]
            if len(a) == len(b) == 1:  # (a text held out under two libraries may be either)
                assert r["label"] == ("yes" if a == b else "no")
            assert all(any(not names_library(lib, s) for lib in libraries_of[s]) for s in (r["text"], r["text_pair"]))


def test_labels_are_the_tasks_own(files, sentences):
    libraries = set(top_libraries(sentences))
    assert len(libraries) == 6
    for split in ("train", "valid"):
        library = read_jsonl(files["library"][split])
        assert {r["label"] for r in library} == libraries
        assert len(set(Counter(r["label"] for r in library).values())) == 1  # balanced
        assert not any(names_library(r["label"], r["text"]) for r in library)
        assert EXAMPLE_TASKS["same_library"].labels(read_jsonl(files["same_library"][split])) == ["no", "yes"]
        assert EXAMPLE_TASKS["sentence_ends"].labels(read_jsonl(files["sentence_ends"][split])) == ["B-END", "O"]


def test_files_have_the_registry_fields_and_read_back_as_their_kind(files):
    assert set(files) == set(EXAMPLE_TASKS) and all(set(paths) == {"train", "valid"} for paths in files.values())
    for name, task in EXAMPLE_TASKS.items():
        config = TaskConfig(**task.task_config())
        for split, path in files[name].items():
            assert Path(path).name == f"{name}_{split}.jsonl"
            records = read_jsonl(path)
            assert records and all(set(r) == set(dict(task.fields).values()) for r in records)
            examples = read_examples(path, config)
            assert len(examples) == len(records)
            if name == "same_library":
                assert [(e.text, e.pair, e.label) for e in examples[:3]] == [
                    (r["text"], r["text_pair"], r["label"]) for r in records[:3]]


def test_each_tasks_metric_is_one_its_kind_reports(files):
    for name, task in EXAMPLE_TASKS.items():
        kind = task_kind(task.kind)
        if kind.metrics:  # sequence kinds: what task.metrics may name
            assert task.metric in kind.metrics, name
            continue
        examples = read_examples(files[name]["valid"], TaskConfig(**task.task_config()))  # token: its scores' keys
        lengths = [len(e.words) for e in examples]
        predictions = torch.zeros(len(examples), max(lengths), dtype=torch.long)
        metrics, _ = kind.scores(predictions, {}, ["O", "B-END"], examples, lengths, None)
        assert task.metric in metrics, (name, sorted(metrics))


def test_the_tool_lists_the_tasks_and_prints_one_line_per_file(sentences, tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit) as exit_info:
        run_tool("make_example_tasks", ["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert "--stdlib-only" in help_text and all(" ".join(t.overrides()) in help_text for t in EXAMPLE_TASKS.values())
    tool = sys.modules["tool_make_example_tasks"]  # loaded by run_tool; the sentences are the fixture's, not reread
    monkeypatch.setattr(tool, "held_out_sentences", lambda packages: sentences if not packages else None)
    assert run_tool("make_example_tasks", ["--output-dir", str(tmp_path), "--train", "100", "--valid", "40",
                                           "--stdlib-only"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{len(sentences):,} held-out sentences")
    assert [line.split(":")[0] for line in lines[1:]] == [f"{task} {split}" for split in ("train", "valid")
                                                          for task in EXAMPLE_TASKS]
    for line in lines[1:]:
        path = Path(line.rsplit(" -> ", 1)[1])
        assert f": {len(read_jsonl(str(path)))} examples, " in line and path.parent == tmp_path
