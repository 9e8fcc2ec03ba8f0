"""The pretraining loop around the DeepSpeed engine.

The MLM loss of a step is normalised by the valid targets of the whole global batch (all micro-batches
on all data-parallel ranks), so data parallelism and gradient accumulation reproduce one big batch.
"""

from __future__ import annotations

import contextlib
import io
import os
import time

import torch
import torch.distributed as dist

from megatron_narrow.cli import refusing
from megatron_narrow.config import ModelConfig, RunConfig
from megatron_narrow.model import BertForPreTraining
from megatron_narrow.model.recompute import set_activation_checkpointing
from megatron_narrow.parallel import ProcessGroups, RNGStatesTracker, padded_vocab_size
from megatron_narrow.training import checkpoint
from megatron_narrow.training.batch_schedule import BatchSchedule
from megatron_narrow.training.data import PretrainingData, build_datasets_in_turn, make_loader
from megatron_narrow.training.engine import agree_finite, all_reduce, build_engine, rank0_print, training_device
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
from megatron_narrow.training.setup import DeepSpeedMPU, init_distributed, validate_run
from megatron_narrow.training.stop import RunStopped, StopSignal


@contextlib.contextmanager
def _skip_update(optimizer: torch.optim.Optimizer):
    """ZeRO-0 fp32: DeepSpeed steps our AdamW directly, with no overflow check. Inside, its step is a no-op that
    reports an overflow as DeepSpeed's own optimizers do, so the engine skips the update, counts it
    (engine.was_step_applied() is False) and holds the LR schedule."""
    saved = optimizer.__dict__.get("step")  # the LR scheduler's wrapper of step, if any
    optimizer.step = lambda closure=None: None
    optimizer.overflow = True
    try:
        yield
    finally:
        del optimizer.overflow
        if saved is None:
            del optimizer.step
        else:
            optimizer.step = saved


def _data_parallel_step(engine, model: BertForPreTraining, optimizer: torch.optim.Optimizer,
                        micro_batches: list[dict[str, torch.Tensor]], normaliser: torch.Tensor, step: int,
                        policy: str) -> tuple[bool, torch.Tensor]:
    """Forward/backward every micro-batch and take the update; returns (all finite, sum of target losses)."""
    device = normaliser.device
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    finite = True
    last = len(micro_batches) - 1
    for index, batch in enumerate(micro_batches):
        engine.set_gradient_accumulation_boundary(index == last)  # the accumulation may change between steps
        out = engine(**batch, num_targets=normaliser)
        if not torch.isfinite(out.loss):
            finite = False
        engine.backward(out.loss)
        counted = batch["target_valid"] & torch.isfinite(out.target_losses)  # no NaN enters the importance
        model.update_importance(batch["target_ids"], out.target_losses.float(), counted, end_of_step=index == last)
        loss_sum += out.target_losses.double().sum()
        if index == last:  # before the update: every rank agrees on whether to apply it
            finite = agree_finite(finite, step, policy, device)
        if index == last and not finite and engine.optimizer is optimizer:
            with _skip_update(optimizer):  # DeepSpeed's fp16/bf16/ZeRO optimizers skip non-finite grads themselves
                engine.step()
        else:
            engine.step()
    return finite, loss_sum


