"""The pipeline module against the one-process model, inside DeepSpeed's pipeline engine: after one step of
two micro-batches, both stages' copies of the tied word embeddings hold the one-process model's gradient
(lookup on the first stage plus MLM decoder on the last, summed by the tied all-reduce); and the stage
cuts follow the partition mode."""

from __future__ import annotations

import pytest
import torch

from megatron_narrow.config import ModelConfig

from .distributed import run_distributed

VOCAB, BATCH, SEQ, TARGETS, MICRO_BATCHES = 300, 4, 24, 4, 2
TOL = 1e-6


def config(variant: str) -> ModelConfig:
    return ModelConfig(vocab_size=VOCAB, hidden_size=32, num_layers=4, num_heads=4, variant=variant,
                       full_length_layers=1, hidden_dropout=0.0, attention_dropout=0.0, token_drop_keep_ratio=0.75,
                       max_position_embeddings=SEQ)


def micro_batch(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(110, VOCAB, (BATCH, SEQ), generator=g)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[1, 15:] = 0
    ids[mask == 0] = 0  # [PAD]
    ids[:, 0] = 101  # [CLS]
    positions = torch.stack([torch.randperm(12, generator=g)[:TARGETS] + 1 for _ in range(BATCH)])
    valid = torch.ones(BATCH, TARGETS, dtype=torch.bool)
    valid[2, -1] = False
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids),
            "target_positions": positions, "target_ids": torch.randint(110, VOCAB, (BATCH, TARGETS), generator=g),
            "target_valid": valid}


