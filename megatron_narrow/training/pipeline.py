"""The pipeline-parallel side of the loop: build the BertPipeline engine, run one step or one evaluation
through DeepSpeed's schedule, and bring what only the last stage knows (per-target losses) to the
stages that need it.

The last stage computes the loss; after a step it broadcasts over its pipeline group the sum of the
target losses (for the log on rank 0, a first-stage rank), whether they were finite, and for
token_drop the per-id loss tally, which the stage holding the importance vector folds in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_narrow.config import RunConfig
from megatron_narrow.model.token_drop import tally_target_losses
from megatron_narrow.parallel import ProcessGroups, RNGStatesTracker
from megatron_narrow.variants import drops_tokens


@dataclass
class PipelineModel:
    """The pipeline module with what the loop needs alongside it."""

    module: object  # megatron_narrow.model.pipeline.BertPipeline (imports deepspeed)
    groups: ProcessGroups
    tracker: RNGStatesTracker

    @property
    def is_last_stage(self) -> bool:
        return self.groups.pipeline.rank == self.groups.pipeline.size - 1

    @property
    def last_stage_rank(self) -> int:
        return self.groups.pipeline.ranks[-1]


def build_pipeline(run: RunConfig, special_ids: dict[str, int]) -> PipelineModel:
    """The BertPipeline of `run` over the initialised world (all ranks call this)."""
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    from megatron_narrow.model.pipeline import BertPipeline

    layout = run.parallel.resolve(dist.get_world_size())
    topology = PipeModelDataParallelTopology(num_pp=layout.pipeline_parallel, num_mp=layout.tensor_parallel,
                                             num_dp=layout.data_parallel)
    coord = topology.get_coord(dist.get_rank())
    tracker = RNGStatesTracker.for_model(run.train.seed, tensor_rank=coord.model, pipeline_rank=coord.pipe)
    pair_head = run.data.pair_head
    module = BertPipeline(run.model, topology, seq_len=run.data.seq_len,
                          num_queries=run.data.num_queries, partition=layout.pipeline_partition,
                          pair_head=pair_head, tracker=tracker, special_ids=special_ids,
                          segments=run.data.packing == "segments")
    if dist.get_rank() == 0:
        print(module.describe_partition(), flush=True)
    return PipelineModel(module=module, groups=module.groups, tracker=tracker)


def _micro_batches(micro_batches: list[dict[str, torch.Tensor]], pair_head: bool,
                   num_targets=None) -> list[tuple]:
    from megatron_narrow.model.pipeline import pipeline_inputs, pipeline_labels

    out = []
    for batch in micro_batches:
        count = num_targets if num_targets is not None else batch["target_valid"].sum().clamp(min=1).float()
        out.append((pipeline_inputs(batch, pair_head), pipeline_labels(batch, count)))
    return out


def _from_last_stage(pipe: PipelineModel, values: torch.Tensor) -> torch.Tensor:
    """`values` as the last stage of this rank's pipeline holds them (all stages call this)."""
    if pipe.groups.pipeline.size > 1:
        dist.broadcast(values, src=pipe.last_stage_rank, group=pipe.groups.pipeline.group)
    return values


@dataclass
class StepOutcome:
    loss_sum: torch.Tensor
    """float64: the sum of this data-parallel rank's target losses over the step's micro-batches."""
    finite: bool
    """Whether every loss of this rank's micro-batches was finite."""


def pipeline_train_step(engine, pipe: PipelineModel, micro_batches: list[dict[str, torch.Tensor]],
                        num_targets: torch.Tensor, pair_head: bool) -> StepOutcome:
    """One optimizer step through DeepSpeed's pipeline schedule (forward, backward, tied-gradient and
    data-parallel reductions, the update; ZeRO-1 skips an update whose gradients are not finite)."""
    engine.train_batch(iter(_micro_batches(micro_batches, pair_head, num_targets)))
    config = pipe.module.config
    dropping = drops_tokens(config)
    device = num_targets.device
    summary = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, finite
    tally = None
    if pipe.is_last_stage:
        records, finite = pipe.module.loss_fn.take()
        for target_ids, losses, valid in records:
            finite &= bool(torch.isfinite(losses).all())
            summary[0] += losses.double().sum()
            if dropping:
                counted = valid & torch.isfinite(losses)  # no NaN enters the importance
                tally = tally_target_losses(tally, target_ids, losses.float(), counted, config.vocab_size)
        summary[1] = float(finite)
    summary = _from_last_stage(pipe, summary)
    if dropping:
        if tally is None:
            tally = torch.zeros(2, config.vocab_size, dtype=torch.float64, device=device)
        tally = _from_last_stage(pipe, tally)
        importance = pipe.module.token_importance()
        if importance is not None:
            importance.apply(pipe.groups.data, tally)
    return StepOutcome(loss_sum=summary[0], finite=bool(summary[1] >= 1))


@torch.no_grad()
def pipeline_evaluate(engine, pipe: PipelineModel, micro_batches: list[dict[str, torch.Tensor]],
                      pair_head: bool) -> torch.Tensor:
    """(sum of target losses, valid targets) of this data-parallel rank over `micro_batches`, as float64."""
    engine.eval_batch(iter(_micro_batches(micro_batches, pair_head)), num_micro_batches=len(micro_batches),
                      bcast_loss=False)
    device = micro_batches[0]["input_ids"].device
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    if pipe.is_last_stage:
        for _, losses, valid in pipe.module.loss_fn.take()[0]:
            totals[0] += losses.double().sum()
            totals[1] += valid.sum()
    return _from_last_stage(pipe, totals)
