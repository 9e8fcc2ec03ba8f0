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
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from megatron_narrow.config import ParallelConfig
from megatron_narrow.data.tokenizer import Tokenizer
from megatron_narrow.model.recompute import set_activation_checkpointing
from megatron_narrow.parallel import ProcessGroups, RNGStatesTracker
from megatron_narrow.tasks.config import FinetuneConfig, TaskConfig
from megatron_narrow.tasks.kinds import label_set, read_examples, task_kind
from megatron_narrow.tasks.source import Pretrained, load_pretrained


def build_task_model(run: FinetuneConfig, pretrained: Pretrained, num_labels: int,
                     groups: ProcessGroups | None = None, tracker: RNGStatesTracker | None = None):
    """The task model with the pretrained encoder's weights; the classifier (and a pooler the source lacks)
    start fresh from model.init_seed."""
    changes = {"init_seed": run.model.init_seed}
    for name in ("variant", "hidden_dropout", "attention_dropout"):
        if getattr(run.model, name) is not None:
            changes[name] = getattr(run.model, name)
    config = replace(pretrained.config, **changes)
    model = task_kind(run.task.kind).model_class(config, num_labels, groups, tracker=tracker)
    own = model.state_dict()
    encoder = {k: v for k, v in pretrained.state.items() if k.startswith("bert.") and k in own}
    missing = model.load_state_dict(encoder, strict=False).missing_keys
    unexpected_fresh = [k for k in missing if not k.startswith(("head.", "bert.pooler."))]
    if unexpected_fresh:
        raise ValueError(f"{pretrained.source}: the pretrained weights lack {unexpected_fresh[:5]}")
    return model


def task_logits(model, batch: dict[str, torch.Tensor], kind: str) -> torch.Tensor:
    return task_kind(kind).logits(model, batch)


def task_loss(logits: torch.Tensor, batch: dict[str, torch.Tensor], kind: str) -> torch.Tensor:
    return task_kind(kind).loss(logits, batch)


@torch.no_grad()
def predict(model, tensors: dict[str, torch.Tensor], kind: str, batch_size: int,
            device: torch.device) -> torch.Tensor:
    """Label ids: (N,) for sequences, (N, Q) for tokens (meaningful where valid); scores (N,) for regression."""
    model.eval()
    out = []
    for start in range(0, len(tensors["input_ids"]), batch_size):
        batch = {k: v[start:start + batch_size].to(device) for k, v in tensors.items()}
        out.append(task_kind(kind).predictions(task_logits(model, batch, kind)).cpu())
    return torch.cat(out)


def evaluate(model, tensors: dict[str, torch.Tensor], kind: str, labels: list[str], batch_size: int,
             device: torch.device, examples: list, labeled_words: list[int] | None = None,
             metrics: list[str] | None = None) -> tuple[dict, list]:
    """(metrics, predictions per example: label names, or scores for regression). Metrics: task.metrics for
    sequences and regression; entity precision/recall/F1 over BIO tags for tokens (words that lost their
    slot to truncation are predicted O)."""
    predictions = predict(model, tensors, kind, batch_size, device)
    return task_kind(kind).scores(predictions, tensors, labels, examples, labeled_words, metrics)


def prediction_records(examples: list, predicted: list, kind: str) -> list[dict]:
    """One JSON record per example: its input, gold label(s) and prediction(s)."""
    return task_kind(kind).records(examples, predicted)


def encode_examples(examples: list, task: TaskConfig, tokenizer: Tokenizer, labels: list[str],
                    where: str) -> tuple[dict[str, torch.Tensor], list[int] | None]:
    """(tensors, labeled words per example, None for sequences)."""
    return task_kind(task.kind).encode(examples, task, tokenizer, labels, where)


def encode(run: FinetuneConfig, pretrained: Pretrained, examples: list, path: str, labels: list[str]):
    """(examples, tensors, labeled words per example or None) of one task file's examples."""
    tensors, labeled_words = encode_examples(examples, run.task, pretrained.tokenizer, labels, path)
    if labeled_words is not None:
        unlabeled = sum(len(e.words) - n for e, n in zip(examples, labeled_words, strict=True))
        if unlabeled:
            warnings.warn(f"{path}: {unlabeled} words are past task.max_seq_len / task.max_labeled_tokens and get "
                          "no label (evaluation predicts O for them)", stacklevel=2)
    return examples, tensors, labeled_words


