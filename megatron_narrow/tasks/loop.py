"""The fine-tuning loop: a DeepSpeed engine over data parallelism, evaluation with the task's metrics, and
export of the result to Hugging Face.

Every rank evaluates the whole valid file (task files are small), so the metrics need no gathering and
rank 0 reports them. The loss is the mean cross-entropy of each micro-batch (over its labeled words for
token classification). At the end, rank 0 writes SAVE_DIR/hf (model, tokenizer, labels in the config),
SAVE_DIR/eval_results.json and SAVE_DIR/valid_predictions.jsonl.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from megatron_narrow.config import ParallelConfig
from megatron_narrow.data.tokenizer import Tokenizer
from megatron_narrow.model import BertForSequenceClassification, BertForTokenClassification
from megatron_narrow.model.recompute import set_activation_checkpointing
from megatron_narrow.parallel import ProcessGroups, RNGStatesTracker
from megatron_narrow.tasks.config import DEFAULT_METRICS, FinetuneConfig, TaskConfig
from megatron_narrow.tasks.data import encode_sequences, encode_tokens, label_set, read_examples
from megatron_narrow.tasks.metrics import (
    accuracy,
    binary_f1,
    macro_f1,
    matthews_correlation,
    pearson,
    span_f1,
    spearman,
)
from megatron_narrow.tasks.source import Pretrained, load_pretrained

TENSOR_ORDER = {"sequence": ("input_ids", "attention_mask", "token_type_ids", "labels"),
                "token": ("input_ids", "attention_mask", "token_type_ids", "positions", "valid", "labels")}
TENSOR_ORDER["regression"] = TENSOR_ORDER["sequence"]


def build_task_model(run: FinetuneConfig, pretrained: Pretrained, num_labels: int,
                     groups: ProcessGroups | None = None, tracker: RNGStatesTracker | None = None):
    """The task model with the pretrained encoder's weights; the classifier (and a pooler the source lacks)
    start fresh from model.init_seed."""
    changes = {"init_seed": run.model.init_seed}
    for name in ("variant", "hidden_dropout", "attention_dropout"):
        if getattr(run.model, name) is not None:
            changes[name] = getattr(run.model, name)
    config = replace(pretrained.config, **changes)
    kind = BertForTokenClassification if run.task.kind == "token" else BertForSequenceClassification
    model = kind(config, num_labels, groups, tracker=tracker)
    own = model.state_dict()
    encoder = {k: v for k, v in pretrained.state.items() if k.startswith("bert.") and k in own}
    missing = model.load_state_dict(encoder, strict=False).missing_keys
    unexpected_fresh = [k for k in missing if not k.startswith(("head.", "bert.pooler."))]
    if unexpected_fresh:
        raise ValueError(f"{pretrained.source}: the pretrained weights lack {unexpected_fresh[:5]}")
    return model


def task_logits(model, batch: dict[str, torch.Tensor], kind: str) -> torch.Tensor:
    if kind != "token":
        return model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    return model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], batch["positions"])


def task_loss(logits: torch.Tensor, batch: dict[str, torch.Tensor], kind: str) -> torch.Tensor:
    if kind == "sequence":
        return F.cross_entropy(logits, batch["labels"])
    if kind == "regression":
        return F.mse_loss(logits.squeeze(-1), batch["labels"].to(logits.dtype))
    labels = batch["labels"].flatten()  # mean over labeled words; a micro-batch without any gives 0, not NaN
    losses = F.cross_entropy(logits.flatten(0, 1), labels, ignore_index=-100, reduction="sum")
    return losses / (labels != -100).sum().clamp(min=1)


@torch.no_grad()
def predict(model, tensors: dict[str, torch.Tensor], kind: str, batch_size: int,
            device: torch.device) -> torch.Tensor:
    """Label ids: (N,) for sequences, (N, Q) for tokens (meaningful where valid); scores (N,) for regression."""
    model.eval()
    out = []
    for start in range(0, len(tensors["input_ids"]), batch_size):
        batch = {k: v[start:start + batch_size].to(device) for k, v in tensors.items()}
        logits = task_logits(model, batch, kind)
        out.append((logits.squeeze(-1).float() if kind == "regression" else logits.argmax(-1)).cpu())
    return torch.cat(out)


def evaluate(model, tensors: dict[str, torch.Tensor], kind: str, labels: list[str], batch_size: int,
             device: torch.device, examples: list, labeled_words: list[int] | None = None,
             metrics: list[str] | None = None) -> tuple[dict, list]:
    """(metrics, predictions per example: label names, or scores for regression). Metrics: task.metrics for
    sequences and regression; entity precision/recall/F1 over BIO tags for tokens (words that lost their
    slot to truncation are predicted O)."""
    predictions = predict(model, tensors, kind, batch_size, device)
    if kind != "token":
        gold, preds = tensors["labels"].tolist(), predictions.tolist()
        scores = {name: sequence_metric(name, preds, gold, len(labels))
                  for name in metrics or DEFAULT_METRICS[kind]}
        return scores, preds if kind == "regression" else [labels[p] for p in preds]
    predicted_tags, gold_tags = [], []
    for i, example in enumerate(examples):
        n = labeled_words[i]
        tags = [labels[t] for t in predictions[i, :n].tolist()] + ["O"] * (len(example.words) - n)
        predicted_tags.append(tags)
        gold_tags.append(list(example.tags))
    scores = span_f1(predicted_tags, gold_tags)
    token_accuracy = accuracy([t for s in predicted_tags for t in s], [t for s in gold_tags for t in s])
    metrics = {"span_precision": scores.precision, "span_recall": scores.recall, "span_f1": scores.f1,
               "token_accuracy": token_accuracy, "entities_gold": scores.gold}
    return metrics, predicted_tags


def sequence_metric(name: str, predictions: list, gold: list, num_classes: int) -> float:
    """One of tasks.config.METRICS by name: class ids for classification, scores for regression."""
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


def prediction_records(examples: list, predicted: list, kind: str) -> list[dict]:
    """One JSON record per example: its input, gold label(s) and prediction(s)."""
    if kind != "token":
        return [{"text": e.text, **({"text_pair": e.pair} if e.pair is not None else {}), "label": e.label,
                 "prediction": p} for e, p in zip(examples, predicted, strict=True)]
    return [{"tokens": e.words, "tags": e.tags, "predictions": p} for e, p in zip(examples, predicted, strict=True)]


def encode_examples(examples: list, task: TaskConfig, tokenizer: Tokenizer, labels: list[str],
                    where: str) -> tuple[dict[str, torch.Tensor], list[int] | None]:
    """(tensors, labeled words per example, None for sequences)."""
    if task.kind != "token":
        return encode_sequences(examples, tokenizer, labels, task.max_seq_len, where,
                                regression=task.kind == "regression"), None
    encoded = encode_tokens(examples, tokenizer, labels, task.max_seq_len, task.query_slots, where)
    return encoded.tensors, encoded.labeled_words


def encode(run: FinetuneConfig, pretrained: Pretrained, examples: list, path: str, labels: list[str]):
    """(examples, tensors, labeled words per example or None) of one task file's examples."""
    tensors, labeled_words = encode_examples(examples, run.task, pretrained.tokenizer, labels, path)
    if labeled_words is not None:
        unlabeled = sum(len(e.words) - n for e, n in zip(examples, labeled_words, strict=True))
        if unlabeled:
            warnings.warn(f"{path}: {unlabeled} words are past task.max_seq_len / task.max_labeled_tokens and get "
                          "no label (evaluation predicts O for them)", stacklevel=2)
    return examples, tensors, labeled_words


