"""What a pretraining run learned, in numbers a newcomer can read.

Top-1 accuracy on held-out masked tokens (the run's own validation split, masked as in training) for the
trained model, for an untrained model of the same shape, and for the unigram baseline (always guess the
training split's most frequent token); and fill-mask guesses before and after training on a few held-out
sentences. A model that learned something beats the baseline; one that did not sits near it.
"""

from __future__ import annotations

import contextlib
import io
import itertools
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from megatron_narrow.config import DataConfig, RunConfig
from megatron_narrow.convert.checkpoint import (
    CheckpointInfo,
    load_merged_model,
    read_checkpoint_info,
    tokenizer_source,
)
from megatron_narrow.data.samples import split_document_ranges
from megatron_narrow.data.shards import IndexedDocuments
from megatron_narrow.data.tokenizer import Tokenizer, load_tokenizer
from megatron_narrow.model import BertForPreTraining
from megatron_narrow.training.data import PretrainingData, build_datasets, collate

UNIGRAM_DOCUMENTS = 50_000
"""The unigram counts read at most this many training documents (enough for a stable top token)."""


@dataclass
class FillMaskExample:
    text: str
    """The held-out sample with one target shown as [MASK]."""
    answer: str
    before: list[str]
    """Top guesses of the untrained model."""
    after: list[str]
    """Top guesses of the trained model."""


@dataclass
class MLMReport:
    step: int
    targets: int
    """Held-out masked tokens scored."""
    trained_accuracy: float
    untrained_accuracy: float
    unigram_accuracy: float
    unigram_token: str
    examples: list[FillMaskExample] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"held-out masked tokens ({self.targets:,}), top-1 accuracy after {self.step} steps:",
               f"  trained model        {100 * self.trained_accuracy:5.1f}%",
               f"  unigram baseline     {100 * self.unigram_accuracy:5.1f}%  (always '{self.unigram_token}')",
               f"  untrained model      {100 * self.untrained_accuracy:5.1f}%",
               "fill-mask on held-out text (top 3 guesses, before -> after training):"]
        for example in self.examples:
            out += [f"  {example.text}",
                    f"    answer '{example.answer}': before {example.before} -> after {example.after}"]
        return out


def piece_text(tokenizer: Tokenizer, ids: list[int]) -> str:
    """Readable text of token ids: sentencepiece pieces joined at their word marks, WordPiece's ## joined."""
    pieces = [tokenizer.id_to_token(int(i)) for i in ids]
    if getattr(tokenizer, "kind", None) == "sentencepiece":
        return "".join(pieces).replace("\u2581", " ").strip()
    return " ".join(pieces).replace(" ##", "").strip()


def unigram_counts(data_path: str, split: str, vocab_size: int, special: tuple[int, ...]) -> np.ndarray:
    """Token counts over (the start of) the training split of one data path, special tokens excluded."""
    documents = IndexedDocuments(data_path, check_token_ids=False)
    train, _, _ = split_document_ranges(len(documents), split)
    tokens = [documents.tokens(index) for index in itertools.islice(train, UNIGRAM_DOCUMENTS)]
    counts = np.bincount(np.concatenate(tokens), minlength=vocab_size)[:vocab_size] if tokens else (
        np.zeros(vocab_size, dtype=np.int64))
    counts[list(special)] = 0
    return counts


def held_out_data(info: CheckpointInfo, samples: int) -> tuple[RunConfig, DataConfig, PretrainingData]:
    """(the run's config, its last data phase, its datasets built for `samples` held-out samples): the
    validation split masked as in training, which `data.valid[i]` and `collate` turn into model batches."""
    run = RunConfig.from_dict(info.run_config)
    data_config = run.data.phases()[-1]
    data = build_datasets(data_config, run.model, run.train, total_samples=samples)
    if data.valid is None:
        raise ValueError(f"{info.path}: the run's data.split={data_config.split} holds out no validation "
                         "documents; give it a validation share (e.g. 98,2,0)")
    return run, data_config, data


@torch.no_grad()
def mlm_report(save_dir: str | Path, *, samples: int = 128, examples: int = 3, batch_size: int = 16,
               trust: bool = False) -> MLMReport:
    """Score the newest checkpoint of `save_dir` (or a step directory) on its run's validation split; `trust`:
    load its files without the pickle check (--trust-checkpoint)."""
    info = read_checkpoint_info(save_dir, trust=trust)
    source = tokenizer_source(info)
    if source is None:
        raise ValueError(f"{info.path}: the run has no train.tokenizer_model, so its tokens cannot be shown")
    tokenizer = load_tokenizer(*source)
    run, data_config, data = held_out_data(info, samples)
    with contextlib.redirect_stdout(io.StringIO()):  # DeepSpeed's ZeRO reader narrates every file
        trained = load_merged_model(info).eval()
    untrained = BertForPreTraining(run.model, pair_head=info.pair_head).eval()
    vocab = run.model.vocab_size
    counts = sum(unigram_counts(path, data_config.split, vocab, data.special.ids()) for path in data_config.data_paths)
    top_token = int(np.argmax(counts))

    correct = Counter()
    scored = 0
    shown: list[FillMaskExample] = []
    for start in range(0, samples, batch_size):
        batch = collate([data.valid[i] for i in range(start, min(start + batch_size, samples))])
        valid = batch["target_valid"].bool()
        targets = batch["target_ids"]
        guesses = {}
        for name, model in (("trained", trained), ("untrained", untrained)):
            logits = model(**batch).logits[:, -targets.shape[1]:, :vocab]
            guesses[name] = logits.topk(3, dim=-1).indices
            correct[name] += int(((guesses[name][..., 0] == targets) & valid).sum())
        correct["unigram"] += int(((targets == top_token) & valid).sum())
        scored += int(valid.sum())
        for row in range(targets.shape[0]):
            if len(shown) < examples and valid[row].any():
                shown.append(_example(tokenizer, batch, row, guesses))
    return MLMReport(step=info.step or 0, targets=scored, trained_accuracy=correct["trained"] / max(scored, 1),
                     untrained_accuracy=correct["untrained"] / max(scored, 1),
                     unigram_accuracy=correct["unigram"] / max(scored, 1),
                     unigram_token=piece_text(tokenizer, [top_token]) or tokenizer.id_to_token(top_token),
                     examples=shown)


def _example(tokenizer: Tokenizer, batch: dict[str, torch.Tensor], row: int, guesses: dict[str, torch.Tensor],
             context: int = 12) -> FillMaskExample:
    """The row's first target as a fill-mask question, `context` tokens either side; the row's other targets
    are shown as their true tokens."""
    position = int(batch["target_positions"][row, 0])
    ids = batch["input_ids"][row].clone()
    targets = batch["target_valid"][row].bool()
    ids[batch["target_positions"][row][targets]] = batch["target_ids"][row][targets]
    end = int(batch["attention_mask"][row].sum()) - 1  # before the last [SEP]
    left = ids[max(1, position - context):position].tolist()
    right = ids[position + 1:min(end, position + 1 + context)].tolist()
    text = f"{piece_text(tokenizer, left)} [MASK] {piece_text(tokenizer, right)}".strip()

    def words(name: str) -> list[str]:
        return [piece_text(tokenizer, [int(i)]) or tokenizer.id_to_token(int(i)) for i in guesses[name][row, 0]]

    return FillMaskExample(text=text, answer=piece_text(tokenizer, [int(batch["target_ids"][row, 0])]),
                           before=words("untrained"), after=words("trained"))
