"""Batch prediction with an exported classifier, through our model code (so narrow computes [CLS] or the
words' first sub-tokens only), reporting throughput.

    model = load_classifier("runs/finetune/hf")
    records, stats = predict_file(model, "test.jsonl", batch_size=64)
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from megatron_narrow.data.tokenizer import Tokenizer
from megatron_narrow.tasks.config import TaskConfig
from megatron_narrow.tasks.kinds import kind_of_export, read_examples, task_kind
from megatron_narrow.tasks.loop import encode_examples, predict, prediction_records


@dataclass
class Classifier:
    model: torch.nn.Module
    kind: str
    """sequence, regression or token"""
    labels: list[str]
    tokenizer: Tokenizer
    max_seq_len: int
    """The fine-tuning run's task.max_seq_len (recorded in the export), unless overridden."""
    text_pair_field: str | None = None
    """The fine-tuning run's task.text_pair_field: a pair classifier reads pairs by default."""
    text_field: str = "text"
    """The fine-tuning run's task.text_field (recorded in the export): prediction files use it by default."""
    tokens_field: str = "tokens"
    """The fine-tuning run's task.tokens_field (token classification, JSONL)."""


def load_classifier(hf_dir: str | Path, *, max_seq_len: int | None = None) -> Classifier:
    """An exported BertFor{Sequence,Token}Classification (or the NarrowBERT ones) as our model, TP=1, eval."""
    from safetensors.torch import load_file

    from megatron_narrow.formats.hf_bert import load_hf_state_dict
    from megatron_narrow.tasks.source import hf_tokenizer, model_config_from_hf

    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        hint = (" (a pretraining save_dir: fine-tune it with megatron_narrow/finetune.py, whose SAVE_DIR/hf this "
                "tool reads)" if (hf_dir / "checkpoints").is_dir() or (hf_dir / "run_config.json").is_file() else "")
        raise ValueError(f"{hf_dir} is not an exported classifier: it has no config.json{hint}")
    raw = json.loads((hf_dir / "config.json").read_text())
    kind = kind_of_export(raw, str(hf_dir))
    if "id2label" not in raw:
        raise ValueError(f"{hf_dir}/config.json has no id2label: not a classifier exported by finetune.py")
    labels = [raw["id2label"][str(i)] for i in range(len(raw["id2label"]))]
    config = replace(model_config_from_hf(raw, str(hf_dir / "config.json")), hidden_dropout=0.0,
                     attention_dropout=0.0)
    model = kind.model_class(config, len(labels)).eval()
    state = {}
    for file in sorted(hf_dir.glob("*.safetensors")):
        state.update(load_file(str(file)))
    head = {f"head.{key}": state.pop(key) for key in ("classifier.weight", "classifier.bias")}
    missing = load_hf_state_dict(model, state)
    model.load_state_dict(head, strict=False)
    if [k for k in missing if not k.startswith("head.")]:
        raise ValueError(f"{hf_dir}: the weights lack {missing[:5]}")
    trained = raw.get("finetune_max_seq_len") or config.max_position_embeddings
    return Classifier(model, kind.name, labels, hf_tokenizer(hf_dir), max_seq_len or trained,
                      raw.get("finetune_text_pair_field"), raw.get("finetune_text_field") or "text",
                      raw.get("finetune_tokens_field") or "tokens")


@dataclass
class PredictionStats:
    examples: int
    seconds: float
    tokens: int
    """Real (non-padding) tokens encoded."""

    @property
    def sequences_per_s(self) -> float:
        return self.examples / self.seconds

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def predict_file(classifier: Classifier, path: str | Path, task: TaskConfig | None = None, *,
                 batch_size: int = 32) -> tuple[list[dict], PredictionStats]:
    """Predict every example of a task file (labels in it are kept beside the predictions, not needed)."""
    task = task or TaskConfig(text_field=classifier.text_field, text_pair_field=classifier.text_pair_field,
                              tokens_field=classifier.tokens_field)
    task = replace(task, kind=classifier.kind, max_seq_len=classifier.max_seq_len, labels=classifier.labels)
    try:
        examples = read_examples(path, task)
    except ValueError:  # no labels in the file: inputs only
        examples = read_examples(path, task, labeled=False)
    tensors, labeled_words = encode_examples(examples, task, classifier.tokenizer, classifier.labels, str(path))
    started = time.perf_counter()
    predictions = predict(classifier.model, tensors, classifier.kind, batch_size, torch.device("cpu"))
    seconds = time.perf_counter() - started
    predicted = task_kind(classifier.kind).outputs(predictions, classifier.labels, examples, labeled_words)
    stats = PredictionStats(len(examples), seconds, int(tensors["attention_mask"].sum()))
    return prediction_records(examples, predicted, classifier.kind), stats
