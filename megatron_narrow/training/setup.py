"""Process setup: refuse bad runs before any process-group work, then rank discovery and groups, and
the DeepSpeed config our run config completes."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_narrow.config import RunConfig, TrainConfig
from megatron_narrow.data.packing import max_packed_targets
from megatron_narrow.data.shards import check_tokenizer_matches, load_manifest
from megatron_narrow.data.tokenizer import Tokenizer, load_tokenizer
from megatron_narrow.formats import checkpoint_files
from megatron_narrow.model.attention_backends import attention_backend
from megatron_narrow.parallel import ProcessGroups
from megatron_narrow.training.batch_schedule import BatchSchedule
from megatron_narrow.training.data import check_data_paths
from megatron_narrow.training.resume import check_resume_config
from megatron_narrow.variants import drops_tokens

_RANK_ENV = ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS")


def world_size_from_env() -> int:
    """The world size the launcher announced (torchrun/deepspeed, mpirun, SLURM), before init."""
    for name in _RANK_ENV:
        if os.environ.get(name):
            return int(os.environ[name])
    return 1


@dataclass
class ValidatedRun:
    """What the checks built, handed forward so that nothing is built twice."""

    ds_config: dict
    """The completed DeepSpeed config."""
    schedule: BatchSchedule
    """The run's step shapes (a schedule some step cannot run was refused)."""
    tokenizer: Tokenizer | None
    """train.tokenizer_model, loaded (None without one)."""


def validate_run(run: RunConfig, ds_config_path: str) -> ValidatedRun:
    """Every check that needs no process group."""
    ds = read_deepspeed_json(ds_config_path)  # a broken file is named before anything else is checked
    world = world_size_from_env()
    layout = run.parallel.resolve(world)
    for data in run.data.phases():  # every sequence-length phase, the run's own data.seq_len last
        run.model.validate(tensor_parallel=layout.tensor_parallel, seq_len=data.seq_len,
                           max_predictions=data.max_predictions)
        if drops_tokens(run.model):
            forced = data.max_predictions + data.special_slots
            k = run.model.kept_tokens(data.seq_len)
            if k < forced:
                raise ValueError(f"model token_drop keeps {k} of {data.seq_len} tokens but every sample forces up "
                                 f"to {forced} in ({data.max_predictions} targets + [CLS]/[SEP]); keep more")
        check_packed_targets(data)
    if layout.pipeline_parallel > 1:
        _validate_pipeline(run, layout.pipeline_parallel, layout.pipeline_partition)
        if run.model.compile:
            raise ValueError("model.compile=true with parallel.pipeline_parallel > 1: DeepSpeed's pipeline engine "
                             "runs its stages eagerly; set model.compile=false or train without pipelining")
        if run.data.seq_len_schedule:
            raise ValueError("data.seq_len_schedule with parallel.pipeline_parallel > 1: DeepSpeed's pipeline engine "
                             "fixes the shapes stages exchange; train the short phase without pipelining, or "
                             "remove the schedule")
    schedule = BatchSchedule(run, layout.data_parallel)  # refuses a global batch a micro batch cannot split
    attention_backend(run.model.attention_backend)  # one line for a kernel this machine cannot run
    check_data_paths(run.data)
    tokenizer = None
    if run.train.tokenizer_model:
        tokenizer = load_tokenizer(run.train.tokenizer_type or "sentencepiece", run.train.tokenizer_model)
    for path in run.data.data_paths:
        check_tokenizer_matches(load_manifest(path), identity=tokenizer.identity if tokenizer else None,
                                vocab_size=run.model.vocab_size, where=path)
    check_resumable(run)
    check_wandb(run.train)
    ds_config = complete_deepspeed_config(ds, ds_config_path, run, layout.data_parallel, layout.pipeline_parallel)
    return ValidatedRun(ds_config, schedule, tokenizer)


def check_packed_targets(data) -> None:
    """packing=segments masks each segment as its own sample; the row's target slots must hold the worst case."""
    if data.packing != "segments":
        return
    needed = max_packed_targets(data.seq_len, data.mask_prob)
    if data.max_predictions < needed:
        raise ValueError(f"data.max_predictions={data.max_predictions} is too small for data.packing=segments: a "
                         f"packed row of {data.seq_len} can need {needed} targets (each segment rounds its "
                         f"data.mask_prob share up); set data.max_predictions={needed}")


