"""Task metrics: accuracy, macro-F1 over classes, and entity-level span F1 over BIO tags.

Span F1 follows seqeval's default (conlleval) conventions, so numbers compare with published NER results:
an entity is a maximal run of tags of one type that starts at a B- tag, or at an I- tag that follows O or
a tag of another type (a stray I- opens an entity rather than being dropped); it ends before O, B- or a tag
of another type. A predicted entity counts only if its type, start and end all equal a gold entity's;
precision, recall and F1 are micro-averaged over all entities of all sentences.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


def accuracy(predictions: Sequence[int], labels: Sequence[int]) -> float:
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    if not labels:
        return 0.0
    return sum(p == y for p, y in zip(predictions, labels, strict=True)) / len(labels)


def macro_f1(predictions: Sequence[int], labels: Sequence[int], num_classes: int) -> float:
    """Unweighted mean of per-class F1 over the classes that occur in the labels or the predictions
    (scikit-learn's f1_score(average="macro") on the same data)."""
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    scores = []
    for c in range(num_classes):
        tp = sum(p == c and y == c for p, y in zip(predictions, labels, strict=True))
        fp = sum(p == c and y != c for p, y in zip(predictions, labels, strict=True))
        fn = sum(p != c and y == c for p, y in zip(predictions, labels, strict=True))
        if tp + fp + fn:
            scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores) if scores else 0.0


def bio_spans(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """The entities of one sentence as (type, first index, last index)."""
    spans = set()
    start, kind = None, None
    for i, tag in enumerate([*tags, "O"]):  # the sentinel closes a final entity
        prefix, _, tag_type = tag.partition("-")
        if prefix not in ("B", "I", "O"):
            raise ValueError(f"tag {tag!r} is not BIO (B-TYPE, I-TYPE or O)")
        continues = prefix == "I" and kind == tag_type
        if start is not None and not continues:
            spans.add((kind, start, i - 1))
            start, kind = None, None
        if prefix in ("B", "I") and not continues:
            start, kind = i, tag_type
    return spans


@dataclass(frozen=True)
class SpanScores:
    precision: float
    recall: float
    f1: float
    predicted: int
    gold: int
    correct: int


def span_f1(predicted: Sequence[Sequence[str]], gold: Sequence[Sequence[str]]) -> SpanScores:
    """Micro-averaged entity precision, recall and F1 over sentences of BIO tags."""
    if len(predicted) != len(gold):
        raise ValueError(f"{len(predicted)} predicted sentences for {len(gold)} gold ones")
    n_pred = n_gold = n_correct = 0
    for index, (p, g) in enumerate(zip(predicted, gold, strict=True)):
        if len(p) != len(g):
            raise ValueError(f"sentence {index}: {len(p)} predicted tags for {len(g)} gold tags")
        p_spans, g_spans = bio_spans(p), bio_spans(g)
        n_pred, n_gold, n_correct = n_pred + len(p_spans), n_gold + len(g_spans), n_correct + len(p_spans & g_spans)
    precision = n_correct / n_pred if n_pred else 0.0
    recall = n_correct / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return SpanScores(precision, recall, f1, n_pred, n_gold, n_correct)
