"""The pretraining loop around the DeepSpeed engine.

The MLM loss of a step is normalised by the valid targets of the whole global batch (all micro-batches
on all data-parallel ranks), so data parallelism and gradient accumulation reproduce one big batch.
"""

from __future__ import annotations

import contextlib
import io
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from megatron_narrow.cli import refusing
from megatron_narrow.config import ModelConfig, RunConfig
from megatron_narrow.formats import checkpoint_files
from megatron_narrow.model import BertForPreTraining
from megatron_narrow.model.recompute import set_activation_checkpointing
from megatron_narrow.parallel import ProcessGroups, RNGStatesTracker, padded_vocab_size
from megatron_narrow.training import checkpoint
from megatron_narrow.training.batch_schedule import BatchSchedule
from megatron_narrow.training.data import PretrainingData, build_datasets_in_turn, make_loader
from megatron_narrow.training.engine import (
    agree_finite,
    agree_to_stop,
    all_reduce,
    build_engine,
    rank0_print,
    training_device,
)
from megatron_narrow.training.flops import peak_flops, training_flops_per_sequence
from megatron_narrow.training.layout import (
    UNIVERSAL_SUFFIX,
    convert_to_universal,
    current_layout,
    describe,
    layout_change_refusal,
    name_pipeline_parameters_as_the_model,
    needs_conversion,
    repad_vocabulary_vectors,
    restore_buffers,
    saved_layout,
    universal_checkpoint_info,
)
from megatron_narrow.training.metrics import MetricsLogger, end_of_run_summary
from megatron_narrow.training.optim import set_learning_rate
from megatron_narrow.training.pipeline import (
    PipelineModel,
    build_pipeline,
    pipeline_evaluate,
    pipeline_train_step,
)
from megatron_narrow.training.precision import with_resolved_precision
from megatron_narrow.training.setup import DeepSpeedMPU, ValidatedRun, init_distributed, validate_run
from megatron_narrow.training.step import train_step
from megatron_narrow.training.stop import RunStopped, StopSignal


@dataclass
class PretrainingRun:
    """What set-up builds once and the loop reads: the model (a BertForPreTraining, or the pipeline module with
    `pipe` beside it), its groups and RNG tracker, the engine, the data of every sequence-length phase, and the
    universal tag to resume from when the layout changed."""

    config: RunConfig
    device: torch.device
    is_rank0: bool
    datasets: list[PretrainingData]
    model: torch.nn.Module
    pipe: PipelineModel | None
    groups: ProcessGroups
    tracker: RNGStatesTracker
    layout: dict
    engine: Any
    optimizer: torch.optim.Optimizer
    schedule: BatchSchedule
    resume_plan: checkpoint_files.ResumePlan
    universal_tag: str | None

    @property
    def report(self) -> Callable[[str], None]:
        return rank0_print(self.is_rank0)


@dataclass
class Progress:
    """Where the run stands: optimizer steps taken, samples consumed, steps whose update was skipped."""

    step: int = 0
    consumed: int = 0
    skipped: int = 0


def pretrain(run: RunConfig, ds_config_path: str, stop: StopSignal | None = None) -> list[dict]:
    """Train (or resume) to run.train.train_steps; returns the records logged by rank 0. Raises RunStopped
    after checkpointing when `stop` (installed here if not given) sees SIGTERM or Ctrl-C."""
    setup = set_up(run, ds_config_path)
    progress, rng = resume(setup)
    train = setup.config.train
    logger = MetricsLogger(train.save_dir, enabled=setup.is_rank0, resume_step=progress.step,
                           total_steps=train.train_steps, wandb_project=train.wandb_project,
                           run_config=setup.config.to_dict())
    stop = stop or StopSignal().install()
    if rng is not None:  # last, after everything that draws random numbers while being built
        checkpoint.restore_rng_state(rng, setup.tracker)
    first_step, started = progress.step, time.perf_counter()
    try:
        records = train_steps(setup, progress, logger, stop)
    except RunStopped:  # checkpointed; any other error leaves the logger as a crash would
        logger.close()
        raise
    logger.close()
    if setup.is_rank0:
        print(end_of_run_summary(train.save_dir, checkpoint_files.checkpoint_root(train.save_dir) /
                                 checkpoint_files.tag_of(progress.step), steps=progress.step,
                                 steps_this_run=progress.step - first_step, seconds=time.perf_counter() - started,
                                 records=records), flush=True)
    return records