def finetune(run: FinetuneConfig, ds_config_path: str) -> dict:
    """Fine-tune, evaluate, export; returns the final metrics (rank 0's; every rank computes the same)."""
    from megatron_narrow.cli import RunRefused, refusing
    from megatron_narrow.convert.export import export_classifier_to_hf
    from megatron_narrow.training.engine import agree_finite, build_engine, training_device
    from megatron_narrow.training.metrics import MetricsLogger
    from megatron_narrow.training.optim import set_learning_rate
    from megatron_narrow.training.precision import with_resolved_precision
    from megatron_narrow.training.setup import (
        DeepSpeedMPU,
        check_wandb,
        deepspeed_config,
        init_distributed,
        world_size_from_env,
    )

    run, precision_line = with_resolved_precision(run, training_device())  # train.precision=auto decided here
    with refusing():  # the config, the pretrained model and the task files; errors later are bugs
        run.validate()
        check_wandb(run.train)
        layout = ParallelConfig().resolve(world_size_from_env())
        ds_config = deepspeed_config(ds_config_path, run, layout.data_parallel)
        if int((ds_config.get("zero_optimization") or {}).get("stage", 0)) >= 3:
            raise ValueError(f"{ds_config_path}: ZeRO stage 3 partitions the parameters, and the export at the end "
                             "of fine-tuning needs them whole on rank 0; use ZeRO stage 0-2")
        pretrained = load_pretrained(run.model.init_from, trust=run.train.trust_checkpoint)
        train_examples = read_examples(run.task.train_file, run.task)
        labels = label_set(run.task, train_examples)
        _, train_tensors, _ = encode(run, pretrained, train_examples, run.task.train_file, labels)
        valid = None
        if run.task.valid_file:
            valid = encode(run, pretrained, read_examples(run.task.valid_file, run.task), run.task.valid_file,
                           labels)

    init_distributed()
    groups = ProcessGroups.from_world(ParallelConfig())
    is_rank0 = dist.get_rank() == 0
    if is_rank0:
        print(precision_line, flush=True)
    device = training_device()
    tracker = RNGStatesTracker.for_model(run.train.seed, tensor_rank=0)
    with refusing():  # pretrained weights that lack part of the encoder
        model = build_task_model(run, pretrained, len(labels), groups, tracker).to(device)
    set_activation_checkpointing(model, run.train.activation_checkpointing)
    engine, optimizer = build_engine(model, run.train, ds_config, DeepSpeedMPU(groups))
    kind, train = run.task.kind, run.train
    dataset = TensorDataset(*(train_tensors[k] for k in TENSOR_ORDER[kind]))
    sampler = DistributedSampler(dataset, num_replicas=groups.data.size, rank=groups.data.rank, shuffle=True,
                                 seed=train.seed, drop_last=True)
    loader = DataLoader(dataset, batch_size=train.micro_batch_size, sampler=sampler, drop_last=True)
    if len(loader) == 0:
        raise RunRefused(f"{run.task.train_file}: {len(dataset)} examples make no micro-batch of "
                         f"{train.micro_batch_size} per rank over {groups.data.size} data-parallel ranks")
    logger = MetricsLogger(train.save_dir, enabled=is_rank0, resume_step=0, total_steps=train.train_steps,
                           wandb_project=train.wandb_project, run_config=run.to_dict())
    gas = ds_config["gradient_accumulation_steps"]
    epoch, batches = 0, iter(())
    results: dict = {}
    predicted: list = []

    def next_batch() -> dict[str, torch.Tensor]:
        nonlocal epoch, batches
        try:
            values = next(batches)
        except StopIteration:
            sampler.set_epoch(epoch)
            epoch += 1
            batches = iter(loader)
            values = next(batches)
        return {k: v.to(device) for k, v in zip(TENSOR_ORDER[kind], values, strict=True)}

    def run_eval(step: int) -> None:
        nonlocal results, predicted
        if valid is None:
            return
        examples, tensors, labeled_words = valid
        results, predicted = evaluate(engine.module, tensors, kind, labels, train.micro_batch_size, device,
                                      examples, labeled_words, run.task.chosen_metrics)
        logger.log({"step": step, **{f"eval_{k}": v for k, v in results.items()}})
        engine.train()

    engine.train()
    for step in range(1, train.train_steps + 1):
        started = time.perf_counter()
        lr = set_learning_rate(optimizer, step - 1, train)
        total = 0.0
        finite = True
        for index in range(gas):
            batch = next_batch()
            loss = task_loss(task_logits(engine, batch, kind), batch, kind)
            engine.backward(loss)
            finite = finite and bool(torch.isfinite(loss))
            if index == gas - 1:  # before the update; fine-tuning stops on a non-finite loss
                agree_finite(finite, step, "stop", device)
            engine.step()
            total += loss.item() / gas
        if step % train.log_interval == 0 or step == train.train_steps:
            logger.log({"step": step, "loss": total, "lr": lr, "step_time_s": time.perf_counter() - started,
                        "epoch": epoch})
        if train.eval_interval and step % train.eval_interval == 0 and step != train.train_steps:
            run_eval(step)
    run_eval(train.train_steps)
    logger.close()
    if is_rank0:
        output = Path(train.save_dir) / "hf"
        export_classifier_to_hf(engine.module, output, labels, task_settings={
            "finetune_max_seq_len": run.task.max_seq_len, "finetune_text_field": run.task.text_field,
            "finetune_text_pair_field": run.task.text_pair_field, "finetune_tokens_field": run.task.tokens_field,
            **({"problem_type": "regression"} if kind == "regression" else {})})
        pretrained.save_tokenizer(output)
        (Path(train.save_dir) / "eval_results.json").write_text(json.dumps(results, indent=1) + "\n")
        if valid is not None:
            records = prediction_records(valid[0], predicted, kind)
            (Path(train.save_dir) / "valid_predictions.jsonl").write_text(
                "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        (Path(train.save_dir) / "finetune_config.json").write_text(json.dumps(run.to_dict(), indent=1) + "\n")
    if dist.is_initialized():
        dist.barrier()
    return results
