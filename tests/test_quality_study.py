"""benchmarks/quality.py's downstream tasks and verdicts (the study itself runs for over an hour; its numbers are
in benchmarks/RESULTS.md): the library task is balanced and never names the library, the sentence-ends
task tags exactly the words whose full stop it removed, a task bert did not learn gets no verdict, and the
targets are judged by their arithmetic."""

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


def test_sentence_ends_tag_the_words_a_removed_full_stop_followed():
    sentences = ["Return the path.", "If None, use the default.", "It is e.g. shown.", "Raise an error.",
                 "Close it."]
    examples = quality.sentence_ends(sentences, random.Random(0))
    assert [" ".join(e["tokens"]) for e in examples] == [  # runs of 2 or 3, every sentence once, in order
        "Return the path If None, use the default It is e.g. shown.", "Raise an error Close it."]
    for example in examples:
        assert len(example["tokens"]) == len(example["tags"])
    ended = [w for e in examples for w, t in zip(e["tokens"], e["tags"], strict=True) if t == "B-END"]
    assert ended == ["path", "default", "error"]  # the last sentence of a group keeps its stop: nothing to tag


def study(bert: dict[str, list[float]], others: dict[str, dict[str, list[float]]], tmp_path) -> dict:
    """A results dict as main() builds it, from downstream scores; MLM top-1 24% (bert) against 6% unigram."""
    valid = tmp_path / "library_valid.jsonl"
    valid.write_text("".join(f'{{"text": "s", "label": "{label}"}}\n' for label in "aabbcc"))  # majority 33.3
    files = {task: {"valid": str(valid)} for task in quality.TASKS}
    downstream = {"bert": bert, **others}
    pretraining = {m: [{"mlm_top1": 24.0 if m == "bert" else 25.0, "unigram_top1": 6.0}] for m in quality.MODELS}
    mlm, tasks, unigram = quality.collect(pretraining, downstream, files)
    results = {"mlm_top1": mlm, "unigram_top1": unigram, "tasks": tasks}
    results["targets"] = quality.judge(results)
    return results


def test_verdicts_on_informative_tasks_follow_their_arithmetic(tmp_path):
    bert = {"library": [50.0, 52.0], "sentence_ends": [60.0, 62.0]}
    others = {"narrow": {"library": [48.5, 49.5], "sentence_ends": [57.0, 58.0]},
              "token_drop": {"library": [51.0, 51.0], "sentence_ends": [61.0, 61.0]},
              "narrow_time": {"library": [52.0, 53.0], "sentence_ends": [60.0, 61.0]}}
    results = study(bert, others, tmp_path)
    tasks = results["tasks"]
    assert tasks["library"]["majority_baseline"] == 100 / 3
    assert tasks["library"]["informative"] and tasks["sentence_ends"]["informative"]  # 51 >= 33.3 + 15; F1 61 >= 50
    assert tasks["library"]["models"]["narrow"] == {"mean": 49.0, "std": 0.71, "min": 48.5, "max": 49.5, "runs": 2}
    verdicts = {c["target"]: (c["value"], c["met"]) for c in results["targets"]}
    assert verdicts["bert held-out masked top-1 >= 3 x unigram (6.0%)"] == (4.0, True)
    assert verdicts["equal steps: narrow library accuracy within 2 points of bert"] == (-2.0, True)
    assert verdicts["equal steps: narrow sentence_ends span_f1 within 2 points of bert"] == (-3.5, False)
    assert verdicts["equal wall-clock: narrow_time sentence_ends span_f1 >= bert's"] == (-0.5, False)
    assert verdicts["equal wall-clock: narrow_time held-out masked top-1 >= bert's"] == (1.0, True)


def test_a_task_bert_did_not_learn_gets_no_verdict(tmp_path):
    """library: 48 < majority 33.3 + 15; sentence_ends: F1 40 < 50. Neither is ever counted as met."""
    scores = {"library": [48.0, 48.0], "sentence_ends": [40.0, 40.0]}
    results = study(scores, {m: scores for m in ("narrow", "token_drop", "narrow_time")}, tmp_path)
    assert not results["tasks"]["library"]["informative"] and not results["tasks"]["sentence_ends"]["informative"]
    verdicts = {c["target"]: c for c in results["targets"]}
    assert {target for target in verdicts if "library" in target or "sentence_ends" in target} == {
        "library: every verdict", "sentence_ends: every verdict"}
    assert all(verdicts[t]["met"] is None for t in ("library: every verdict", "sentence_ends: every verdict"))
    table = quality.markdown({**results, "pretraining": {m: [{"steps": 10, "train_seconds": 1.0,
                                                              "curve": [[10, 1.0, 5.0]]}] for m in quality.MODELS},
                              "pretrain_seeds": 1, "seeds": (1, 2), "jobs": 2, "threads_per_run": 1})
    assert "| sentence_ends: every verdict | - | not informative (bert span F1 40.0 vs 50 needed) |" in table
    assert "| library: every verdict | - | not informative (bert 48.0 vs majority 33.3 + 15) |" in table


def test_the_item_5_ablation_is_summarised_beside_the_checkpoint_it_was_made_from(tmp_path):
    bert = {"library": [50.0, 52.0], "sentence_ends": [60.0, 62.0]}
    others = {m: {"library": [49.0, 51.0], "sentence_ends": [60.0, 60.0]}
              for m in ("narrow", "token_drop", "narrow_time")}
    others["narrow_as_bert"] = {"library": [55.0, 57.0]}  # a task without ablation runs: none reported
    others["bert_as_narrow"] = {"library": [40.0, 44.0]}
    results = study(bert, others, tmp_path)
    assert results["tasks"]["library"]["ablations"]["narrow_as_bert"]["mean"] == 56.0
    assert results["tasks"]["library"]["ablations"]["bert_as_narrow"]["std"] == 2.83
    assert results["tasks"]["sentence_ends"]["ablations"] == {}
    table = quality.markdown({**results, "pretraining": {m: [{"steps": 10, "train_seconds": 1.0,
                                                              "curve": [[10, 1.0, 5.0]]}] for m in quality.MODELS},
                              "pretrain_seeds": 1, "seeds": (1, 2), "jobs": 2, "threads_per_run": 1})
    assert "| library | narrow_as_bert | narrow | bert | 56.0 +- 1.4 (55.0-57.0) | 50.0 +- 1.4 |" in table
    assert "| library | bert_as_narrow | bert | narrow | 42.0 +- 2.8 (40.0-44.0) | 51.0 +- 1.4 |" in table
