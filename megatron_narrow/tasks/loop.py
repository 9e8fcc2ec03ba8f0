"""The fine-tuning loop: a DeepSpeed engine over data parallelism, evaluation with the task's metrics, and
export of the result to Hugging Face.

Every rank evaluates the whole valid file (task files are small), so the metrics need no gathering and
rank 0 reports them. The loss is the mean cross-entropy of each micro-batch (over its labeled words for
token classification). At the end, rank 0 writes SAVE_DIR/hf (model, tokenizer, labels in the config),
SAVE_DIR/eval_results.json, SAVE_DIR/valid_predictions.jsonl and, last, SAVE_DIR/finetune_summary.json.

A run keeps pretraining's guarantees: checkpoints under SAVE_DIR/checkpoints (every train.save_interval steps,
at the end, and on SIGTERM / Ctrl-C, then exit 75) hold the engine, the place in the epoch, the best evaluation
and the RNG states, so the same command resumes bit for bit. The best evaluation's model is kept in SAVE_DIR/best;
task.early_stopping_patience ends a run that stopped improving.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from megatron_narrow.cli import RunRefused, refusing
from megatron_narrow.config import ParallelConfig
from megatron_narrow.convert.export import export_classifier_to_hf
from megatron_narrow.data.tokenizer import Tokenizer
from megatron_narrow.formats import checkpoint_files
from megatron_narrow.model.recompute import set_activation_checkpointing
from megatron_narrow.parallel import ProcessGroups, RNGStatesTracker
from megatron_narrow.tasks.config import FinetuneConfig, TaskConfig
from megatron_narrow.tasks.kinds import label_set, read_examples, task_kind
from megatron_narrow.tasks.metrics import LOWER_IS_BETTER
from megatron_narrow.tasks.source import Pretrained, load_pretrained
from megatron_narrow.training import checkpoint
from megatron_narrow.training.engine import agree_to_stop, build_engine, training_device
from megatron_narrow.training.metrics import MetricsLogger
from megatron_narrow.training.optim import set_learning_rate
from megatron_narrow.training.precision import with_resolved_precision
from megatron_narrow.training.resume import check_resume_config
from megatron_narrow.training.setup import (
    DeepSpeedMPU,
    check_wandb,
    deepspeed_config,
    init_distributed,
    world_size_from_env,
)
from megatron_narrow.training.step import train_step
from megatron_narrow.training.stop import StopSignal


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


def finetune(run: FinetuneConfig, ds_config_path: str, stop: StopSignal | None = None) -> dict:
    """Fine-tune (or resume from train.save_dir), evaluate, export; returns the final metrics (rank 0's; every
    rank computes the same). Raises RunStopped after checkpointing when `stop` sees SIGTERM or Ctrl-C."""
    run, precision_line = with_resolved_precision(run, training_device())  # train.precision=auto decided here
    with refusing():  # the config, the pretrained model and the task files; errors later are bugs
        inputs = read_task_inputs(run, ds_config_path)
    init_distributed()
    groups = ProcessGroups.from_world(ParallelConfig())
    is_rank0 = dist.get_rank() == 0
    if is_rank0:
        print(precision_line, flush=True)
    _restart_if_asked(run, is_rank0)
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
    tuning = FineTuning(run, inputs, engine, optimizer, batches, device, tracker, is_rank0)
    progress, rng = tuning.resume()
    tuning.logger = MetricsLogger(run.train.save_dir, enabled=is_rank0, resume_step=progress.step,
                                  total_steps=run.train.train_steps, wandb_project=run.train.wandb_project,
                                  run_config=run.to_dict())
    if rng is not None:  # last, after everything that draws random numbers while being built
        checkpoint.restore_rng_state(rng, tracker)
    try:
        results, predicted = tuning.train_and_evaluate(progress, stop or StopSignal().install())
    finally:
        tuning.logger.close()
    if is_rank0:
        write_outputs(run, inputs, engine.module, results, predicted, progress)
    if dist.is_initialized():
        dist.barrier()
    return results


def _restart_if_asked(run: FinetuneConfig, is_rank0: bool) -> None:
    """train.restart=true: the save directory's checkpoints are moved aside and the run starts fresh."""
    if run.train.restart:
        if is_rank0 and (moved := checkpoint_files.move_aside(run.train.save_dir)) is not None:
            print(f"train.restart=true: starting fresh; the old checkpoints are now in {moved}", flush=True)
        dist.barrier()


def read_task_inputs(run: FinetuneConfig, ds_config_path: str) -> TaskInputs:
    """Every check and read that needs no process group: the config, the DeepSpeed JSON, the pretrained source
    and the task files."""
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


@dataclass
class FinetuneProgress:
    """Where a fine-tuning run stands; saved in every checkpoint with the place in the train split (_Epochs'
    position) and the RNG states, so a resumed run continues bit for bit."""

    step: int = 0
    best_value: float | None = None
    """task.selection_metric of the best evaluation so far (its model is SAVE_DIR/best)."""
    best_step: int | None = None
    evaluations_since_best: int = 0
    stopped_early: bool = False


