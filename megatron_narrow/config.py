"""Configuration dataclasses, grouped by concern. A leaf module: it imports nothing of ours.

Every field has a docstring; `__post_init__` derives defaults and raises ValueError naming the field
and its value, before any compute or process-group work happens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(kw_only=True, slots=True)
class DataConfig:
    """Where the preprocessed data lives and how BERT samples are cut and masked from it."""

    data_paths: list[str] = field(default_factory=list)
    """Preprocessed dataset directories (each holds an index.json manifest)."""

    data_weights: list[float] | None = None
    """Blending weights, one per data path; None means proportional to each dataset's sample count."""

    split: str = "949,50,1"
    """Train/valid/test proportions, split by documents (Megatron's convention)."""

    seq_len: int = 512
    """Tokens per sample, [CLS] and [SEP]s included; shorter samples are padded (static shapes)."""

    max_predictions: int = 80
    """Fixed number of MLM target slots per sample (M); a validity mask covers unused slots."""

    mask_prob: float = 0.15
    """Fraction of a sample's real (non-special) tokens that become MLM targets, rounded half up."""

    mask_token_prob: float = 0.8
    """Of the targets, the fraction replaced by [MASK]."""

    random_token_prob: float = 0.1
    """Of the targets, the fraction replaced by a random non-special token; the rest stay unchanged."""

    whole_word_masking: bool = False
    """Pick targets by whole words (all pieces of a word together), as in BERT's WWM checkpoints."""

    pair_task: Literal["none", "nsp", "sop"] = "none"
    """Second pretraining task: none (MLM only, as both papers), next-sentence or sentence-order."""

    seed: int = 1234
    """Seed of shuffling and masking: sample i of epoch e is a pure function of (seed, e, i)."""

    def __post_init__(self) -> None:
        if self.seq_len < 8:
            raise ValueError(f"data.seq_len must be at least 8, got {self.seq_len}")
        if not 0 < self.max_predictions <= self.seq_len:
            raise ValueError(
                f"data.max_predictions must be in [1, seq_len={self.seq_len}], got {self.max_predictions}"
            )
        if not 0.0 < self.mask_prob < 1.0:
            raise ValueError(f"data.mask_prob must be in (0, 1), got {self.mask_prob}")
        if self.mask_token_prob < 0 or self.random_token_prob < 0 or self.mask_token_prob + self.random_token_prob > 1:
            raise ValueError(
                "data.mask_token_prob and data.random_token_prob must be >= 0 and sum to <= 1, "
                f"got {self.mask_token_prob} and {self.random_token_prob}"
            )
        if self.pair_task not in ("none", "nsp", "sop"):
            raise ValueError(f"data.pair_task must be none, nsp or sop, got {self.pair_task!r}")
        if self.data_weights is not None and len(self.data_weights) != len(self.data_paths):
            raise ValueError(
                f"data.data_weights has {len(self.data_weights)} entries but data.data_paths has {len(self.data_paths)}"
            )
        if self.data_weights is not None and (any(w < 0 for w in self.data_weights) or sum(self.data_weights) <= 0):
            raise ValueError(f"data.data_weights must be non-negative with a positive sum, got {self.data_weights}")
        split_fractions(self.split)


def split_fractions(split: str) -> tuple[float, float, float]:
    """Parse "949,50,1" into normalised (train, valid, test) fractions; raises on a malformed string."""
    try:
        parts = [float(p) for p in split.replace("/", ",").split(",")]
    except ValueError:
        raise ValueError(f"data.split must be comma-separated numbers like '949,50,1', got {split!r}") from None
    parts += [0.0] * (3 - len(parts))
    if len(parts) != 3 or any(p < 0 for p in parts) or sum(parts) <= 0:
        raise ValueError(f"data.split must be up to three non-negative numbers with a positive sum, got {split!r}")
    total = sum(parts)
    return parts[0] / total, parts[1] / total, parts[2] / total