@dataclass
class TaskInputs:
    """What fine-tuning reads before any process group exists: the completed DeepSpeed config, the pretrained
    source, the label set, the encoded train split and (examples, tensors, labeled words) of the valid split."""

    ds_config: dict
    pretrained: Pretrained
    labels: list[str]
    train_tensors: dict[str, torch.Tensor]
    valid: tuple | None


def finetune(run: FinetuneConfig, ds_config_path: str) -> dict:
    """Fine-tune, evaluate, export; returns the final metrics (rank 0's; every rank computes the same)."""
    from megatron_narrow.cli import RunRefused, refusing
    from megatron_narrow.training.engine import build_engine, training_device
    from megatron_narrow.training.metrics import MetricsLogger
    from megatron_narrow.training.precision import with_resolved_precision
    from megatron_narrow.training.setup import DeepSpeedMPU, init_distributed

    run, precision_line = with_resolved_precision(run, training_device())  # train.precision=auto decided here
    with refusing():  # the config, the pretrained model and the task files; errors later are bugs
        inputs = read_task_inputs(run, ds_config_path)
    init_distributed()
    groups = ProcessGroups.from_world(ParallelConfig())
    is_rank0 = dist.get_rank() == 0
    if is_rank0:
        print(precision_line, flush=True)
    device = training_device()
    tracker = RNGStatesTracker.for_model(run.train.seed, tensor_rank=0)
    with refusing():  # pretrained weights that lack part of the encoder
        model = build_task_model(run, inputs.pretrained, len(inputs.labels), groups, tracker).to(device)
    set_activation_checkpointing(model, run.train.activation_checkpointing)
    engine, optimizer = build_engine(model, run.train, inputs.ds_config, DeepSpeedMPU(groups))
    batches = _epochs(inputs.train_tensors, run.task.kind, run.train, groups)
    if batches is None:
        raise RunRefused(f"{run.task.train_file}: {len(inputs.train_tensors['labels'])} examples make no micro-batch "
                         f"of {run.train.micro_batch_size} per rank over {groups.data.size} data-parallel ranks")
    logger = MetricsLogger(run.train.save_dir, enabled=is_rank0, resume_step=0, total_steps=run.train.train_steps,
                           wandb_project=run.train.wandb_project, run_config=run.to_dict())
    results, predicted = train_and_evaluate(run, inputs, engine, optimizer, batches, logger, device)
    logger.close()
    if is_rank0:
        write_outputs(run, inputs, engine.module, results, predicted)
    if dist.is_initialized():
        dist.barrier()
    return results


def read_task_inputs(run: FinetuneConfig, ds_config_path: str) -> TaskInputs:
    """Every check and read that needs no process group: the config, the DeepSpeed JSON, the pretrained source
    and the task files."""
    from megatron_narrow.training.setup import check_wandb, deepspeed_config, world_size_from_env

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
        valid = encode(run, pretrained, read_examples(run.task.valid_file, run.task), run.task.valid_file, labels)
    return TaskInputs(ds_config, pretrained, labels, train_tensors, valid)