class FineTuning:
    """One fine-tuning run's loop: steps, evaluations, the best model, checkpoints and resume."""

    def __init__(self, run: FinetuneConfig, inputs: TaskInputs, engine, optimizer, batches: _Epochs,
                 device: torch.device, tracker: RNGStatesTracker, is_rank0: bool) -> None:
        self.run, self.inputs, self.engine, self.optimizer, self.batches = run, inputs, engine, optimizer, batches
        self.device, self.tracker, self.is_rank0 = device, tracker, is_rank0
        self.kind = run.task.kind
        self.logger = None
        self.last_evaluation: tuple[int, dict, list] | None = None
        """(step, metrics, predictions) of the latest evaluation."""
        self.saved_step: int | None = None

    def resume(self) -> tuple[FinetuneProgress, dict | None]:
        """(progress, the RNG states to restore last) from train.save_dir's newest usable checkpoint, if any."""
        save_dir = self.run.train.save_dir
        plan = checkpoint_files.plan_resume(save_dir)
        if not plan.tags:
            return FinetuneProgress(), None
        with refusing():  # no usable checkpoint, or one of other settings
            _check_same_task(checkpoint_files.checkpoint_root(save_dir), plan, self.run)
            loaded = checkpoint.load(self.engine, save_dir, plan, report=self._report,
                                     trust=self.run.train.trust_checkpoint)
        if loaded is None:
            return FinetuneProgress(), None
        ours = loaded[1]["megatron_narrow"]
        progress = FinetuneProgress(**ours["progress"])
        self.batches.seek(*ours["data_position"])
        self._report(f"resumed from step {progress.step} (epoch {self.batches.epoch})")
        return progress, ours["rng"]

    def train_and_evaluate(self, progress: FinetuneProgress, stop: StopSignal) -> tuple[dict, list]:
        """Step to train.train_steps (or an early stop) over epochs of the shuffled train split, evaluating every
        train.eval_interval steps and at the end, checkpointing every train.save_interval steps, at the end and
        on a stop signal (then RunStopped); returns the last evaluation's (metrics, predictions)."""
        train = self.run.train
        losses: list[float] = []  # this step's micro-batch losses

        def forward(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, None]:
            loss = task_loss(task_logits(self.engine, batch, self.kind), batch, self.kind)
            losses.append(loss.item())
            return loss, None

        self.engine.train()
        while progress.step < train.train_steps and not progress.stopped_early:
            started = time.perf_counter()
            lr = set_learning_rate(self.optimizer, progress.step, train)
            micro_batches = ({k: v.to(self.device) for k, v in batch.items()} for batch in self.batches)  # lazily
            losses.clear()
            train_step(self.engine, micro_batches, self.inputs.ds_config["gradient_accumulation_steps"], forward,
                       step=progress.step + 1, policy="stop", optimizer=self.optimizer, device=self.device)
            progress.step += 1
            if progress.step % train.log_interval == 0 or progress.step == train.train_steps:
                self.logger.log({"step": progress.step, "loss": sum(loss / len(losses) for loss in losses), "lr": lr,
                                 "step_time_s": time.perf_counter() - started, "epoch": self.batches.epoch})
            if train.eval_interval and progress.step % train.eval_interval == 0 and progress.step != train.train_steps:
                self._evaluate(progress)
            self._checkpoint_or_stop(progress, stop)
        if self.last_evaluation is None or self.last_evaluation[0] != progress.step:
            self._evaluate(progress)
        if self.saved_step != progress.step:
            self._save(progress)  # the end is always checkpointed
        return self.last_evaluation[1:] if self.last_evaluation else ({}, [])

    def _evaluate(self, progress: FinetuneProgress) -> None:
        """Metrics on the valid split (none without one); a better task.selection_metric is exported to
        SAVE_DIR/best, and task.early_stopping_patience evaluations without one stop the run."""
        if self.inputs.valid is None:
            return
        task, train = self.run.task, self.run.train
        examples, tensors, labeled_words = self.inputs.valid
        results, predicted = evaluate(self.engine.module, tensors, self.kind, self.inputs.labels,
                                      train.micro_batch_size, self.device, examples, labeled_words,
                                      task.chosen_metrics)
        self.logger.log({"step": progress.step, **{f"eval_{k}": v for k, v in results.items()}})
        value = results[task.selection_metric]
        sign = -1.0 if task.selection_metric in LOWER_IS_BETTER else 1.0
        if progress.best_value is None or sign * value > sign * progress.best_value:
            progress.best_value, progress.best_step, progress.evaluations_since_best = value, progress.step, 0
            if self.is_rank0:
                with torch.random.fork_rng(devices=[]):  # the export's fresh HF model draws; training must not see it
                    write_outputs(self.run, self.inputs, self.engine.module, results, predicted, progress, best=True)
        else:
            progress.evaluations_since_best += 1
            patience = task.early_stopping_patience
            if patience is not None and progress.evaluations_since_best >= patience and not progress.stopped_early:
                progress.stopped_early = True
                self._report(f"early stop at step {progress.step}: {patience} evaluations without a better "
                             f"{task.selection_metric} than {progress.best_value:.4f} (step {progress.best_step})")
        self.last_evaluation = (progress.step, results, predicted)
        self.engine.train()

    def _checkpoint_or_stop(self, progress: FinetuneProgress, stop: StopSignal) -> None:
        train = self.run.train
        preempted = agree_to_stop(stop, self.device)
        if (train.save_interval and progress.step % train.save_interval == 0) or preempted:
            self._save(progress)
        if preempted:
            stopped = stop.stopped(progress.step)
            self._report(str(stopped))
            raise stopped

    def _save(self, progress: FinetuneProgress) -> None:
        client_state = {"megatron_narrow": {"progress": asdict(progress), "data_position": self.batches.position(),
                                            "rng": checkpoint.rng_state(self.tracker)}}
        train = self.run.train
        checkpoint.save(self.engine, train.save_dir, progress.step, client_state, run_config=self.run.to_dict(),
                        tokenizer_model=None, keep_last=train.keep_last, is_rank0=self.is_rank0)
        self.saved_step = progress.step

    def _report(self, line: str) -> None:
        if self.is_rank0:
            print(line, flush=True)


