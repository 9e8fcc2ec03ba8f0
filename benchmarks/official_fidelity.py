"""`vs_official.py --fidelity EXPORT --fidelity-data RUN`: is a narrow export the same model in the official code?

Held-out batches come from RUN's own validation split, masked as in training (megatron_narrow.mlm_report). Ours:
the training checkpoint RUN as our BertForPreTraining runs it. Official: EXPORT (the Hugging Face export of RUN,
in the official key layout) loaded by the official NarrowBertForMaskedLM, which takes labels (-100 where no
target) and computes its narrow layers at the labelled positions, in position order. Compared: the MLM loss
over every held-out target (each side's own loss, weighted by its batch's targets) and the largest difference
between the two sides' logits at the same targets.

The two halves run in different environments: `prepare` in ours (it writes the batches and our outputs to a
file), `official_outputs` in the official venv (it reads the batches, writes its outputs); `compare` reads both.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import torch


def prepare(run_dir: str, samples: int, out_file: Path, batch_size: int = 16) -> None:
    """Held-out batches of RUN, and our model's loss and logits (positions in ascending order) on each."""
    from megatron_narrow.convert.checkpoint import load_merged_model, read_checkpoint_info
    from megatron_narrow.mlm_report import held_out_data
    from megatron_narrow.training.data import collate

    info = read_checkpoint_info(run_dir)
    run, _, data = held_out_data(info, samples)
    with contextlib.redirect_stdout(io.StringIO()):  # DeepSpeed's ZeRO reader narrates every file
        model = load_merged_model(info).eval()
    vocab = run.model.vocab_size
    batches, logits, losses = [], [], []
    with torch.no_grad():
        for start in range(0, samples, batch_size):
            batch = collate([data.valid[i] for i in range(start, min(start + batch_size, samples))])
            order = batch["target_positions"].argsort(dim=-1)  # the official code's order: by position
            batch = {**batch, **{key: batch[key].gather(1, order)
                                 for key in ("target_positions", "target_ids", "target_valid")}}
            out = model(**batch)
            valid = batch["target_valid"].bool()
            batches.append({key: value for key, value in batch.items() if torch.is_tensor(value)})
            logits.append(out.logits[..., :vocab][valid].float())
            losses.append((float(out.loss), int(valid.sum())))
    torch.save({"batches": batches, "logits": logits, "losses": losses}, out_file)


def official_outputs(export: str, in_file: Path, out_file: Path) -> None:
    """Runs in the official venv (its narrowbert package importable): the official model's loss and logits."""
    from narrowbert import NarrowBertForMaskedLM

    model = NarrowBertForMaskedLM.from_pretrained(export).eval()
    saved = torch.load(in_file, weights_only=True)
    logits, losses = [], []
    with torch.no_grad():
        for batch in saved["batches"]:
            valid = batch["target_valid"].bool()
            labels = torch.full_like(batch["input_ids"], -100)
            rows = torch.arange(labels.shape[0]).unsqueeze(-1).expand_as(valid)
            labels[rows[valid], batch["target_positions"][valid]] = batch["target_ids"][valid]
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        token_type_ids=batch["token_type_ids"], labels=labels)
            counts = valid.sum(dim=1)
            per_row = out.logits[:, : int(counts.max())]  # (B, most targets in a row, V), padded rows at the end
            keep = torch.arange(per_row.shape[1]).unsqueeze(0) < counts.unsqueeze(1)
            logits.append(per_row[keep].float())
            losses.append((float(out.loss), int(valid.sum())))
    torch.save({"logits": logits, "losses": losses}, out_file)


def compare(ours_file: Path, official_file: Path) -> dict:
    """{targets, ours_loss, official_loss, loss_diff, max_logit_diff} over every held-out target."""
    ours, official = torch.load(ours_file, weights_only=True), torch.load(official_file, weights_only=True)

    def mean_loss(losses: list[tuple[float, int]]) -> float:
        return sum(loss * count for loss, count in losses) / sum(count for _, count in losses)

    diffs = [(a[..., : b.shape[-1]] - b).abs().max().item() for a, b in zip(ours["logits"], official["logits"],
                                                                           strict=True)]
    ours_loss, official_loss = mean_loss(ours["losses"]), mean_loss(official["losses"])
    return {"targets": sum(count for _, count in ours["losses"]), "ours_loss": ours_loss,
            "official_loss": official_loss, "loss_diff": abs(ours_loss - official_loss),
            "max_logit_diff": max(diffs)}