def train_and_evaluate(run: FinetuneConfig, inputs: TaskInputs, engine, optimizer, batches: _Epochs, logger,
                       device: torch.device) -> tuple[dict, list]:
    """train.train_steps optimizer steps over epochs of the shuffled train split, evaluating every
    train.eval_interval steps and at the end; returns the last evaluation's (metrics, predictions)."""
    from megatron_narrow.training.optim import set_learning_rate
    from megatron_narrow.training.step import train_step

    kind, train = run.task.kind, run.train
    results: dict = {}
    predicted: list = []

    def run_eval(step: int) -> None:
        nonlocal results, predicted
        if inputs.valid is None:
            return
        examples, tensors, labeled_words = inputs.valid
        results, predicted = evaluate(engine.module, tensors, kind, inputs.labels, train.micro_batch_size, device,
                                      examples, labeled_words, run.task.chosen_metrics)
        logger.log({"step": step, **{f"eval_{k}": v for k, v in results.items()}})
        engine.train()

    losses: list[float] = []  # this step's micro-batch losses

    def forward(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, None]:
        loss = task_loss(task_logits(engine, batch, kind), batch, kind)
        losses.append(loss.item())
        return loss, None

    engine.train()
    for step in range(1, train.train_steps + 1):
        started = time.perf_counter()
        lr = set_learning_rate(optimizer, step - 1, train)
        micro_batches = ({k: v.to(device) for k, v in batch.items()} for batch in batches)  # drawn one at a time
        losses.clear()
        train_step(engine, micro_batches, inputs.ds_config["gradient_accumulation_steps"], forward, step=step,
                   policy="stop", optimizer=optimizer, device=device)  # fine-tuning stops on a non-finite loss
        if step % train.log_interval == 0 or step == train.train_steps:
            logger.log({"step": step, "loss": sum(loss / len(losses) for loss in losses), "lr": lr,
                        "step_time_s": time.perf_counter() - started, "epoch": batches.epoch})
        if train.eval_interval and step % train.eval_interval == 0 and step != train.train_steps:
            run_eval(step)
    run_eval(train.train_steps)
    return results, predicted


class _Epochs:
    """Micro-batches of the train split, epoch after epoch; each epoch reshuffled by DistributedSampler."""

    def __init__(self, loader: DataLoader, sampler: DistributedSampler, kind: str) -> None:
        self.loader, self.sampler, self.kind = loader, sampler, kind
        self.epoch, self._batches = 0, iter(())

    def __iter__(self) -> _Epochs:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        try:
            values = next(self._batches)
        except StopIteration:
            self.sampler.set_epoch(self.epoch)
            self.epoch += 1
            self._batches = iter(self.loader)
            values = next(self._batches)
        return dict(zip(task_kind(self.kind).tensors, values, strict=True))


def _epochs(tensors: dict[str, torch.Tensor], kind: str, train, groups: ProcessGroups) -> _Epochs | None:
    """The train split's endless micro-batches; None when it makes no micro-batch on each rank."""
    dataset = TensorDataset(*(tensors[k] for k in task_kind(kind).tensors))
    sampler = DistributedSampler(dataset, num_replicas=groups.data.size, rank=groups.data.rank, shuffle=True,
                                 seed=train.seed, drop_last=True)
    loader = DataLoader(dataset, batch_size=train.micro_batch_size, sampler=sampler, drop_last=True)
    return _Epochs(loader, sampler, kind) if len(loader) else None


def write_outputs(run: FinetuneConfig, inputs: TaskInputs, model, results: dict, predicted: list) -> None:
    """Rank 0: SAVE_DIR/hf (the classifier, its tokenizer and the task's settings), eval_results.json,
    valid_predictions.jsonl and finetune_config.json."""
    from megatron_narrow.convert.export import export_classifier_to_hf

    kind, task, save_dir = run.task.kind, task_kind(run.task.kind), Path(run.train.save_dir)
    export_classifier_to_hf(model, save_dir / "hf", inputs.labels, task_settings={
        "finetune_max_seq_len": run.task.max_seq_len, "finetune_text_field": run.task.text_field,
        "finetune_text_pair_field": run.task.text_pair_field, "finetune_tokens_field": run.task.tokens_field,
        **({"problem_type": task.hf_problem_type} if task.hf_problem_type else {})})
    inputs.pretrained.save_tokenizer(save_dir / "hf")
    (save_dir / "eval_results.json").write_text(json.dumps(results, indent=1) + "\n")
    if inputs.valid is not None:
        records = prediction_records(inputs.valid[0], predicted, kind)
        (save_dir / "valid_predictions.jsonl").write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    (save_dir / "finetune_config.json").write_text(json.dumps(run.to_dict(), indent=1) + "\n")