RESUMABLE = ("save_interval", "keep_last", "log_interval", "eval_interval", "train_steps", "restart",
             "trust_checkpoint", "wandb_project", "num_workers")
"""train.* keys a fine-tuning run may change when it resumes; every other task.*, model.* and train.* key is what
its weights and data order come from, so a change is refused."""


def _check_same_task(root: Path, plan: checkpoint_files.ResumePlan, run: FinetuneConfig) -> None:
    """Refuse to resume a checkpoint of another task, model, seed or schedule (training/resume.py)."""
    if plan.candidates:
        settings = run.to_dict()
        fixed = {f"{section}.{key}" for section in ("task", "model", "train") for key in settings[section]
                 if not (section == "train" and key in RESUMABLE)}
        check_resume_config(root / plan.candidates[0], settings, fixed)


class _Epochs:
    """Micro-batches of the train split, epoch after epoch; each epoch reshuffled by DistributedSampler (from
    train.seed and the epoch: no global random draw decides the order, so a resumed run can seek its place)."""

    def __init__(self, loader: DataLoader, sampler: DistributedSampler, kind: str) -> None:
        self.loader, self.sampler, self.kind = loader, sampler, kind
        self.epoch, self.drawn, self._batches = 0, 0, iter(())

    def __iter__(self) -> _Epochs:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        try:
            values = next(self._batches)
        except StopIteration:
            self._begin(self.epoch)
            values = next(self._batches)
        self.drawn += 1
        return dict(zip(task_kind(self.kind).tensors, values, strict=True))

    def _begin(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)
        self.epoch, self.drawn = epoch + 1, 0
        self._batches = iter(self.loader)

    def position(self) -> tuple[int, int]:
        """(epochs begun, micro-batches drawn in the current one)."""
        return self.epoch, self.drawn

    def seek(self, epoch: int, drawn: int) -> None:
        """Continue where a run that was at position() == (epoch, drawn) stopped."""
        if epoch > 0:
            self._begin(epoch - 1)
            for _ in range(drawn):
                next(self._batches)
            self.drawn = drawn


def _epochs(tensors: dict[str, torch.Tensor], kind: str, train, groups: ProcessGroups) -> _Epochs | None:
    """The train split's endless micro-batches; None when it makes no micro-batch on each rank."""
    dataset = TensorDataset(*(tensors[k] for k in task_kind(kind).tensors))
    sampler = DistributedSampler(dataset, num_replicas=groups.data.size, rank=groups.data.rank, shuffle=True,
                                 seed=train.seed, drop_last=True)
    loader = DataLoader(dataset, batch_size=train.micro_batch_size, sampler=sampler, drop_last=True)
    return _Epochs(loader, sampler, kind) if len(loader) else None


def write_outputs(run: FinetuneConfig, inputs: TaskInputs, model, results: dict, predicted: list,
                  progress: FinetuneProgress, *, best: bool = False) -> None:
    """Rank 0: SAVE_DIR/hf (the classifier, its tokenizer and the task's settings), eval_results.json,
    valid_predictions.jsonl, finetune_config.json and finetune_summary.json (the step, the best evaluation's step
    and value, whether it stopped early); best=True: the same under SAVE_DIR/best, for the best evaluation so far."""
    kind, task = run.task.kind, task_kind(run.task.kind)
    save_dir = Path(run.train.save_dir) / "best" if best else Path(run.train.save_dir)
    summary = {"step": progress.step, "best_metric": run.task.selection_metric, "best_value": progress.best_value,
               "best_step": progress.best_step, "stopped_early": progress.stopped_early}
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
    (save_dir / "finetune_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