def check_wandb(train: TrainConfig) -> None:
    """train.wandb_project needs the optional wandb package: say so before any process starts."""
    if train.wandb_project:
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise ValueError(f"train.wandb_project={train.wandb_project} needs Weights & Biases: pip install wandb "
                             "(or remove the key; metrics.jsonl and tensorboard are always written)")


def check_resumable(run: RunConfig) -> None:
    """Refuse, before any process starts, a save_dir whose checkpoints are all unusable (unless
    train.restart) and a resume that changes what the checkpoint's tensors depend on."""
    if run.train.restart:
        return
    plan = checkpoint_files.plan_resume(run.train.save_dir)
    if plan.tags and not plan.candidates:
        checkpoint_files.refuse_unusable(run.train.save_dir, plan)
    if plan.candidates:
        check_resume_config(checkpoint_files.checkpoint_root(run.train.save_dir) / plan.candidates[0], run.to_dict())


def _validate_pipeline(run: RunConfig, stages: int, partition: str) -> None:
    from megatron_narrow.model.pipeline import stage_boundaries

    try:
        stage_boundaries(run.model, stages, partition, seq_len=run.data.seq_len,
                         num_queries=run.data.num_queries)
    except ValueError as error:
        raise ValueError(f"parallel.pipeline_parallel={stages}: {error} (model.num_layers={run.model.num_layers})"
                         ) from None


def _pipeline_section(path: str, ds: dict, stages: int) -> dict:
    """What DeepSpeed's pipeline engine needs from the JSON: ZeRO stage 1, unpartitioned activations."""
    stage = int((ds.get("zero_optimization") or {}).get("stage", 0))
    if stage != 1:
        why = ("stages 2 and 3 partition gradients, which its pipeline engine does not support" if stage > 1 else
               "at stage 0 its pipeline engine applies updates without checking gradients for inf/NaN")
        raise ValueError(f"{path}: ZeRO stage {stage} with parallel.pipeline_parallel={stages}: pipelines run with "
                         f"ZeRO stage 1 (DeepSpeed: {why}); use ds_configs/zero1.json")
    pipeline = dict(ds.get("pipeline") or {})
    for key in ("pipe_partitioned", "grad_partitioned"):
        if pipeline.get(key, False):
            raise ValueError(f"{path}: pipeline.{key}=true splits only the first tensor a stage sends across "
                             "tensor-parallel ranks; narrow and token_drop stages send several that need "
                             "gradients, so remove it or set it to false")
        pipeline[key] = False
    return pipeline


def read_deepspeed_json(path: str) -> dict:
    """The DeepSpeed JSON as a dict; a missing or malformed file is one line naming it."""
    if not Path(path).is_file():
        raise ValueError(f"DeepSpeed config {path} does not exist")
    try:
        ds = json.loads(Path(path).read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"DeepSpeed config {path} is not valid JSON ({error}); fix the file or use one of "
                         "ds_configs/") from None
    if not isinstance(ds, dict):
        raise ValueError(f"DeepSpeed config {path} must be a JSON object, got a {type(ds).__name__}")
    return ds


def deepspeed_config(path: str, run: RunConfig, data_parallel: int, pipeline_parallel: int = 1) -> dict:
    """Load a DeepSpeed JSON and fill in what our config owns: batch sizes, clipping, precision."""
    return complete_deepspeed_config(read_deepspeed_json(path), path, run, data_parallel, pipeline_parallel)


