"""The task kinds, each stated once: how its files are read, its labels chosen and encoded, which head it trains,
its loss, how predictions become outputs, its metrics and what its export records. Fine-tuning, prediction and
the config look a kind up here by name (`task_kind`) and never branch on it.

- sequence: one label per text or text pair (MNLI-style); cross-entropy on the pooled [CLS].
- regression: one number per text or pair (STS-B); one output, mean squared error.
- token: one BIO tag per word (NER); the narrow layers run on the labeled words only.
Adding a kind is one class and one entry in KINDS (and its tests).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from megatron_narrow.data.tokenizer import Tokenizer
from megatron_narrow.model import BertForSequenceClassification, BertForTokenClassification
from megatron_narrow.tasks.data import (
    TaskDataError,
    encode_sequences,
    encode_tokens,
    read_sequence_examples,
    read_token_examples,
)
from megatron_narrow.tasks.metrics import (
    accuracy,
    binary_f1,
    macro_f1,
    matthews_correlation,
    pearson,
    span_f1,
    spearman,
)

if TYPE_CHECKING:
    from megatron_narrow.tasks.config import TaskConfig

SEQUENCE_TENSORS = ("input_ids", "attention_mask", "token_type_ids", "labels")


@dataclass(frozen=True)
class SequenceKind:
    """One class label per text or text pair."""

    name: str = "sequence"
    description: str = "sequence classification"
    metrics: tuple[str, ...] = ("accuracy", "macro_f1", "f1", "mcc")
    """What task.metrics may name."""
    default_metrics: tuple[str, ...] = ("accuracy", "macro_f1")
    reported: tuple[str, ...] = ()
    """Metrics it always reports whatever task.metrics says (the first one picks the best checkpoint)."""
    tensors: tuple[str, ...] = SEQUENCE_TENSORS
    """The encoded tensors a micro-batch carries, in the data loader's order."""
    model_class: type = BertForSequenceClassification
    hf_architecture: str = "ForSequenceClassification"
    """How the Hugging Face export's architecture name ends."""
    hf_problem_type: str | None = None
    """config.json's problem_type of the export (None: Hugging Face's default for the architecture)."""

    def read(self, path: str | Path, task: TaskConfig, labeled: bool) -> list:
        return read_sequence_examples(path, task, labeled=labeled)

    def label_set(self, task: TaskConfig, examples: list) -> list[str]:
        return list(task.labels) if task.labels else sorted({e.label for e in examples})

    def encode(self, examples: list, task: TaskConfig, tokenizer: Tokenizer, labels: list[str], where: str
               ) -> tuple[dict[str, torch.Tensor], list[int] | None]:
        """(tensors, labeled words per example: None, every example has one label)."""
        return encode_sequences(examples, tokenizer, labels, task.max_seq_len, where,
                                regression=self.hf_problem_type == "regression"), None

    def logits(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])

    def loss(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(logits, batch["labels"])

    def predictions(self, logits: torch.Tensor) -> torch.Tensor:
        """Label ids (N,) from the logits."""
        return logits.argmax(-1)

    def outputs(self, predictions: torch.Tensor, labels: list[str], examples: list,
                labeled_words: list[int] | None) -> list:
        """Per example: its predicted label."""
        return [labels[p] for p in predictions.tolist()]

    def scores(self, predictions: torch.Tensor, tensors: dict[str, torch.Tensor], labels: list[str], examples: list,
               labeled_words: list[int] | None, metrics: list[str] | None) -> tuple[dict, list]:
        """(the metrics, per-example outputs) of predictions against the encoded gold labels."""
        gold, predicted = tensors["labels"].tolist(), predictions.tolist()
        values = {name: sequence_metric(name, predicted, gold, len(labels))
                  for name in metrics or self.default_metrics}
        return values, self.outputs(predictions, labels, examples, labeled_words)

    def records(self, examples: list, outputs: list) -> list[dict]:
        """One JSON record per example: its input, gold label and prediction."""
        return [{"text": e.text, **({"text_pair": e.pair} if e.pair is not None else {}), "label": e.label,
                 "prediction": p} for e, p in zip(examples, outputs, strict=True)]


@dataclass(frozen=True)
class RegressionKind(SequenceKind):
    """One number per text or text pair, named after the field it predicts."""

    name: str = "regression"
    description: str = "regression"
    metrics: tuple[str, ...] = ("pearson", "spearman", "mse")
    default_metrics: tuple[str, ...] = ("pearson", "spearman")
    hf_problem_type: str | None = "regression"

    def label_set(self, task: TaskConfig, examples: list) -> list[str]:
        return [task.label_field]

    def loss(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.mse_loss(logits.squeeze(-1), batch["labels"].to(logits.dtype))

    def predictions(self, logits: torch.Tensor) -> torch.Tensor:
        """Scores (N,)."""
        return logits.squeeze(-1).float()

    def outputs(self, predictions: torch.Tensor, labels: list[str], examples: list,
                labeled_words: list[int] | None) -> list:
        return predictions.tolist()


@dataclass(frozen=True)
class TokenKind(SequenceKind):
    """One BIO tag per word; a word past task.max_seq_len / max_labeled_tokens gets no slot and is predicted O."""

    name: str = "token"
    description: str = "token classification"
    metrics: tuple[str, ...] = ()
    """Always entity span precision/recall/F1 and token accuracy."""
    default_metrics: tuple[str, ...] = ()
    reported: tuple[str, ...] = ("span_f1", "span_precision", "span_recall", "token_accuracy")
    tensors: tuple[str, ...] = ("input_ids", "attention_mask", "token_type_ids", "positions", "valid", "labels")
    model_class: type = BertForTokenClassification
    hf_architecture: str = "ForTokenClassification"

    def read(self, path: str | Path, task: TaskConfig, labeled: bool) -> list:
        return read_token_examples(path, task, labeled=labeled)

    def label_set(self, task: TaskConfig, examples: list) -> list[str]:
        """task.labels, or the training file's tags ("O" first, then sorted); every tag must be BIO."""
        if task.labels:
            labels = list(task.labels)
        else:
            tags = {t for e in examples for t in e.tags}
            labels = (["O"] if "O" in tags else []) + sorted(tags - {"O"})
        bad = [t for t in labels if t != "O" and not (t[:2] in ("B-", "I-") and len(t) > 2)]
        if bad:
            raise TaskDataError(f"tags {bad[:5]} are not BIO (O, B-TYPE, I-TYPE): span F1 needs BIO tagging")
        return labels

    def encode(self, examples: list, task: TaskConfig, tokenizer: Tokenizer, labels: list[str], where: str
               ) -> tuple[dict[str, torch.Tensor], list[int] | None]:
        encoded = encode_tokens(examples, tokenizer, labels, task.max_seq_len, task.query_slots, where)
        return encoded.tensors, encoded.labeled_words

    def logits(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], batch["positions"])

    def loss(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        labels = batch["labels"].flatten()  # mean over labeled words; a micro-batch without any gives 0, not NaN
        losses = F.cross_entropy(logits.flatten(0, 1), labels, ignore_index=-100, reduction="sum")
        return losses / (labels != -100).sum().clamp(min=1)

    def outputs(self, predictions: torch.Tensor, labels: list[str], examples: list,
                labeled_words: list[int] | None) -> list:
        """Per example: a tag per word (O for the words that lost their slot to truncation)."""
        return [[labels[t] for t in predictions[i, :labeled_words[i]].tolist()]
                + ["O"] * (len(example.words) - labeled_words[i]) for i, example in enumerate(examples)]

    def scores(self, predictions: torch.Tensor, tensors: dict[str, torch.Tensor], labels: list[str], examples: list,
               labeled_words: list[int] | None, metrics: list[str] | None) -> tuple[dict, list]:
        predicted_tags = self.outputs(predictions, labels, examples, labeled_words)
        gold_tags = [list(example.tags) for example in examples]
        spans = span_f1(predicted_tags, gold_tags)
        token_accuracy = accuracy([t for s in predicted_tags for t in s], [t for s in gold_tags for t in s])
        return {"span_precision": spans.precision, "span_recall": spans.recall, "span_f1": spans.f1,
                "token_accuracy": token_accuracy, "entities_gold": spans.gold}, predicted_tags

    def records(self, examples: list, outputs: list) -> list[dict]:
        return [{"tokens": e.words, "tags": e.tags, "predictions": p} for e, p in zip(examples, outputs, strict=True)]


KINDS: dict[str, SequenceKind] = {kind.name: kind for kind in (SequenceKind(), RegressionKind(), TokenKind())}


def task_kind(name: str) -> SequenceKind:
    """The kind called `name`; a one-line ValueError naming the known ones otherwise."""
    if name not in KINDS:
        raise ValueError(f"task.kind must be {', '.join(list(KINDS)[:-1])} or {list(KINDS)[-1]}, got {name!r}")
    return KINDS[name]


def read_examples(path: str | Path, task: TaskConfig, *, labeled: bool = True) -> list:
    """The file's examples; labeled=False reads inputs only (for prediction), labels left UNLABELED."""
    return task_kind(task.kind).read(path, task, labeled)


def label_set(task: TaskConfig, examples: list) -> list[str]:
    """task.labels, or the labels of the training file's examples (token tags: "O" first, BIO); regression has
    one output, named by task.label_field."""
    return task_kind(task.kind).label_set(task, examples)


def kind_of_export(hf_config: dict[str, Any], where: str) -> SequenceKind:
    """The kind of an exported classifier, from its architecture and problem_type."""
    architecture = (hf_config.get("architectures") or [""])[0]
    for kind in KINDS.values():
        if architecture.endswith(kind.hf_architecture) and hf_config.get("problem_type") == kind.hf_problem_type:
            return kind
    for kind in KINDS.values():  # an architecture of ours with a problem_type of Hugging Face's own
        if architecture.endswith(kind.hf_architecture) and kind.hf_problem_type is None:
            return kind
    raise ValueError(f"{where}: {architecture or 'no architecture'} is not a sequence or token classifier")


def sequence_metric(name: str, predictions: list, gold: list, num_classes: int) -> float:
    """One of a sequence or regression kind's metrics by name: class ids for classification, scores for
    regression."""
    if name == "accuracy":
        return accuracy(predictions, gold)
    if name == "macro_f1":
        return macro_f1(predictions, gold, num_classes)
    if name == "f1":
        return binary_f1(predictions, gold)
    if name == "mcc":
        return matthews_correlation(predictions, gold, num_classes)
    if name == "pearson":
        return pearson(predictions, gold)
    if name == "spearman":
        return spearman(predictions, gold)
    if name == "mse":
        return sum((p - y) ** 2 for p, y in zip(predictions, gold, strict=True)) / max(len(gold), 1)
    raise ValueError(f"unknown metric {name!r}")
