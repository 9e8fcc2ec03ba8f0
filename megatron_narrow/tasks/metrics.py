"""Task metrics: accuracy, macro-F1, F1 of the positive class and Matthews correlation (classification: GLUE's
MRPC/QQP and CoLA), Pearson and Spearman correlation (regression: STS-B), and entity-level span F1 over BIO tags.

Span F1 follows seqeval's default (conlleval) conventions, so numbers compare with published NER results:
an entity is a maximal run of tags of one type that starts at a B- tag, or at an I- tag that follows O or
a tag of another type (a stray I- opens an entity rather than being dropped); it ends before O, B- or a tag
of another type. A predicted entity counts only if its type, start and end all equal a gold entity's;
precision, recall and F1 are micro-averaged over all entities of all sentences.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

LOWER_IS_BETTER = frozenset({"mse"})
"""Metrics where a smaller value is the better model (every other is better higher)."""


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


def binary_f1(predictions: Sequence[int], labels: Sequence[int], positive: int = 1) -> float:
    """F1 of the positive class (scikit-learn's f1_score(average="binary")): GLUE's MRPC and QQP."""
    _check_lengths(predictions, labels)
    tp = sum(p == positive and y == positive for p, y in zip(predictions, labels, strict=True))
    fp = sum(p == positive and y != positive for p, y in zip(predictions, labels, strict=True))
    fn = sum(p != positive and y == positive for p, y in zip(predictions, labels, strict=True))
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def matthews_correlation(predictions: Sequence[int], labels: Sequence[int], num_classes: int) -> float:
    """Matthews correlation coefficient, multiclass (Gorodkin's R_K, as scikit-learn): GLUE's CoLA. 0 when
    either side predicts a single class."""
    _check_lengths(predictions, labels)
    n = len(labels)
    correct = sum(p == y for p, y in zip(predictions, labels, strict=True))
    true_counts = [sum(y == c for y in labels) for c in range(num_classes)]
    predicted_counts = [sum(p == c for p in predictions) for c in range(num_classes)]
    agreement = sum(t * q for t, q in zip(true_counts, predicted_counts, strict=True))
    denominator = ((n * n - sum(q * q for q in predicted_counts)) * (n * n - sum(t * t for t in true_counts))) ** 0.5
    return (correct * n - agreement) / denominator if denominator else 0.0


def pearson(predictions: Sequence[float], labels: Sequence[float]) -> float:
    """Pearson's r (scipy.stats.pearsonr's statistic); 0 when either side is constant."""
    _check_lengths(predictions, labels)
    n = len(labels)
    if n < 2:
        return 0.0
    mean_p, mean_y = sum(predictions) / n, sum(labels) / n
    cov = sum((p - mean_p) * (y - mean_y) for p, y in zip(predictions, labels, strict=True))
    var_p = sum((p - mean_p) ** 2 for p in predictions)
    var_y = sum((y - mean_y) ** 2 for y in labels)
    return cov / (var_p * var_y) ** 0.5 if var_p > 0 and var_y > 0 else 0.0


def average_ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties sharing the mean of their ranks (scipy.stats.rankdata's default)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for position in range(start, end + 1):
            ranks[order[position]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman(predictions: Sequence[float], labels: Sequence[float]) -> float:
    """Spearman's rho: Pearson's r of the average ranks (scipy.stats.spearmanr's statistic)."""
    return pearson(average_ranks(predictions), average_ranks(labels))


def _check_lengths(predictions: Sequence, labels: Sequence) -> None:
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")


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