def complete_deepspeed_config(ds: dict, path: str, run: RunConfig, data_parallel: int,
                              pipeline_parallel: int = 1) -> dict:
    """`ds` (read from `path`, named in errors) with batch sizes, clipping and precision from the run config."""
    train = run.train
    gas = train.gradient_accumulation(data_parallel)
    ours = {"train_micro_batch_size_per_gpu": train.micro_batch_size, "gradient_accumulation_steps": gas,
            "train_batch_size": train.micro_batch_size * gas * data_parallel}
    for key, value in ours.items():
        if ds.get(key, "auto") not in ("auto", value):
            raise ValueError(f"{path}: {key}={ds[key]} disagrees with the run config ({value} from train.* and "
                             f"data_parallel={data_parallel}); remove it or set it to \"auto\"")
        ds[key] = value
    for owned in ("optimizer", "scheduler"):
        if owned in ds:
            raise ValueError(f"{path}: remove the '{owned}' section: the run config's train.* builds it "
                             "(train.optimizer, no decay on biases/LayerNorm, warmup + decay)")
    ds["gradient_clipping"] = train.clip_grad
    for section in ("bf16", "fp16"):  # train.precision is the switch; the JSON may carry loss-scale settings
        enabled = (ds.get(section) or {}).get("enabled", "auto")
        if enabled not in ("auto", train.precision == section):
            raise ValueError(f"{path}: {section}.enabled={str(enabled).lower()} disagrees with train.precision="
                             f"{train.precision}; remove 'enabled' (train.precision switches it) or set it to \"auto\"")
        ds[section] = {**(ds.get(section) or {}), "enabled": train.precision == section}
    ds.setdefault("steps_per_print", 2**31 - 1)  # our logger reports; keep DeepSpeed's quiet
    ds["zero_allow_untested_optimizer"] = True
    zero = ds.get("zero_optimization") or {}
    if train.precision == "fp16" and int(zero.get("stage", 0)) == 0:
        raise ValueError(f"{path}: train.precision=fp16 needs ZeRO stage >= 1 (e.g. ds_configs/zero1.json): at stage 0 "
                         "DeepSpeed 0.19 unscales gradients it never scaled, so training stalls "
                         "(deepspeedai/DeepSpeed#8393); fp32 and bf16 work at stage 0")
    if train.optimizer == "lamb" and (int(zero.get("stage", 0)) > 0 or train.precision != "fp32"
                                      or pipeline_parallel > 1):
        raise ValueError(f"{path}: train.optimizer=lamb runs with ZeRO stage 0, fp32 and no pipeline (e.g. "
                         "ds_configs/zero0.json, train.precision=fp32): LAMB's trust ratio is per tensor, and "
                         "DeepSpeed's ZeRO and mixed-precision optimizers flatten the tensors into partitions")
    if pipeline_parallel > 1:
        ds["pipeline"] = _pipeline_section(path, ds, pipeline_parallel)
    if zero.get("offload_optimizer") or zero.get("offload_param"):
        ds["zero_force_ds_cpu_optimizer"] = False  # torch AdamW on the host is fine here
    return ds


def init_distributed() -> None:
    """Rank discovery for deepspeed, torchrun and mpirun (mpi4py), gloo on CPU and NCCL on CUDA."""
    import deepspeed

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    # mpi4py discovery sets MASTER_PORT to this port: keep the one the user chose (29500 is DeepSpeed's default)
    port = int(os.environ.get("MASTER_PORT", 29500))
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=True, distributed_port=port, verbose=False)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))


def _group_fact(axis: str, fact: str) -> Callable[[DeepSpeedMPU], object]:
    """A DeepSpeedMPU method returning `fact` (rank, size or group) of the `axis` (tensor, data) group."""

    def read(mpu: DeepSpeedMPU) -> object:
        return getattr(getattr(mpu.groups, axis), fact)

    return read


class DeepSpeedMPU:
    """The model-parallel unit DeepSpeed asks for, over our groups: gradients are averaged over the
    data-parallel group only, and the gradient norm is reduced over the tensor-parallel group."""

    def __init__(self, groups: ProcessGroups) -> None:
        self.groups = groups

    get_model_parallel_rank = get_tensor_model_parallel_rank = _group_fact("tensor", "rank")
    get_model_parallel_world_size = get_tensor_model_parallel_world_size = _group_fact("tensor", "size")
    get_model_parallel_group = get_tensor_model_parallel_group = _group_fact("tensor", "group")
    get_data_parallel_rank = _group_fact("data", "rank")
    get_data_parallel_world_size = _group_fact("data", "size")
    get_data_parallel_group = _group_fact("data", "group")
