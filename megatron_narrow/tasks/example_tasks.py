"""Three small fine-tuning tasks built offline from held-out documentation sentences: a sentence task, a pair
task and a token task, so that fine-tuning can be tried (and the variants compared) without downloading GLUE or
CoNLL. benchmarks/quality.py's downstream study and tools/make_example_tasks.py both build them here.

The corpus is the docstrings of the standard library (and, by default, of the installed packages), the one
offline English text there is (megatron_narrow/data/offline_corpus.py). Every tenth distinct docstring is held
out of pretraining, and its prose sentences are the tasks' raw material, so that no task sentence was seen as
such in pretraining:

- `library` (sequence, accuracy): which library a sentence's docstring came from; the libraries with the most
  held-out sentences, balanced; the sentence never contains its library's name (that would give it away).
- `same_library` (sequence over pairs, accuracy): do two sentences come from the same library (`yes`/`no`),
  balanced, with the same never-named rule.
- `sentence_ends` (token, span F1): two or three sentences run together with the full stops between them
  removed; tag the words a removed stop followed (sentence segmentation).

EXAMPLE_TASKS is the one place that names each task's kind, file fields and main metric.
"""

from __future__ import annotations

import itertools
import json
import random
import re
import sysconfig
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from megatron_narrow.data.offline_corpus import (
    iter_installed_package_docstrings,
    iter_sourced_docstrings,
    iter_stdlib_docstrings,
)

Sentence = tuple[str, str]
"""(library, sentence)."""

LIBRARIES = 6
"""Classes of the library task (and the libraries the pair task draws from)."""
HELD_OUT_EVERY = 10
"""Every HELD_OUT_EVERY-th distinct docstring is held out of pretraining."""
STDLIB_SKIP = ("test", "tests", "site-packages")
"""The directories iter_stdlib_docstrings leaves out; the stdlib-only walk below must leave out the same, so that
it holds out the same docstrings (tests/test_example_tasks.py checks it)."""


# ------------------------------------------------------------------------------------ held-out sentences


def is_prose(sentence: str) -> bool:
    """A full sentence of mostly plain words (not code, a table or a signature)."""
    words = sentence.split()
    plain = sum(bool(re.fullmatch(r"[A-Za-z][a-z]*[,.;:]?", w)) for w in words)
    return 8 <= len(words) <= 40 and plain >= 0.8 * len(words) and sentence.endswith(".")


