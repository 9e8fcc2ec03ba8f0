"""Task metrics on hand-worked examples (span F1 with seqeval's conventions), and against seqeval-style
edge cases: stray I- tags, type changes inside a run, entities at the end of a sentence."""

from __future__ import annotations

import pytest

from megatron_narrow.tasks.metrics import accuracy, bio_spans, macro_f1, span_f1


def test_bio_spans_follow_conlleval():
    tags = ["B-PER", "I-PER", "O", "I-LOC", "I-LOC", "B-LOC", "I-ORG", "B-MISC"]
    # a stray I- opens an entity; B- closes the previous one; a type change closes and opens; the end closes
    assert bio_spans(tags) == {("PER", 0, 1), ("LOC", 3, 4), ("LOC", 5, 5), ("ORG", 6, 6), ("MISC", 7, 7)}
    assert bio_spans(["O", "O"]) == set()
    with pytest.raises(ValueError, match="not BIO"):
        bio_spans(["S-PER"])


def test_span_f1_hand_worked():
    gold = [["B-PER", "I-PER", "O", "B-LOC", "O", "B-ORG", "I-ORG", "I-ORG"],
            ["O", "B-PER", "O", "B-LOC", "I-LOC"]]
    pred = [["B-PER", "I-PER", "O", "B-ORG", "O", "B-ORG", "I-ORG", "O"],  # exact PER; LOC typed ORG; ORG cut short
            ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]]  # PER one token too long; exact LOC
    # gold entities: PER(0,1) LOC(3,3) ORG(5,7) | PER(1,1) LOC(3,4)                -> 5
    # predicted:     PER(0,1) ORG(3,3) ORG(5,6) | PER(1,2) LOC(3,4)                -> 5
    # correct (type, start and end equal): PER(0,1), LOC(3,4)                        -> 2
    scores = span_f1(pred, gold)
    assert (scores.predicted, scores.gold, scores.correct) == (5, 5, 2)
    assert scores.precision == pytest.approx(2 / 5) and scores.recall == pytest.approx(2 / 5)
    assert scores.f1 == pytest.approx(0.4)

    # fewer predictions than gold entities: P = 1/1, R = 1/3, F1 = 2 * 1 * 1/3 / (4/3) = 0.5
    scores = span_f1([["B-PER", "O", "O", "O", "O"]], [["B-PER", "O", "B-LOC", "O", "B-PER"]])
    assert (scores.precision, scores.recall, scores.f1) == (1.0, pytest.approx(1 / 3), pytest.approx(0.5))
    assert span_f1([["O"]], [["O"]]).f1 == 0.0
    with pytest.raises(ValueError, match="sentence 0"):
        span_f1([["O"]], [["O", "O"]])


def test_accuracy_and_macro_f1_hand_worked():
    labels = [0, 0, 0, 1, 1, 2]
    preds = [0, 0, 1, 1, 2, 2]
    assert accuracy(preds, labels) == pytest.approx(4 / 6)
    # class 0: tp 2 fp 0 fn 1 -> 4/5; class 1: tp 1 fp 1 fn 1 -> 1/2; class 2: tp 1 fp 1 fn 0 -> 2/3
    assert macro_f1(preds, labels, num_classes=3) == pytest.approx((4 / 5 + 1 / 2 + 2 / 3) / 3)
    assert macro_f1([0, 0], [0, 0], num_classes=4) == 1.0  # absent classes are not averaged in


def test_span_f1_and_macro_f1_equal_the_reference_libraries():
    """Random BIO sequences, stray I- tags and type changes included: seqeval's default-mode micro scores;
    random class predictions: scikit-learn's macro F1."""
    import random

    from seqeval.metrics import f1_score, precision_score, recall_score
    from sklearn.metrics import f1_score as sklearn_f1

    rng = random.Random(0)
    tags = ["O", "O", "O", "B-PER", "I-PER", "B-LOC", "I-LOC", "I-ORG"]
    gold = [[rng.choice(tags) for _ in range(rng.randint(1, 12))] for _ in range(300)]
    pred = [[t if rng.random() < 0.7 else rng.choice(tags) for t in sentence] for sentence in gold]
    ours = span_f1(pred, gold)
    assert ours.f1 == pytest.approx(f1_score(gold, pred), abs=1e-12)
    assert ours.precision == pytest.approx(precision_score(gold, pred), abs=1e-12)
    assert ours.recall == pytest.approx(recall_score(gold, pred), abs=1e-12)

    labels = [rng.randrange(4) for _ in range(500)]
    preds = [y if rng.random() < 0.6 else rng.randrange(5) for y in labels]
    assert macro_f1(preds, labels, num_classes=5) == pytest.approx(sklearn_f1(labels, preds, average="macro"))


def test_glue_metrics_equal_scikit_learn_and_scipy():
    """MCC (CoLA), F1 of the positive class (MRPC/QQP), Pearson and Spearman (STS-B) on random data, ties and
    constant predictions included, against scikit-learn and scipy."""
    import random

    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import f1_score, matthews_corrcoef

    from megatron_narrow.tasks.metrics import binary_f1, matthews_correlation, pearson, spearman

    rng = random.Random(0)
    for trial in range(30):
        n, classes = rng.randint(2, 60), rng.choice([2, 3, 5])
        labels = [rng.randrange(classes) for _ in range(n)]
        preds = [rng.randrange(classes) for _ in range(n)] if trial % 5 else [labels[0]] * n  # constant sometimes
        assert matthews_correlation(preds, labels, classes) == pytest.approx(matthews_corrcoef(labels, preds),
                                                                             abs=1e-12)
        binary_labels, binary_preds = [y % 2 for y in labels], [p % 2 for p in preds]
        assert binary_f1(binary_preds, binary_labels) == pytest.approx(
            f1_score(binary_labels, binary_preds, zero_division=0.0), abs=1e-12)
        scores = [round(rng.uniform(0, 5), 1) for _ in range(n)]  # rounded: ties, as STS-B's gold scores have
        guesses = [s + rng.gauss(0, 1.5) for s in scores] if trial % 7 else [2.5] * n
        expected_r = 0.0 if len(set(guesses)) == 1 or len(set(scores)) == 1 else pearsonr(guesses, scores)[0]
        expected_rho = 0.0 if len(set(guesses)) == 1 or len(set(scores)) == 1 else spearmanr(guesses, scores)[0]
        assert pearson(guesses, scores) == pytest.approx(expected_r, abs=1e-9)
        assert spearman(guesses, scores) == pytest.approx(expected_rho, abs=1e-9)