def num_targets(batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """The loop's loss denominator: the step's valid targets per micro-batch (one data-parallel rank)."""
    return torch.tensor(sum(float(b["target_valid"].sum()) for b in batches) / len(batches))


def _tied_gradients(rank: int, world_size: int, variant: str, tensor_parallel: int) -> dict:
    """One pipeline step; returns this rank's stage, TP rank and the gradient on its word-embedding copy."""
    import deepspeed
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    from megatron_narrow.model.pipeline import BertPipeline, pipeline_inputs, pipeline_labels

    deepspeed.init_distributed(dist_backend="gloo")  # DeepSpeed's comm layer over the harness's process group
    topology = PipeModelDataParallelTopology(num_pp=2, num_mp=tensor_parallel, num_dp=1)
    pipe = BertPipeline(config(variant), topology, seq_len=SEQ, num_queries=TARGETS, partition="uniform")
    initial = {key: value.clone() for key, value in pipe.model_state_dict().items()}
    captured = {}

    class CaptureGradients(torch.optim.SGD):
        """Steps nothing; records the tied weight's gradient as DeepSpeed hands it to the optimizer."""

        def step(self, closure=None):
            captured["grad"] = pipe.tied_modules["word_embeddings"].word_embeddings.weight.grad.clone()

    ds = {"train_micro_batch_size_per_gpu": BATCH, "gradient_accumulation_steps": MICRO_BATCHES,
          "train_batch_size": BATCH * MICRO_BATCHES, "zero_optimization": {"stage": 0}, "gradient_clipping": 0.0,
          "pipeline": {"pipe_partitioned": False, "grad_partitioned": False}, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=pipe, optimizer=CaptureGradients(pipe.parameters(), lr=0.0), config=ds)
    batches = [micro_batch(seed) for seed in range(MICRO_BATCHES)]
    count = num_targets(batches)
    engine.train_batch(iter([(pipeline_inputs(b, False), pipeline_labels(b, count)) for b in batches]))
    return {"stage": pipe.groups.pipeline.rank, "tp_rank": pipe.groups.tensor.rank, "grad": captured["grad"],
            "initial": initial}


@pytest.mark.parametrize("tensor_parallel", [1, 2])
@pytest.mark.parametrize("variant", ["bert", "narrow", "token_drop"])
def test_tied_embedding_gradient_equals_one_process(variant, tensor_parallel):
    from megatron_narrow.model import BertForPreTraining
    from megatron_narrow.parallel import padded_vocab_size

    model = BertForPreTraining(config(variant))
    batches = [micro_batch(seed) for seed in range(MICRO_BATCHES)]
    count = num_targets(batches)
    for batch in batches:  # DeepSpeed scales each micro-batch's loss by 1 / gradient accumulation steps
        (model(**batch, num_targets=count).loss / MICRO_BATCHES).backward()
    expected = model.bert.embeddings.word_embeddings.weight.grad
    assert expected[:VOCAB].abs().sum() > 0

    results = run_distributed(_tied_gradients, 2 * tensor_parallel, variant, tensor_parallel, timeout=240,
                              env={"DS_ACCELERATOR": "cpu"})
    assert sorted((r["stage"], r["tp_rank"]) for r in results) == [(s, t) for s in (0, 1)
                                                                    for t in range(tensor_parallel)]
    padded = padded_vocab_size(VOCAB, tensor_parallel)  # TP pads the vocabulary to a multiple of 128 x TP
    expected = torch.cat([expected[:VOCAB], expected.new_zeros(padded - VOCAB, expected.shape[1])])
    rows = padded // tensor_parallel  # one TP rank's shard
    for r in results:
        shard = expected[r["tp_rank"] * rows:(r["tp_rank"] + 1) * rows]
        torch.testing.assert_close(r["grad"], shard, atol=TOL, rtol=0,
                                   msg=lambda m, r=r: f"stage {r['stage']} TP rank {r['tp_rank']}: {m}")


@pytest.mark.parametrize("variant", ["bert", "narrow", "token_drop"])
def test_stages_start_from_the_one_process_weights_under_its_names(variant):
    """Every tensor of every stage, named by model_key, is the one-process model's tensor of that name, bit for
    bit (per-component generators), and together the stages hold all of them."""
    from megatron_narrow.model import BertForPreTraining

    expected = BertForPreTraining(config(variant)).state_dict()
    results = run_distributed(_tied_gradients, 2, variant, 1, timeout=240, env={"DS_ACCELERATOR": "cpu"})
    seen = set()
    for r in results:
        for key, value in r["initial"].items():
            torch.testing.assert_close(value, expected[key], atol=0, rtol=0, msg=lambda m, k=key: f"{k}: {m}")
            seen.add(key)
    assert seen == set(expected)


def test_stage_boundaries_by_count_and_by_cost():
    from megatron_narrow.model.partition import imbalance
    from megatron_narrow.model.pipeline import stage_boundaries

    base = ModelConfig(variant="narrow", full_length_layers=2, num_layers=12)
    # items: 0 embeddings, 1..12 layers, 13 decoder, 14 head
    assert stage_boundaries(base, 2, "uniform", seq_len=512, num_queries=80) == [0, 7, 15]
    assert stage_boundaries(base, 4, "uniform", seq_len=512, num_queries=80) == [0, 4, 7, 10, 15]
    costed = stage_boundaries(base, 2, "cost", seq_len=512, num_queries=80)
    # a narrow layer costs 0.28 of a full one and the MLM head 0.48: 2 full + 2 narrow (2.57) against
    # 8 narrow + head (2.74) is the most even cut, 1.07 where equal counts (6 + 6) give 1.44
    assert costed == [0, 5, 15]
    from megatron_narrow.model.costs import head_flops, layer_costs

    costs = [float(c) for c in layer_costs(base, 512, 80)]
    costs[-1] += head_flops(base, 80)
    assert imbalance(costs, [0, 4, 12]) == pytest.approx(1.068, abs=1e-3)
    assert imbalance(costs, [0, 6, 12]) == pytest.approx(1.440, abs=1e-3)
    with pytest.raises(ValueError, match="cannot split 12 layers into 13"):
        stage_boundaries(base, 13, "cost", seq_len=512, num_queries=80)
