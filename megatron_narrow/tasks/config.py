"""The fine-tuning run config: YAML sections task, model, train (the pretraining TrainConfig), each key
overridable on the command line as section.key=value."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from megatron_narrow.config import TrainConfig, build_sections, read_yaml_with_overrides
from megatron_narrow.tasks.kinds import task_kind
from megatron_narrow.variants import trained_variant


@dataclass(kw_only=True, slots=True)
class TaskConfig:
    """What to learn and from which files (CSV/TSV, JSONL, or CoNLL for token classification)."""

    kind: str = "sequence"
    """sequence: one label per text (or text pair, MNLI-style); regression: one number per text or pair
    (STS-B; MSE loss, one output); token: one BIO tag per word (NER)."""

    train_file: str | None = None
    valid_file: str | None = None
    test_file: str | None = None

    text_field: str = "text"
    """sequence: the column/key of the (first) text."""

    text_pair_field: str | None = None
    """sequence: the column/key of the second text of a pair (None: single texts)."""

    label_field: str = "label"
    """sequence: the column/key of the label."""

    tokens_field: str = "tokens"
    """token, JSONL: the key of the list of words."""

    tags_field: str = "tags"
    """token, JSONL: the key of the list of tags (one per word)."""

    labels: list[str] | None = None
    """The label set, in id order; None: the sorted labels of the training file."""

    max_seq_len: int = 128
    """Tokens per sequence, [CLS] and [SEP]s included; longer inputs are truncated (longest text first)."""

    metrics: list[str] | None = None
    """Metrics reported on the valid file. sequence: any of accuracy, macro_f1, f1 (of label 1, MRPC/QQP),
    mcc (CoLA); regression: pearson, spearman, mse; None: accuracy + macro_f1 (sequence), pearson + spearman
    (regression). token: always entity span precision/recall/F1 and token accuracy."""

    best_metric: str | None = None
    """The validation metric that picks the best checkpoint (kept in SAVE_DIR/best) and drives early stopping;
    None: the first of task.metrics (token: span_f1). mse is better lower, every other metric higher."""

    early_stopping_patience: int | None = None
    """Stop after this many evaluations (every train.eval_interval steps) without a better best_metric;
    None: train all train.train_steps."""

    max_labeled_tokens: int | None = None
    """token: query slots per sequence (the narrow layers run on these rows); None: max_seq_len - 2.
    Words beyond it (or past max_seq_len) are not labeled; a warning counts them."""

    def __post_init__(self) -> None:
        allowed = task_kind(self.kind).metrics
        unknown = sorted(set(self.metrics or ()) - set(allowed))
        if self.metrics is not None and (unknown or not self.metrics):
            raise ValueError(f"task.metrics {self.metrics} for task.kind={self.kind}: choose from "
                             f"{', '.join(allowed) or 'none (token tasks report span F1)'}")
        if self.best_metric is not None and self.best_metric not in (*allowed, *task_kind(self.kind).reported):
            raise ValueError(f"task.best_metric={self.best_metric} for task.kind={self.kind}: choose from "
                             f"{', '.join((*allowed, *task_kind(self.kind).reported))}")
        if self.early_stopping_patience is not None and self.early_stopping_patience < 1:
            raise ValueError(f"task.early_stopping_patience must be >= 1 (or null), got {self.early_stopping_patience}")
        if self.max_seq_len < 3:
            raise ValueError(f"task.max_seq_len must be >= 3, got {self.max_seq_len}")
        if self.max_labeled_tokens is not None and not 1 <= self.max_labeled_tokens <= self.max_seq_len - 2:
            raise ValueError(f"task.max_labeled_tokens must be in [1, max_seq_len - 2 = {self.max_seq_len - 2}], "
                             f"got {self.max_labeled_tokens}")

    @property
    def chosen_metrics(self) -> list[str]:
        return list(self.metrics or task_kind(self.kind).default_metrics)

    @property
    def selection_metric(self) -> str:
        """task.best_metric, or the first metric the kind reports."""
        return self.best_metric or (*task_kind(self.kind).reported, *self.chosen_metrics)[0]

    @property
    def query_slots(self) -> int:
        return self.max_labeled_tokens or self.max_seq_len - 2


@dataclass(kw_only=True, slots=True)
class FinetuneModelConfig:
    """Where the encoder comes from, and what may change for fine-tuning."""

    init_from: str | None = None
    """A megatron_narrow pretraining checkpoint (a save_dir or a step_ directory) or a Hugging Face BERT /
    NarrowBERT directory (config.json + safetensors + tokenizer)."""

    variant: str | None = None
    """A variant that runs as itself (bert, narrow); None: the checkpoint's (a token_drop checkpoint is a plain
    BERT and fine-tunes as bert)."""

    hidden_dropout: float | None = None
    """None: the checkpoint's."""

    attention_dropout: float | None = None
    """None: the checkpoint's."""

    init_seed: int = 1234
    """Seed of the fresh classifier (and pooler) weights."""


@dataclass(kw_only=True, slots=True)
class FinetuneConfig:
    task: TaskConfig = field(default_factory=TaskConfig)
    model: FinetuneModelConfig = field(default_factory=FinetuneModelConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(train_steps=1000, lr=3e-5, warmup_steps=100,
                                                                   save_dir="runs/finetune", num_workers=0))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> FinetuneConfig:
        defaults = asdict(cls().train)
        raw = {**raw, "train": {**defaults, **(raw.get("train") or {})}}
        return cls(**build_sections(raw, {"task": TaskConfig, "model": FinetuneModelConfig, "train": TrainConfig}))

    def validate(self) -> None:
        """What needs more than one field, checked before any process starts talking."""
        if not self.model.init_from:
            raise ValueError("model.init_from is required: a pretraining checkpoint or a Hugging Face directory")
        if not self.task.train_file:
            raise ValueError("task.train_file is required")
        for name in ("train_file", "valid_file", "test_file"):
            path = getattr(self.task, name)
            if path and not Path(path).exists():  # a file, or a `datasets` directory
                raise ValueError(f"task.{name}: {path} does not exist")
        if not Path(self.model.init_from).exists():
            raise ValueError(f"model.init_from: {self.model.init_from} does not exist")
        if self.model.variant is not None:
            trained_variant(self.model.variant)
        if self.task.early_stopping_patience is not None and not (self.train.eval_interval and self.task.valid_file):
            raise ValueError("task.early_stopping_patience needs evaluations: set train.eval_interval and "
                             "task.valid_file")


def load_finetune_config(path: str | None, overrides: list[str]) -> FinetuneConfig:
    return FinetuneConfig.from_dict(read_yaml_with_overrides(path, overrides))