def pretrain(run: RunConfig, ds_config_path: str, stop: StopSignal | None = None) -> list[dict]:
    """Train (or resume) to run.train.train_steps; returns the records logged by rank 0. Raises RunStopped
    after checkpointing when `stop` (installed here if not given) sees SIGTERM or Ctrl-C."""
    device = training_device()
    run, precision_line = with_resolved_precision(run, device)  # train.precision=auto decided here
    with refusing():
        ds_config = validate_run(run, ds_config_path)  # every check that needs no process group
    init_distributed()
    train = run.train
    is_rank0 = dist.get_rank() == 0
    rank0_print(is_rank0)(precision_line)
    pair_head = run.data.pair_head
    if train.restart:
        if is_rank0 and (moved := checkpoint.move_aside(train.save_dir)) is not None:
            print(f"train.restart=true: starting fresh; the old checkpoints are now in {moved}", flush=True)
        dist.barrier()
    resuming = bool(checkpoint.all_tags(train.save_dir))
    in_turn = {"rank": dist.get_rank(), "local_rank": int(os.environ.get("LOCAL_RANK", 0)), "barrier": dist.barrier}
    total_samples = train.train_steps * ds_config["train_batch_size"]

    def build_phase_datasets() -> list[PretrainingData]:
        """One dataset per sequence-length phase (one without a schedule)."""
        return [build_datasets_in_turn(phase, run.model, train, total_samples, **in_turn)
                for phase in run.data.phases()]

    pipe: PipelineModel | None = None
    if run.parallel.pipeline_parallel > 1:
        with refusing():  # a damaged shard or an unwritable index cache
            datasets = build_phase_datasets()
        pipe = build_pipeline(run, datasets[0].special.as_dict())  # DeepSpeed's grid creates the groups
        model, groups, tracker = pipe.module, pipe.groups, pipe.tracker
        if train.init_from_hf and not resuming:
            with refusing():
                _load_hf(model, train.init_from_hf, rank0_print(is_rank0))
        mpu = None  # the pipeline module hands DeepSpeed its grid
    else:
        groups = ProcessGroups.from_world(run.parallel)
        tracker = RNGStatesTracker.for_model(train.seed, tensor_rank=groups.tensor.rank,
                                             pipeline_rank=groups.pipeline.rank)
        with refusing():
            datasets = build_phase_datasets()
        model = BertForPreTraining(run.model, groups, pair_head=pair_head, tracker=tracker,
                                   special_ids=datasets[0].special.as_dict()).to(device)
        if train.init_from_hf and not resuming:
            with refusing():
                _load_hf(model, train.init_from_hf, rank0_print(is_rank0))
        mpu = DeepSpeedMPU(groups) if dist.is_initialized() else None
    set_activation_checkpointing(model, train.activation_checkpointing)
    layout = current_layout(groups.data.size, groups.tensor.size, groups.pipeline.size,
                            int((ds_config.get("zero_optimization") or {}).get("stage", 0)))
    universal_tag = None
    if resuming:
        with refusing():  # a layout change that cannot be converted
            universal_tag = _prepare_layout_change(train.save_dir, layout, run.model, is_rank0,
                                                   trust=train.trust_checkpoint)
        if universal_tag is not None:
            ds_config["checkpoint"] = {**(ds_config.get("checkpoint") or {}), "load_universal": True}
    engine, optimizer = build_engine(model, train, ds_config, mpu, compile_model=run.model.compile)
    if engine.is_compiled:
        rank0_print(is_rank0)("model.compile=true: torch.compile through DeepSpeed's engine.compile; the first step "
                              "(and the first at each new sequence length) compiles")
    step, consumed, skipped = 0, 0, 0
    with refusing():  # no usable checkpoint after all (all ranks agree)
        loaded = checkpoint.load(engine, train.save_dir, report=rank0_print(is_rank0), only_tag=universal_tag,
                                 trust=train.trust_checkpoint) if resuming else None
    client = loaded[1] if loaded else None
    if loaded is not None and universal_tag is not None:
        restore_buffers(engine.module, checkpoint.checkpoint_root(train.save_dir) /
                        universal_tag.removesuffix(UNIVERSAL_SUFFIX), run.model, trust=train.trust_checkpoint)
    if loaded is not None:
        ours = client["megatron_narrow"]
        step, consumed, skipped = ours["step"], ours["consumed_samples"], ours["nonfinite_skipped"]
        if is_rank0:
            print(f"resumed from step {step} ({consumed:,} samples consumed)", flush=True)
            _report_config_changes(checkpoint.checkpoint_root(train.save_dir) / loaded[0], run, step)

    schedule = BatchSchedule(run, groups.data.size)
    loader, shape = None, None
    logger = MetricsLogger(train.save_dir, enabled=is_rank0, resume_step=step, total_steps=train.train_steps,
                           wandb_project=train.wandb_project, run_config=run.to_dict())
    stop = stop or StopSignal().install()
    peak = peak_flops(torch.cuda.get_device_name()) if torch.cuda.is_available() else None
    records = []

    universal_info = universal_checkpoint_info(  # the same for every save of this run
        run.model.vocab_size, padded_vocab_size(run.model.vocab_size, groups.tensor.size),
        [name for name, _ in model.named_parameters()])

    def save() -> None:
        # one key of our own: DeepSpeed drops client keys that collide with its own (e.g. skipped_steps)
        client_state = {"megatron_narrow": {"step": step, "consumed_samples": consumed, "nonfinite_skipped": skipped,
                                            "rng": checkpoint.rng_state(tracker)},
                        "universal_checkpoint_info": universal_info}
        checkpoint.save(engine, train.save_dir, step, client_state, run_config=run.to_dict(),
                        tokenizer_model=train.tokenizer_model, keep_last=train.keep_last, is_rank0=is_rank0,
                        layout=layout)

    if client is not None:  # last, after everything that draws random numbers while being built
        checkpoint.restore_rng_state(client["megatron_narrow"]["rng"], tracker)
    engine.train()
    first_step, run_started = step, time.perf_counter()
    while step < train.train_steps:
        started = time.perf_counter()
        lr = set_learning_rate(optimizer, step - skipped, train)
        previous, shape = shape, schedule.shape(step + 1, consumed)
        if previous is None or shape.phase != previous.phase:
            if previous is not None or schedule.phase_ends:
                rank0_print(is_rank0)(schedule.describe(shape, step + 1))
            loader = None  # the previous phase's workers shut down before the next phase's start
            loader = iter(make_loader(datasets[shape.phase].train, consumed_samples=consumed,
                                      micro_batch_size=shape.micro_batch_size, dp_rank=groups.data.rank,
                                      dp_size=groups.data.size, num_workers=train.num_workers))
            flops_per_sequence = training_flops_per_sequence(run.model, shape.seq_len, shape.max_predictions)
        if previous is None or (shape.micro_batch_size, shape.global_batch_size) != (
                previous.micro_batch_size, previous.global_batch_size):
            engine.set_train_micro_batch_size(shape.micro_batch_size)
            engine.set_train_batch_size(shape.global_batch_size)  # DeepSpeed scales the loss by its accumulation
        gas, global_batch = shape.gradient_accumulation, shape.global_batch_size
        micro_batches = [{k: v.to(device) for k, v in next(loader).items()} for _ in range(gas)]
        counts = torch.tensor([float(sum(int(b["target_valid"].sum()) for b in micro_batches)),
                               float(sum(int(b["attention_mask"].sum()) for b in micro_batches))], device=device)
        total_targets, total_tokens = all_reduce(counts, groups.data.group).tolist()
        normaliser = torch.tensor(max(total_targets, 1.0) / (groups.data.size * gas), device=device)
        if pipe is not None:
            outcome = pipeline_train_step(engine, pipe, micro_batches, normaliser, pair_head)
            finite = agree_finite(outcome.finite, step + 1, train.nonfinite_loss, device)  # ZeRO-1 skipped it already
            loss_sum = outcome.loss_sum
        else:
            finite, loss_sum = _data_parallel_step(engine, model, optimizer, micro_batches, normaliser, step + 1,
                                                   train.nonfinite_loss)
        consumed += global_batch
        if not finite or not engine.was_step_applied():  # non-finite loss, or an fp16 overflow DeepSpeed skipped
            skipped += 1
        step += 1
        step_time = time.perf_counter() - started

        if step % train.log_interval == 0 or step == train.train_steps:
            loss = all_reduce(loss_sum, groups.data.group).item() / max(total_targets, 1.0)
            sequences_per_s = global_batch / step_time
            record = {"step": step, "loss": loss, "lr": lr,
                      "tokens_per_s": total_tokens / step_time,  # real tokens ([CLS]/[SEP] included), not padding
                      "real_token_fraction": total_tokens / (global_batch * shape.seq_len),
                      "seq_len": shape.seq_len, "global_batch_size": global_batch,
                      "step_time_s": step_time,
                      "samples_per_s": sequences_per_s, "consumed_samples": consumed,
                      "skipped_steps": skipped,
                      "mfu": (flops_per_sequence * sequences_per_s / (peak * dist.get_world_size()))
                      if peak else None}
            records.append(record)
            logger.log(record)
        valid = datasets[shape.phase].valid
        if train.eval_interval and step % train.eval_interval == 0 and valid is not None:
            eval_loss = evaluate(engine, valid, run, groups, device, pipe, micro_batch_size=shape.micro_batch_size)
            record = {"step": step, "eval_loss": eval_loss}
            records.append(record)
            logger.log(record)
            engine.train()
        signalled = torch.tensor(float(stop.received is not None), device=device)
        preempted = all_reduce(signalled, op=dist.ReduceOp.MAX).item() > 0
        if (train.save_interval and step % train.save_interval == 0) or step == train.train_steps or preempted:
            save()
        if preempted:
            logger.close()
            stopped = RunStopped(stop.received or "signal on another rank", step)
            if is_rank0:
                print(stopped, flush=True)
            raise stopped
    logger.close()
    if is_rank0:
        print(end_of_run_summary(train.save_dir, checkpoint.checkpoint_root(train.save_dir) / checkpoint.tag_of(step),
                                 steps=step, steps_this_run=step - first_step,
                                 seconds=time.perf_counter() - run_started, records=records), flush=True)
    return records


def _prepare_layout_change(save_dir: str, layout: dict, config: ModelConfig, is_rank0: bool,
                           trust: bool = False) -> str | None:
    """The universal tag to load when the checkpoint to resume was saved on another layout (converted here,
    once, by rank 0); None when it loads as it is. Refuses what DeepSpeed's universal checkpoints cannot do."""
    plan = checkpoint.plan_resume(save_dir)
    if not plan.candidates:
        return None
    tag = plan.candidates[0]
    tag_dir = checkpoint.checkpoint_root(save_dir) / tag
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

    from megatron_narrow.convert.hf_bert import check_official_narrow_layers, load_hf_into_pipeline, load_hf_state_dict

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