def set_up(run: RunConfig, ds_config_path: str) -> PretrainingRun:
    """Refuse a bad run before any process group exists, then build everything the loop needs, once."""
    device = training_device()
    run, precision_line = with_resolved_precision(run, device)  # train.precision=auto decided here
    with refusing():
        validated = validate_run(run, ds_config_path)  # every check that needs no process group
    init_distributed()
    train = run.train
    is_rank0 = dist.get_rank() == 0
    report = rank0_print(is_rank0)
    report(precision_line)
    if train.restart:
        if is_rank0 and (moved := checkpoint_files.move_aside(train.save_dir)) is not None:
            report(f"train.restart=true: starting fresh; the old checkpoints are now in {moved}")
        dist.barrier()
    plan = checkpoint_files.plan_resume(train.save_dir)  # read once: set-up and resume act on the same plan
    resuming = bool(plan.tags)
    ds_config = validated.ds_config
    datasets, model, pipe, groups, tracker = _build_model(run, validated, device)
    if train.init_from_hf and not resuming:
        with refusing():
            _load_hf(model, train.init_from_hf, report)
    set_activation_checkpointing(model, train.activation_checkpointing)
    layout = current_layout(groups.data.size, groups.tensor.size, groups.pipeline.size,
                            int((ds_config.get("zero_optimization") or {}).get("stage", 0)))
    universal_tag = None
    if resuming:
        with refusing():  # a layout change that cannot be converted
            universal_tag = _prepare_layout_change(plan, train.save_dir, layout, run.model, is_rank0,
                                                   trust=train.trust_checkpoint)
        if universal_tag is not None:
            ds_config["checkpoint"] = {**(ds_config.get("checkpoint") or {}), "load_universal": True}
    # the pipeline module hands DeepSpeed its grid; otherwise our groups, through DeepSpeed's mpu interface
    mpu = DeepSpeedMPU(groups) if pipe is None and dist.is_initialized() else None
    engine, optimizer = build_engine(model, train, ds_config, mpu, compile_model=run.model.compile)
    if engine.is_compiled:
        report("model.compile=true: torch.compile through DeepSpeed's engine.compile; the first step (and the first "
               "at each new sequence length) compiles")
    return PretrainingRun(run, device, is_rank0, datasets, model, pipe, groups, tracker, layout, engine, optimizer,
                          validated.schedule, plan, universal_tag)


def _build_model(run: RunConfig, validated: ValidatedRun, device: torch.device):
    """(datasets of every phase, model, pipeline or None, groups, RNG tracker): with pipelining DeepSpeed's grid
    creates the groups, so the data (whose special ids the stages need) is built first either way."""
    in_turn = {"rank": dist.get_rank(), "local_rank": int(os.environ.get("LOCAL_RANK", 0)), "barrier": dist.barrier}
    total_samples = run.train.train_steps * validated.ds_config["train_batch_size"]

    def phase_datasets() -> list[PretrainingData]:
        with refusing():  # a damaged shard or an unwritable index cache
            return [build_datasets_in_turn(phase, run.model, run.train, total_samples, tokenizer=validated.tokenizer,
                                           **in_turn)
                    for phase in run.data.phases()]

    if run.parallel.pipeline_parallel > 1:
        datasets = phase_datasets()
        pipe = build_pipeline(run, datasets[0].special.as_dict())
        return datasets, pipe.module, pipe, pipe.groups, pipe.tracker
    groups = ProcessGroups.from_world(run.parallel)
    tracker = RNGStatesTracker.for_model(run.train.seed, tensor_rank=groups.tensor.rank,
                                         pipeline_rank=groups.pipeline.rank)
    datasets = phase_datasets()
    model = BertForPreTraining(run.model, groups, pair_head=run.data.pair_head, tracker=tracker,
                               special_ids=datasets[0].special.as_dict()).to(device)
    return datasets, model, None, groups, tracker