def _stdlib_module_docstrings() -> Iterator[tuple[str, str]]:
    """(top-level module, docstring) of the standard library, in iter_stdlib_docstrings' order and text."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for path, text in iter_sourced_docstrings(root, skip=STDLIB_SKIP):
        yield path.relative_to(root).parts[0].removesuffix(".py"), text


def library_docstrings(packages: bool = True) -> Iterator[tuple[str, str]]:
    """(library, docstring) in corpus order. With `packages`, the standard library's docstrings and then the
    installed packages' (each named by its top-level package); the standard library is one library there,
    `stdlib`, as the quality study has always named it. Without, each top-level standard-library module
    (`email`, `asyncio`, ...) is a library of its own: `stdlib` alone would leave the library task one class
    and the pair task no `no` pair."""
    if packages:
        return itertools.chain((("stdlib", text) for text in iter_stdlib_docstrings()),
                               iter_installed_package_docstrings())
    return _stdlib_module_docstrings()


def split_held_out(documents: Iterable[tuple[str, str]]) -> tuple[list[str], list[tuple[str, str]]]:
    """(pretraining docstrings, held-out (library, docstring)): every tenth distinct docstring is held out.
    Repeats are dropped first (templated docstrings repeat across packages), so that no held-out docstring is
    also pretrained on."""
    pretrain: list[str] = []
    held_out: list[tuple[str, str]] = []
    seen: set[str] = set()
    for library, text in documents:
        if text not in seen:
            seen.add(text)
            if len(seen) % HELD_OUT_EVERY == 0:
                held_out.append((library, text))
            else:
                pretrain.append(text)
    return pretrain, held_out


def prose_sentences(documents: Iterable[tuple[str, str]]) -> list[Sentence]:
    """The distinct (library, sentence) prose sentences of the documents, whitespace normalised, sorted (so the
    result does not depend on the walk's order)."""
    sentences = set()
    for library, text in documents:
        for paragraph in text.splitlines():
            for sentence in re.split(r"(?<=[.!?])\s+", paragraph):
                if is_prose(sentence):
                    sentences.add((library, " ".join(sentence.split())))
    return sorted(sentences)


def held_out_sentences(packages: bool = True) -> list[Sentence]:
    """The held-out (library, sentence) pairs the tasks are built from.

    Reading the docstrings (`ast` over every .py file) is the whole cost. Measured 2026-12-07 on two cores
    (AMD EPYC, Python 3.11, other work running): standard library only (`packages=False`) 5-7 s, 12 s on a cold
    file cache, 1,029 sentences from 119 modules; with the installed packages (`packages=True`, as
    benchmarks/quality.py) 113-124 s, 18,437 sentences from 138 libraries (this machine's site-packages). Use
    packages=False for tests and quick trials."""
    return prose_sentences(split_held_out(library_docstrings(packages))[1])


# ------------------------------------------------------------------------------------------------ tasks


def names_library(library: str, sentence: str) -> bool:
    """Whether the sentence contains its library's name (any case): a giveaway, such a sentence is left out of
    the library and pair tasks."""
    return library.lower() in sentence.lower()


def top_libraries(sentences: Sequence[Sentence], count: int = LIBRARIES) -> list[str]:
    """The `count` libraries with the most held-out sentences that do not name them (chosen once, on the whole
    held-out pool, so train and valid share the label set)."""
    counts: dict[str, int] = {}
    for library, sentence in sentences:
        if not names_library(library, sentence):
            counts[library] = counts.get(library, 0) + 1
    return sorted(counts, key=lambda name: (-counts[name], name))[:count]


def unnamed_by_library(sentences: Sequence[Sentence], libraries: Sequence[str]) -> dict[str, list[str]]:
    """library -> its sentences that do not name it, for each of `libraries` (in the given order)."""
    by_library: dict[str, list[str]] = {name: [] for name in libraries}
    for library, sentence in sentences:
        if library in by_library and not names_library(library, sentence):
            by_library[library].append(sentence)
    return by_library


def library_examples(sentences: Sequence[Sentence], libraries: Sequence[str], count: int,
                     rng: random.Random) -> list[dict]:
    """Balanced examples of `libraries`, none naming its library; each sentence at most once, so a class gets
    at most as many as the smallest library has."""
    by_library = unnamed_by_library(sentences, libraries)
    per_class = min(count // len(libraries), *(len(found) for found in by_library.values()))
    examples = [{"text": s, "label": name} for name in libraries for s in rng.sample(by_library[name], per_class)]
    rng.shuffle(examples)
    return examples


def same_library_examples(sentences: Sequence[Sentence], libraries: Sequence[str], count: int,
                          rng: random.Random) -> list[dict]:
    """Pairs of different sentences, half `yes` (both of one library), half `no` (of two different libraries),
    none naming its library. The libraries are drawn uniformly in both halves, so that neither sentence alone
    tells the label: the model has to compare the two. A sentence may be in several pairs (a split may hold
    fewer sentences than pairs wanted), but there are at most as many pairs as sentences (two pairs each, on
    average). Libraries with fewer than two sentences in the split are left out; fewer than two such: none."""
    by_library = unnamed_by_library(sentences, libraries)
    usable = [name for name in libraries if len(by_library[name]) >= 2]
    if len(usable) < 2:
        return []
    pairs = min(count, sum(len(by_library[name]) for name in usable)) // 2 * 2
    examples = []
    for index in range(pairs):
        if index % 2 == 0:
            library = rng.choice(usable)
            text, text_pair = rng.sample(by_library[library], 2)
        else:
            first, second = rng.sample(usable, 2)
            text, text_pair = rng.choice(by_library[first]), rng.choice(by_library[second])
        examples.append({"text": text, "text_pair": text_pair, "label": "yes" if index % 2 == 0 else "no"})
    rng.shuffle(examples)
    return examples


def sentence_ends(sentences: Sequence[str], rng: random.Random) -> list[dict]:
    """Sentence segmentation of unpunctuated text: runs of two or three sentences (in the given order) joined
    with the full stops between them removed (the last keeps its own), each word that a removed stop followed tagged
    B-END. Capitals help but do not settle it: docstrings capitalise None, True and class names mid-sentence."""
    examples, start = [], 0
    while start < len(sentences) - 1:
        group = sentences[start:start + rng.choice((2, 3))]
        start += len(group)
        words, tags = [], []
        for i, sentence in enumerate(group):
            sentence_words = sentence.split()
            if i < len(group) - 1:
                sentence_words[-1] = sentence_words[-1].rstrip(".")
            words += sentence_words
            tags += ["O"] * (len(sentence_words) - 1) + ["B-END" if i < len(group) - 1 else "O"]
        examples.append({"tokens": words, "tags": tags})
    return examples


def _sentence_ends_examples(sentences: Sequence[Sentence], libraries: Sequence[str], count: int,
                            rng: random.Random) -> list[dict]:
    """sentence_ends over the split's sentences in their (shuffled) order, so a run mostly joins different
    docstrings; the first `count` runs."""
    return sentence_ends([s for _, s in sentences], rng)[:count]


Builder = Callable[[Sequence[Sentence], Sequence[str], int, random.Random], list[dict]]
"""(one split's (library, sentence) pairs, the library task's label set, examples wanted, rng) -> records."""


@dataclass(frozen=True)
class ExampleTask:
    """One example task: how it is fine-tuned (a kind of megatron_narrow/tasks/kinds.py), the JSONL keys it
    writes, the metric that scores it (a key of the run's eval_results.json) and how it is built."""

    name: str
    kind: str
    fields: tuple[tuple[str, str], ...]
    """TaskConfig field -> the JSONL key this task writes (task.text_field=text, ...)."""
    metric: str
    build: Builder
    description: str
    """One line, for --help and reports."""

    def task_config(self) -> dict[str, str]:
        """TaskConfig's keyword arguments for this task's files (also finetune.py's task.KEY=VALUE overrides)."""
        return {"kind": self.kind, **dict(self.fields)}

    def overrides(self) -> list[str]:
        """task_config() as finetune.py's command-line overrides."""
        return [f"task.{key}={value}" for key, value in self.task_config().items()]

    def labels(self, records: Iterable[dict]) -> list[str]:
        """The sorted labels (token task: tags) the records use."""
        fields = dict(self.fields)
        if "tags_field" in fields:
            return sorted({tag for r in records for tag in r[fields["tags_field"]]})
        return sorted({r[fields["label_field"]] for r in records})


EXAMPLE_TASKS: Mapping[str, ExampleTask] = MappingProxyType({task.name: task for task in (
    ExampleTask("library", "sequence", (("text_field", "text"), ("label_field", "label")), "accuracy",
                library_examples, f"which library a sentence comes from ({LIBRARIES} classes, balanced)"),
    ExampleTask("same_library", "sequence",
                (("text_field", "text"), ("text_pair_field", "text_pair"), ("label_field", "label")), "accuracy",
                same_library_examples, "two sentences: yes when they come from the same library, no otherwise "
                "(balanced)"),
    ExampleTask("sentence_ends", "token", (("tokens_field", "tokens"), ("tags_field", "tags")), "span_f1",
                _sentence_ends_examples, "2-3 sentences run together without the stops between them: tag B-END "
                "the words a removed stop followed"),
)})
"""name -> task, in the order the files are written."""

SPLITS = ("train", "valid")


def split_sentences(sentences: Sequence[Sentence], ratio: tuple[int, int], rng: random.Random,
                    exclusive: bool = True) -> dict[str, list[Sentence]]:
    """{"train", "valid"}: the shuffled pool cut in the ratio (train, valid). With `exclusive`, a
    sentence text held out under two libraries (29 texts with the packages here, 1 in the standard library)
    and cut to both sides is dropped from train, so that no valid sentence is ever fine-tuned on."""
    pool = list(sentences)
    rng.shuffle(pool)
    cut = len(pool) * ratio[1] // sum(ratio)
    valid, train = pool[:cut], pool[cut:]
    if exclusive:
        valid_texts = {sentence for _, sentence in valid}
        train = [pair for pair in train if pair[1] not in valid_texts]
    return {"train": train, "valid": valid}


def write_example_tasks(sentences: Sequence[Sentence], output_dir: str | Path, sizes: tuple[int, int] = (2000, 500),
                        seed: int = 0, tasks: Sequence[str] = tuple(EXAMPLE_TASKS), *, exclusive: bool = True,
                        on_written: Callable[[str, str, list[dict], Path], None] | None = None
                        ) -> dict[str, dict[str, str]]:
    """Write OUTPUT_DIR/{task}_{split}.jsonl for `tasks` and both splits; returns task -> split -> path.

    The held-out sentences are split between train and valid first (in the ratio of `sizes`), and each split's
    tasks are built from its own sentences only, so no valid sentence is seen in fine-tuning. `sizes` are the
    examples wanted per task (train, valid); a task may get fewer, when the split's sentences do not make more.
    One random stream drives it all, drawn in the order train then valid, `tasks` in the given order: the same
    sentences, seed and tasks give the same files. `exclusive=False` keeps a sentence text cut to both sides
    in train too: benchmarks/quality.py passes it so its work directories keep the files its finished runs
    were made with (it reuses them by path). `on_written(task, split, records, path)` is called after each file.
    """
    unknown = [task for task in tasks if task not in EXAMPLE_TASKS]
    if unknown:
        raise ValueError(f"unknown example tasks {unknown}; known: {', '.join(EXAMPLE_TASKS)}")
    rng = random.Random(seed)
    splits = split_sentences(sentences, sizes, rng, exclusive)
    libraries = top_libraries(sentences)  # on the whole pool: train and valid share the label set
    output_dir = Path(output_dir)
    files: dict[str, dict[str, str]] = {task: {} for task in tasks}
    for split, wanted in zip(SPLITS, sizes, strict=True):
        for task in tasks:
            records = EXAMPLE_TASKS[task].build(splits[split], libraries, wanted, rng)
            path = output_dir / f"{task}_{split}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(r) + "\n" for r in records))
            files[task][split] = str(path)
            if on_written is not None:
                on_written(task, split, records, path)
    return files
