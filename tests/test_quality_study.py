"""benchmarks/quality.py's downstream tasks and verdicts (the study itself runs for an hour; its numbers are
in benchmarks/RESULTS.md): the library task is balanced and never names the library, the replaced-word task
tags exactly the words it replaced, and the targets are judged by their arithmetic."""

from __future__ import annotations

import random
import sys
from collections import Counter

from .conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import quality  # noqa: E402

SENTENCE = "The function returns the number of items that match the given pattern in the list .".split()


def test_library_examples_are_balanced_and_never_name_their_library():
    rng = random.Random(0)
    sentences = [(lib, f"sentence {i} about {'numpy arrays' if i % 10 == 0 else 'things'} here.")
                 for lib in ("numpy", "torch", "email", "http", "json", "csv") for i in range(30)]
    sentences += [("tiny", f"sentence {i}.") for i in range(5)]  # the fewest sentences: left out
    libraries = quality.top_libraries(sentences)
    assert sorted(libraries) == ["csv", "email", "http", "json", "numpy", "torch"]
    examples = quality.library_examples(sentences, libraries, 60, rng)
    labels = Counter(e["label"] for e in examples)
    assert set(labels) == {"numpy", "torch", "email", "http", "json", "csv"} and set(labels.values()) == {10}
    assert all(e["label"].lower() not in e["text"].lower() for e in examples)


def test_replaced_words_are_tagged_and_nothing_else():
    rng = random.Random(1)
    vocabulary = "alpha beta gamma delta returns".split()
    for _ in range(200):
        words, tags = quality.replaced(SENTENCE, rng, vocabulary)
        assert len(words) == len(tags) == len(SENTENCE)
        assert tags.count("B-REP") == round(0.15 * len(SENTENCE))
        for word, tag, original in zip(words, tags, SENTENCE, strict=True):
            assert (tag == "B-REP") == (word != original)
            if tag == "B-REP":
                assert word.lower() != original.lower() and word in vocabulary


def test_targets_are_judged_by_their_arithmetic():
    curve = {"bert": 3.0, "narrow": 3.2, "token_drop": 3.1, "narrow_time": 2.9}
    results = {"pretraining": {m: {"curve": [[1, 1.0, loss]]} for m, loss in curve.items()},
               "downstream": {"bert": {"library": [70.0, 72.0], "replaced_words": [50.0, 52.0]},
                              "narrow": {"library": [68.5, 69.5], "replaced_words": [47.0, 48.0]},
                              "token_drop": {"library": [71.0, 71.0], "replaced_words": [51.0, 51.0]},
                              "narrow_time": {"library": [72.0, 73.0], "replaced_words": [50.0, 51.0]}}}
    verdicts = {c["target"]: (c["value"], c["met"]) for c in quality.judge(results)}
    assert verdicts["equal steps: narrow library accuracy within 2 points of bert"] == (-2.0, True)
    assert verdicts["equal steps: narrow replaced_words span_f1 within 2 points of bert"] == (-3.5, False)
    assert verdicts["equal wall-clock: narrow_time validation MLM loss <= bert's"] == (-0.1, True)
    assert verdicts["equal wall-clock: narrow_time replaced_words span_f1 >= bert's"] == (-0.5, False)