def resume(setup: PretrainingRun) -> tuple[Progress, dict | None]:
    """(where the run stands, the RNG states to restore last) from the newest usable checkpoint, if any."""
    train = setup.config.train
    if not setup.resume_plan.tags:
        return Progress(), None
    with refusing():  # no usable checkpoint after all (all ranks agree)
        loaded = checkpoint.load(setup.engine, train.save_dir, setup.resume_plan, report=setup.report,
                                 only_tag=setup.universal_tag,
                                 trust=train.trust_checkpoint)
    if loaded is None:
        return Progress(), None
    tag, client = loaded
    if setup.universal_tag is not None:
        restore_buffers(setup.engine.module, checkpoint_files.checkpoint_root(train.save_dir) /
                        setup.universal_tag.removesuffix(UNIVERSAL_SUFFIX), setup.config.model,
                        trust=train.trust_checkpoint)
    ours = client["megatron_narrow"]
    progress = Progress(ours["step"], ours["consumed_samples"], ours["nonfinite_skipped"])
    if setup.is_rank0:
        print(f"resumed from step {progress.step} ({progress.consumed:,} samples consumed)", flush=True)
        _report_config_changes(checkpoint_files.checkpoint_root(train.save_dir) / tag, setup.config, progress.step)
    return progress, ours["rng"]


def train_steps(setup: PretrainingRun, progress: Progress, logger: MetricsLogger, stop: StopSignal) -> list[dict]:
    """Step until train.train_steps, logging, evaluating and saving on their intervals; on a stop signal (on any
    rank) save and raise RunStopped."""
    train, engine = setup.config.train, setup.engine
    universal_info = universal_checkpoint_info(  # the same for every save of this run
        setup.config.model.vocab_size, padded_vocab_size(setup.config.model.vocab_size, setup.groups.tensor.size),
        [name for name, _ in setup.model.named_parameters()])
    peak = peak_flops(torch.cuda.get_device_name()) if torch.cuda.is_available() else None  # for MFU
    records, loader, shape = [], None, None
    engine.train()
    while progress.step < train.train_steps:
        started = time.perf_counter()
        lr = set_learning_rate(setup.optimizer, progress.step - progress.skipped, train)
        previous, shape = shape, setup.schedule.shape(progress.step + 1, progress.consumed)
        if previous is None or shape.phase != previous.phase:
            loader = None  # the previous phase's workers shut down before the next phase's start
            loader = _enter_phase(setup, shape, previous, progress)
        if previous is None or (shape.micro_batch_size, shape.global_batch_size) != (
                previous.micro_batch_size, previous.global_batch_size):
            engine.set_train_micro_batch_size(shape.micro_batch_size)
            engine.set_train_batch_size(shape.global_batch_size)  # DeepSpeed scales the loss by its accumulation
        micro_batches = [{k: v.to(setup.device) for k, v in next(loader).items()}
                         for _ in range(shape.gradient_accumulation)]
        finite, total_targets, total_tokens, loss_sum = _step(setup, micro_batches, progress.step + 1)
        progress.consumed += shape.global_batch_size
        if not finite or not engine.was_step_applied():  # non-finite loss, or an fp16 overflow DeepSpeed skipped
            progress.skipped += 1
        progress.step += 1
        step_time = time.perf_counter() - started
        if progress.step % train.log_interval == 0 or progress.step == train.train_steps:
            loss = all_reduce(loss_sum, setup.groups.data.group).item() / max(total_targets, 1.0)
            records.append(_step_record(setup, progress, shape, lr, loss, total_tokens, step_time, peak))
            logger.log(records[-1])
        valid = setup.datasets[shape.phase].valid
        if train.eval_interval and progress.step % train.eval_interval == 0 and valid is not None:
            records.append({"step": progress.step, "eval_loss": evaluate(
                engine, valid, setup.config, setup.groups, setup.device, setup.pipe,
                micro_batch_size=shape.micro_batch_size)})
            logger.log(records[-1])
            engine.train()
        preempted = agree_to_stop(stop, setup.device)
        if (train.save_interval and progress.step % train.save_interval == 0) or preempted or (
                progress.step == train.train_steps):
            _save(setup, progress, universal_info)
        if preempted:
            stopped = stop.stopped(progress.step)
            setup.report(str(stopped))
            raise stopped
    return records


def _enter_phase(setup: PretrainingRun, shape, previous, progress: Progress):
    """The loader of `shape`'s sequence-length phase, from the samples already consumed."""
    if previous is not None or setup.schedule.phase_ends:
        setup.report(setup.schedule.describe(shape, progress.step + 1))
    return iter(make_loader(setup.datasets[shape.phase].train, consumed_samples=progress.consumed,
                            micro_batch_size=shape.micro_batch_size, dp_rank=setup.groups.data.rank,
                            dp_size=setup.groups.data.size, num_workers=setup.config.train.num_workers))


def _step(setup: PretrainingRun, micro_batches: list[dict[str, torch.Tensor]], step: int
          ) -> tuple[bool, float, float, torch.Tensor]:
    """One optimizer step: (every rank finite, valid targets and real tokens of the global batch, this rank's
    sum of target losses). The MLM loss is normalised by the global batch's valid targets."""
    counts = torch.tensor([float(sum(int(b["target_valid"].sum()) for b in micro_batches)),
                           float(sum(int(b["attention_mask"].sum()) for b in micro_batches))], device=setup.device)
    total_targets, total_tokens = all_reduce(counts, setup.groups.data.group).tolist()
    gas, policy = len(micro_batches), setup.config.train.nonfinite_loss
    normaliser = torch.tensor(max(total_targets, 1.0) / (setup.groups.data.size * gas), device=setup.device)
    if setup.pipe is not None:
        outcome = pipeline_train_step(setup.engine, setup.pipe, micro_batches, normaliser, setup.config.data.pair_head)
        finite = agree_finite(outcome.finite, step, policy, setup.device)  # ZeRO-1 skipped it already
        return finite, total_targets, total_tokens, outcome.loss_sum
    loss_sum = torch.zeros((), device=setup.device, dtype=torch.float64)

    def forward(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        out = setup.engine(**batch, num_targets=normaliser)
        return out.loss, out.target_losses

    def after_backward(batch: dict[str, torch.Tensor], target_losses: torch.Tensor, last: bool) -> None:
        nonlocal loss_sum
        counted = batch["target_valid"] & torch.isfinite(target_losses)  # no NaN enters the importance
        setup.model.update_importance(batch["target_ids"], target_losses.float(), counted, end_of_step=last)
        loss_sum = loss_sum + target_losses.double().sum()

    finite = train_step(setup.engine, micro_batches, gas, forward, step=step, policy=policy,
                        optimizer=setup.optimizer, device=setup.device, after_backward=after_backward)
    return finite, total_targets, total_tokens, loss_sum


def _step_record(setup: PretrainingRun, progress: Progress, shape, lr: float, loss: float, tokens: float,
                 step_time: float, peak: float | None) -> dict:
    """The logged line of a step: loss, learning rate, throughput (real tokens, not padding) and MFU on a GPU."""
    sequences_per_s = shape.global_batch_size / step_time
    flops = training_flops_per_sequence(setup.config.model, shape.seq_len, shape.max_predictions)
    return {"step": progress.step, "loss": loss, "lr": lr, "tokens_per_s": tokens / step_time,
            "real_token_fraction": tokens / (shape.global_batch_size * shape.seq_len), "seq_len": shape.seq_len,
            "global_batch_size": shape.global_batch_size, "step_time_s": step_time, "samples_per_s": sequences_per_s,
            "consumed_samples": progress.consumed, "skipped_steps": progress.skipped,
            "mfu": flops * sequences_per_s / (peak * dist.get_world_size()) if peak else None}


def _save(setup: PretrainingRun, progress: Progress, universal_info: dict) -> None:
    # one key of our own: DeepSpeed drops client keys that collide with its own (e.g. skipped_steps)
    client_state = {"megatron_narrow": {"step": progress.step, "consumed_samples": progress.consumed,
                                        "nonfinite_skipped": progress.skipped,
                                        "rng": checkpoint.rng_state(setup.tracker)},
                    "universal_checkpoint_info": universal_info}
    train = setup.config.train
    checkpoint.save(setup.engine, train.save_dir, progress.step, client_state, run_config=setup.config.to_dict(),
                    tokenizer_model=train.tokenizer_model, keep_last=train.keep_last, is_rank0=setup.is_rank0,
                    layout=setup.layout)


def _prepare_layout_change(plan: checkpoint_files.ResumePlan, save_dir: str, layout: dict, config: ModelConfig,
                           is_rank0: bool, trust: bool = False) -> str | None:
    """The universal tag to load when the checkpoint to resume was saved on another layout (converted here,
    once, by rank 0); None when it loads as it is. Refuses what DeepSpeed's universal checkpoints cannot do."""
    if not plan.candidates:
        return None
    tag = plan.candidates[0]
    tag_dir = checkpoint_files.checkpoint_root(save_dir) / tag
    saved = saved_layout(tag_dir)
    if saved is None or not needs_conversion(saved, layout):
        return None
    refusal = layout_change_refusal(saved, layout, tag)
    if refusal is not None:
        raise ValueError(refusal)
    if is_rank0:
        print(f"{tag} was saved with {describe(saved)}; this run is {describe(layout)}: converting it to a "
              f"universal checkpoint ({tag}{UNIVERSAL_SUFFIX}) and resuming from that", flush=True)
        with contextlib.redirect_stdout(io.StringIO()):  # ds_to_universal narrates every file
            universal = convert_to_universal(tag_dir, trust=trust)
        if saved["pipeline_parallel"] > 1:
            name_pipeline_parameters_as_the_model(universal, config)
        repad_vocabulary_vectors(universal, config.vocab_size,
                                 padded_vocab_size(config.vocab_size, layout["tensor_parallel"]))
    if dist.is_initialized():
        dist.barrier()
    return tag + UNIVERSAL_SUFFIX


def _report_config_changes(tag_dir, run: RunConfig, step: int) -> None:
    """One line listing what differs from the checkpoint's config (schedule changes apply from the next step);
    changes that cannot apply were refused before the run started."""
    from megatron_narrow.training.resume import check_resume_config

    changed = check_resume_config(tag_dir, run.to_dict())
    if changed:
        print(f"config changed since the checkpoint, applied from step {step + 1}: {'; '.join(changed)}", flush=True)


@torch.no_grad()
def evaluate(engine, dataset, run: RunConfig, groups: ProcessGroups, device: torch.device,
             pipe: PipelineModel | None = None, *, micro_batch_size: int) -> float:
    """Mean MLM loss over the first eval_steps micro-batches of the valid split (the same every time)."""
    engine.eval()
    loader = iter(make_loader(dataset, consumed_samples=0, micro_batch_size=micro_batch_size,
                              dp_rank=groups.data.rank, dp_size=groups.data.size, num_workers=0))
    batches = [{k: v.to(device) for k, v in next(loader).items()} for _ in range(run.train.eval_steps)]
    if pipe is not None:
        totals = pipeline_evaluate(engine, pipe, batches, run.data.pair_head)
    else:
        totals = torch.zeros(2, dtype=torch.float64, device=device)
        for batch in batches:
            out = engine(**batch)
            totals[0] += out.target_losses.double().sum()
            totals[1] += batch["target_valid"].sum()
    totals = all_reduce(totals, groups.data.group)
    return (totals[0] / totals[1].clamp(min=1)).item()


def _load_hf(model, hf_dir: str, report) -> None:
    """train.init_from_hf: the directory's safetensors into a BertForPreTraining or a pipeline stage.

    An encoder weight the directory lacks is an error (the run would silently train a half-fresh encoder);
    a missing head (MLM transform, pooler, pair classifier) starts fresh with a warning, as in Hugging Face."""
    from pathlib import Path

    from safetensors.torch import load_file

    from megatron_narrow.formats.hf_bert import check_official_narrow_layers, load_hf_into_pipeline, load_hf_state_dict

    files = sorted(Path(hf_dir).glob("*.safetensors"))
    if not files:
        raise ValueError(f"train.init_from_hf={hf_dir} holds no .safetensors weights")
    state = {}
    for file in files:
        state.update(load_file(str(file)))
    check_official_narrow_layers(state, model.bert.config if isinstance(model, BertForPreTraining) else model.config,
                                 hf_dir)
    load = load_hf_state_dict if isinstance(model, BertForPreTraining) else load_hf_into_pipeline
    missing = load(model, state)
    encoder = [name for name in missing if name.startswith(("bert.embeddings.", "bert.encoder."))]
    if encoder:
        raise ValueError(f"train.init_from_hf={hf_dir} has no weights for {len(encoder)} encoder tensors (e.g. "
                         f"{', '.join(encoder[:3])}): point it at a BERT checkpoint of this model's shape")
    if missing:
        report(f"warning: train.init_from_hf={hf_dir} has no weights for {', '.join(missing)}; they start fresh")
