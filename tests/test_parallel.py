"""megatron_narrow.parallel: layouts, collectives, TP layers, vocab-parallel cross-entropy and RNG streams.

Multi-rank checks run on gloo CPU processes (tests/distributed.py). Every TP=2 result is compared with
the TP=1 layer built from an identically seeded generator: fp32 outputs and gradients within 1e-6
(linear layers, embedding) or 1e-5 (cross-entropy, which goes through exp/log).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_narrow.config import ParallelConfig
from megatron_narrow.parallel import (
    ColumnParallelLinear,
    GroupInfo,
    ProcessGroups,
    RNGStatesTracker,
    RowParallelLinear,
    VocabParallelEmbedding,
    column_parallel_projections,
    copy_to_tensor_region,
    gather_from_tensor_region,
    linear_cross_entropy,
    padded_vocab_size,
    reduce_from_tensor_region,
    scatter_to_tensor_region,
    vocab_parallel_cross_entropy,
)
from tests.distributed import DistributedTestError, run_distributed

LINEAR_TOL = {"atol": 1e-6, "rtol": 0.0}
CE_TOL = {"atol": 1e-5, "rtol": 0.0}
SEED = 1234


def close(actual: torch.Tensor, expected: torch.Tensor, tol: dict[str, float] = LINEAR_TOL) -> None:
    torch.testing.assert_close(actual, expected, **tol)


def generator(seed: int = SEED) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tp_groups(tp: int = 2, pp: int = 1) -> ProcessGroups:
    return ProcessGroups.from_world(ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp))


def shard(t: torch.Tensor, group: GroupInfo, dim: int) -> torch.Tensor:
    return t.chunk(group.size, dim=dim)[group.rank]


# ----------------------------------------------------------------------------------------------------------------------
# The harness itself


def _echo(rank: int, world_size: int, offset: int) -> dict:
    import os

    x = torch.tensor([float(rank)], requires_grad=True) * 2
    total = torch.tensor([float(rank)])
    dist.all_reduce(total)
    return {"rank": rank + offset, "world": world_size, "x": x, "sum": total, "backend": dist.get_backend(),
            "env": (os.environ.get("MN_PARENT_VAR"), os.environ.get("MN_ARG_VAR"), os.environ["RANK"]),
            "threads": torch.get_num_threads()}


def _init_from_env(rank: int, world_size: int) -> int:
    assert not dist.is_initialized()
    dist.init_process_group("gloo")  # env:// from MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE
    total = torch.tensor([rank + 1])
    dist.all_reduce(total)
    return int(total.item())


def _fail_on_rank_one(rank: int, world_size: int) -> None:
    if rank == 1:
        raise ValueError("deliberate failure on rank one")
    dist.barrier()  # rank 0 would wait here forever: the harness must kill it


def _crash_on_rank_zero(rank: int, world_size: int) -> None:
    import os

    print(f"rank {rank} says goodbye", flush=True)
    if rank == 0:
        os._exit(3)
    dist.barrier()


def _sleep_forever(rank: int, world_size: int) -> None:
    import time

    time.sleep(600)


def test_harness_returns_values_in_rank_order(monkeypatch):
    monkeypatch.setenv("MN_PARENT_VAR", "from-parent")  # set after the fork server started: must still arrive
    out = run_distributed(_echo, 3, 10, env={"MN_ARG_VAR": "from-arg"})
    assert [o["rank"] for o in out] == [10, 11, 12]
    assert all(o["world"] == 3 and o["backend"] == "gloo" and o["sum"].item() == 3.0 for o in out)
    assert [o["env"] for o in out] == [("from-parent", "from-arg", str(r)) for r in range(3)]
    assert all(o["threads"] == 1 for o in out)
    assert not out[2]["x"].requires_grad and out[2]["x"].item() == 4.0  # detached CPU tensors come back


def test_harness_lets_fn_initialise_from_the_environment():
    assert run_distributed(_init_from_env, 2, init_process_group=False) == [3, 3]


def test_harness_raises_with_child_traceback_and_does_not_hang():
    with pytest.raises(DistributedTestError, match="deliberate failure on rank one") as info:
        run_distributed(_fail_on_rank_one, 2, timeout=60)
    message = str(info.value)
    assert "Traceback" in message
    assert message.splitlines()[1] == "rank 1 raised:"  # the root cause comes first, before rank 0's fallout


def test_harness_reports_a_crash_with_the_rank_output(capsys):
    with pytest.raises(DistributedTestError, match=r"rank 0 exited with code 3 without a result; its output:\n"
                                                   r"rank 0 says goodbye"):
        run_distributed(_crash_on_rank_zero, 2, timeout=60)
    assert "[rank 1] rank 1 says goodbye" in capsys.readouterr().out  # child output is replayed in the caller


def test_harness_times_out():
    with pytest.raises(DistributedTestError, match="timed out after 2 s"):
        run_distributed(_sleep_forever, 2, timeout=2)


# ----------------------------------------------------------------------------------------------------------------------
# Layout arithmetic and process groups


def test_parallel_config_resolve_arithmetic():
    assert ParallelConfig(tensor_parallel=2, pipeline_parallel=2).resolve(8).data_parallel == 2
    assert ParallelConfig(tensor_parallel=2, pipeline_parallel=2, data_parallel=2).resolve(8).data_parallel == 2
    assert ParallelConfig().resolve(4).data_parallel == 4
    resolved = ParallelConfig(tensor_parallel=4).resolve(8)
    assert (resolved.tensor_parallel, resolved.pipeline_parallel, resolved.data_parallel) == (4, 1, 2)

    with pytest.raises(ValueError, match=r"world size 6 .*tensor_parallel=2 .*pipeline_parallel=2"):
        ParallelConfig(tensor_parallel=2, pipeline_parallel=2).resolve(6)
    with pytest.raises(ValueError, match=r"data_parallel=3 = 12, but the world size is 8"):
        ParallelConfig(tensor_parallel=2, pipeline_parallel=2, data_parallel=3).resolve(8)
    with pytest.raises(ValueError, match=r"parallel\.tensor_parallel must be >= 1, got 0"):
        ParallelConfig(tensor_parallel=0)
    with pytest.raises(ValueError, match=r"parallel\.data_parallel must be >= 1, got 0"):
        ParallelConfig(data_parallel=0)


def test_single_process_groups_are_trivial():
    groups = ProcessGroups.single()
    for g in (groups.tensor, groups.data, groups.pipeline):
        assert (g.group, g.rank, g.size, g.ranks) == (None, 0, 1, (0,))


def _layout(rank: int, world_size: int, tp: int, pp: int) -> dict:
    groups = tp_groups(tp, pp)
    out = {"global_rank": groups.global_rank}
    for kind in ("tensor", "data", "pipeline"):
        g: GroupInfo = getattr(groups, kind)
        total = torch.tensor([float(rank)])
        if g.size > 1:  # the group object really connects the ranks it names
            dist.all_reduce(total, group=g.group)
        out[kind] = (g.ranks, g.rank, g.size, g.group is None, total.item())
    return out


@pytest.mark.parametrize(
    ("tp", "pp", "tensor", "data", "pipeline"),
    [
        (2, 1, [(0, 1), (0, 1), (2, 3), (2, 3)], [(0, 2), (1, 3), (0, 2), (1, 3)], [(0,), (1,), (2,), (3,)]),
        (2, 2, [(0, 1), (0, 1), (2, 3), (2, 3)], [(0,), (1,), (2,), (3,)], [(0, 2), (1, 3), (0, 2), (1, 3)]),
    ],
)
def test_process_groups_megatron_rank_order(tp, pp, tensor, data, pipeline):
    out = run_distributed(_layout, 4, tp, pp)
    for rank, o in enumerate(out):
        assert o["global_rank"] == rank
        for kind, expected in (("tensor", tensor), ("data", data), ("pipeline", pipeline)):
            ranks, local_rank, size, is_none, total = o[kind]
            assert ranks == expected[rank], (kind, rank)
            assert local_rank == expected[rank].index(rank) and size == len(expected[rank])
            assert not is_none  # size-1 groups exist too: DeepSpeed reads them through the MPU
            assert total == float(sum(expected[rank]))


# ----------------------------------------------------------------------------------------------------------------------
# Parallel linear layers: TP=2 against TP=1 built from the same seed

IN, OUT, BATCH = 16, 12, (2, 3)


def _inputs(in_features: int, out_features: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = generator(99)
    x = torch.randn(*BATCH, in_features, generator=g)
    grad_out = torch.randn(*BATCH, out_features, generator=g)
    bias = torch.randn(out_features, generator=g)
    return x, grad_out, bias


def _run_layer(layer: torch.nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    y = layer(x)
    (y * grad_out).sum().backward()
    return y.detach(), x.grad


def _column(rank: int, world_size: int, gather_output: bool) -> None:
    groups = tp_groups()
    tp = groups.tensor
    x, grad_out, bias = _inputs(IN, OUT)
    ref = ColumnParallelLinear(IN, OUT, group=GroupInfo.trivial(), generator=generator())
    par = ColumnParallelLinear(IN, OUT, group=tp, gather_output=gather_output, generator=generator())
    with torch.no_grad():
        ref.bias.copy_(bias)
        par.bias.copy_(shard(bias, tp, 0))
    assert par.weight.shape == (OUT // 2, IN) and par.bias.shape == (OUT // 2,)
    close(par.weight, shard(ref.weight, tp, 0))  # same master weight, this rank's rows

    y_ref, dx_ref = _run_layer(ref, x, grad_out)
    y_par, dx_par = _run_layer(par, x, grad_out if gather_output else shard(grad_out, tp, -1))
    close(y_par, y_ref if gather_output else shard(y_ref, tp, -1))
    close(dx_par, dx_ref)  # copy_to_tensor_region's backward all-reduces the partial input grads
    close(par.weight.grad, shard(ref.weight.grad, tp, 0))
    close(par.bias.grad, shard(ref.bias.grad, tp, 0))


def _row(rank: int, world_size: int, input_is_parallel: bool) -> None:
    groups = tp_groups()
    tp = groups.tensor
    x, grad_out, bias = _inputs(IN, OUT)
    ref = RowParallelLinear(IN, OUT, group=GroupInfo.trivial(), generator=generator())
    par = RowParallelLinear(IN, OUT, group=tp, input_is_parallel=input_is_parallel, generator=generator())
    with torch.no_grad():
        ref.bias.copy_(bias)
        par.bias.copy_(bias)
    assert par.weight.shape == (OUT, IN // 2) and par.bias.shape == (OUT,)
    close(par.weight, shard(ref.weight, tp, 1))

    y_ref, dx_ref = _run_layer(ref, x, grad_out)
    y_par, dx_par = _run_layer(par, shard(x, tp, -1) if input_is_parallel else x, grad_out)
    close(y_par, y_ref)
    close(dx_par, shard(dx_ref, tp, -1) if input_is_parallel else dx_ref)
    close(par.weight.grad, shard(ref.weight.grad, tp, 1))
    close(par.bias.grad, ref.bias.grad)


class _MLP(torch.nn.Module):
    def __init__(self, group: GroupInfo, g: torch.Generator):
        super().__init__()
        self.fc1 = ColumnParallelLinear(IN, 4 * IN, group=group, generator=g)
        self.fc2 = RowParallelLinear(4 * IN, IN, group=group, input_is_parallel=True, generator=g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


def _mlp(rank: int, world_size: int) -> None:
    tp = tp_groups().tensor
    x, grad_out, _ = _inputs(IN, IN)
    ref, par = _MLP(GroupInfo.trivial(), generator()), _MLP(tp, generator())
    with torch.no_grad():  # nonzero biases, drawn identically on both
        g = generator(7)
        ref.fc1.bias.copy_(torch.randn(4 * IN, generator=g))
        ref.fc2.bias.copy_(torch.randn(IN, generator=g))
        par.fc1.bias.copy_(shard(ref.fc1.bias, tp, 0))
        par.fc2.bias.copy_(ref.fc2.bias)
    y_ref, dx_ref = _run_layer(ref, x, grad_out)
    y_par, dx_par = _run_layer(par, x, grad_out)
    close(y_par, y_ref)
    close(dx_par, dx_ref)
    close(par.fc1.weight.grad, shard(ref.fc1.weight.grad, tp, 0))
    close(par.fc1.bias.grad, shard(ref.fc1.bias.grad, tp, 0))
    close(par.fc2.weight.grad, shard(ref.fc2.weight.grad, tp, 1))
    close(par.fc2.bias.grad, ref.fc2.bias.grad)


@pytest.mark.parametrize("gather_output", [True, False])
def test_column_parallel_linear_matches_tp1(gather_output):
    run_distributed(_column, 2, gather_output)


@pytest.mark.parametrize("input_is_parallel", [True, False])
def test_row_parallel_linear_matches_tp1(input_is_parallel):
    run_distributed(_row, 2, input_is_parallel)


def test_column_row_mlp_matches_tp1():
    run_distributed(_mlp, 2)


def test_tp1_layers_are_plain_linears():
    x, _, bias = _inputs(IN, OUT)
    for cls in (ColumnParallelLinear, RowParallelLinear):
        layer = cls(IN, OUT, group=GroupInfo.trivial(), generator=generator())
        assert layer.weight.shape == (OUT, IN)
        assert torch.equal(layer.weight, torch.empty(OUT, IN).normal_(0.0, 0.02, generator=generator()))
        with torch.no_grad():
            layer.bias.copy_(bias)
        close(layer(x), x @ layer.weight.T + bias)


@pytest.mark.parametrize("limit", [None, 1])
def test_column_parallel_projections_equal_separate_linears(monkeypatch, limit):
    """Stacked-weight GEMMs (one group, or one GEMM per projection when the CPU output limit is tiny) give
    each layer's F.linear output and the same gradients, bit for bit apart from GEMM summation order."""
    import megatron_narrow.parallel.layers as layers_module

    if limit is not None:
        monkeypatch.setattr(layers_module, "CPU_GEMM_OUTPUT_BYTES", limit)
    g = torch.Generator().manual_seed(SEED)
    group = GroupInfo.trivial()
    layers = [ColumnParallelLinear(8, out, group=group, generator=g) for out in (8, 4, 12)]
    for layer in layers:
        layer.bias.data.normal_(generator=g)
    x = torch.randn(3, 5, 8, generator=g, requires_grad=True)
    outputs = column_parallel_projections(x, layers)
    grads = torch.autograd.grad(sum((o * i).sum() for i, o in enumerate(outputs, 1)), [x, *layers[1].parameters()])
    x_ref = x.detach().requires_grad_()
    reference = [F.linear(x_ref, layer.weight, layer.bias) for layer in layers]
    ref_grads = torch.autograd.grad(sum((o * i).sum() for i, o in enumerate(reference, 1)),
                                    [x_ref, *layers[1].parameters()])
    assert [o.shape for o in outputs] == [(3, 5, 8), (3, 5, 4), (3, 5, 12)]
    for actual, expected in zip([*outputs, *grads], [*reference, *ref_grads], strict=True):
        close(actual, expected)
    with pytest.raises(ValueError, match="one group"):
        column_parallel_projections(x, [layers[0], ColumnParallelLinear(8, 4, group=group, bias=False)])


def test_tp_layers_reject_indivisible_sizes_and_draw_the_same_master():
    half = GroupInfo(group=None, rank=1, size=2, ranks=(0, 1))  # construction alone makes no collective call
    with pytest.raises(ValueError, match=r"out_features \(7\) is not divisible by the tensor-parallel size \(2\)"):
        ColumnParallelLinear(4, 7, group=half)
    with pytest.raises(ValueError, match=r"in_features \(7\) is not divisible by the tensor-parallel size \(2\)"):
        RowParallelLinear(7, 4, group=half)
    # The generator advances by the same amount whatever the TP size, so later layers stay in step.
    g1, g2 = generator(), generator()
    ColumnParallelLinear(8, 6, group=GroupInfo.trivial(), generator=g1)
    ColumnParallelLinear(8, 6, group=half, generator=g2)
    assert torch.equal(g1.get_state(), g2.get_state())


# ----------------------------------------------------------------------------------------------------------------------
# Vocabulary-parallel embedding

VOCAB, DIM = 300, 8  # padded: 384 at TP=1, 512 at TP=2 (256 rows per rank: ids >= 256 live on rank 1)


def test_padded_vocab_size():
    assert padded_vocab_size(30522, 1) == 30592
    assert padded_vocab_size(30522, 2) == 30720
    assert padded_vocab_size(30522, 4) == 30720
    assert padded_vocab_size(30592, 1) == 30592  # already a multiple: unchanged
    assert padded_vocab_size(VOCAB, 1) == 384 and padded_vocab_size(VOCAB, 2) == 512
    assert padded_vocab_size(100, 2, multiple=8) == 112


def test_embedding_tp1_padding_and_errors():
    emb = VocabParallelEmbedding(VOCAB, DIM, group=GroupInfo.trivial(), generator=generator())
    assert emb.weight.shape == (384, DIM)
    assert torch.count_nonzero(emb.weight[VOCAB:]) == 0 and torch.count_nonzero(emb.weight[:VOCAB]) == VOCAB * DIM
    ids = torch.tensor([[0, 5, 299]])
    close(emb(ids), emb.weight[ids].detach())
    with pytest.raises(ValueError, match="padded vocabulary 200 is smaller than the vocabulary 300"):
        VocabParallelEmbedding(VOCAB, DIM, group=GroupInfo.trivial(), padded_size=200)


def _embedding(rank: int, world_size: int) -> None:
    tp = tp_groups().tensor
    ref = VocabParallelEmbedding(VOCAB, DIM, group=GroupInfo.trivial(), generator=generator())
    par = VocabParallelEmbedding(VOCAB, DIM, group=tp, generator=generator())
    assert par.weight.shape == (256, DIM) and (par.vocab_start, par.vocab_end) == (256 * rank, 256 * (rank + 1))
    g = generator(5)
    ids = torch.tensor([[0, 1, 255, 256, 299, 1], [257, 3, 299, 128, 255, 256]])  # both shards, repeats, the edges
    grad_out = torch.randn(*ids.shape, DIM, generator=g)

    y_ref, y_par = ref(ids), par(ids)
    close(y_par, y_ref)
    (y_ref * grad_out).sum().backward()
    (y_par * grad_out).sum().backward()
    rows = slice(par.vocab_start, min(par.vocab_end, VOCAB))
    local_real = rows.stop - rows.start
    close(par.weight[:local_real], ref.weight[rows])
    close(par.weight.grad[:local_real], ref.weight.grad[rows])
    # padding rows (ids 300..511 on rank 1) start at zero and never receive a gradient
    assert torch.count_nonzero(par.weight[local_real:]) == 0
    assert torch.count_nonzero(par.weight.grad[local_real:]) == 0


def test_vocab_parallel_embedding_matches_tp1():
    run_distributed(_embedding, 2)


# ----------------------------------------------------------------------------------------------------------------------
# Vocabulary-parallel cross-entropy

CE_VOCAB = 16
CE_TARGETS = torch.tensor([[0, 7, 8, 15, 3], [12, 9, 1, 8, 7]])  # [B=2, S=5]; shard edges of TP=2 (0-7 | 8-15)


def _ce_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = generator(11)
    logits = 4.0 * torch.randn(*CE_TARGETS.shape, CE_VOCAB, generator=g)
    grad_loss = torch.rand(*CE_TARGETS.shape, generator=g) + 0.5
    return logits, grad_loss


def _ce_reference(logits: torch.Tensor, grad_loss: torch.Tensor,
                  targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = logits.clone().requires_grad_(True)
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)
    (loss * grad_loss).sum().backward()
    return loss.detach(), logits.grad


def _ce_check(logits_full: torch.Tensor, grad_loss: torch.Tensor, group: GroupInfo,
              targets: torch.Tensor = CE_TARGETS) -> None:
    loss_ref, grad_ref = _ce_reference(logits_full, grad_loss, targets)
    logits = shard(logits_full, group, -1).clone().requires_grad_(True)
    loss = vocab_parallel_cross_entropy(logits, targets, group)
    assert loss.shape == targets.shape
    close(loss.detach(), loss_ref, CE_TOL)
    (loss * grad_loss).sum().backward()
    close(logits.grad, shard(grad_ref, group, -1), CE_TOL)


def test_vocab_parallel_cross_entropy_tp1():
    logits, grad_loss = _ce_data()
    _ce_check(logits, grad_loss, GroupInfo.trivial())
    padded = logits.clone()
    padded[..., 12:] = float("-inf")  # padded vocabulary columns, masked as the MLM head does
    _ce_check(padded, grad_loss, GroupInfo.trivial(), CE_TARGETS % 12)
    _ce_check(logits + 1000.0, grad_loss, GroupInfo.trivial())  # large logits: the max shift keeps exp finite


def test_vocab_parallel_cross_entropy_keeps_low_precision_grad_dtype():
    """bf16 logits: the loss is fp32 maths on them (fp32 rounding only), the gradient the fp32 gradient rounded
    once to bf16 (within half a bf16 ulp of it, plus the fp32 difference of exp(x - lse) against softmax)."""
    g = generator(12)
    logits = (4.0 * torch.randn(3, 100, 5000, generator=g)).bfloat16().requires_grad_(True)  # rows span chunks
    targets = torch.randint(0, 5000, (3, 100), generator=g)
    grad_loss = torch.rand(3, 100, generator=g) + 0.5
    loss = vocab_parallel_cross_entropy(logits, targets, GroupInfo.trivial())
    assert loss.dtype == torch.float32  # computed in fp32
    (loss * grad_loss).sum().backward()
    assert logits.grad.dtype == torch.bfloat16
    loss_ref, grad_ref = _ce_reference(logits.detach().float(), grad_loss, targets)
    close(loss.detach(), loss_ref, dict(rtol=2**-22, atol=0))
    half_ulp = torch.where(grad_ref == 0, 0.0, 2.0 ** (torch.floor(torch.log2(grad_ref.abs())) - 8))
    assert ((logits.grad.float() - grad_ref).abs() <= half_ulp * (1 + 2**-10)).all()


def _linear_ce_case(dtype: torch.dtype):
    """A tied decoder as the MLM head has it: x (2, 9, 16) from an embedding lookup of the same weight (so its
    gradient has two parts), 40 vocabulary rows of which the last 4 are -inf padding in the bias."""
    g = generator(13)
    weight = (torch.randn(40, 16, generator=g) / 4).to(dtype)
    bias = torch.randn(40, generator=g).to(dtype)
    bias[36:] = float("-inf")
    ids = torch.randint(0, 36, (2, 9), generator=g)
    mix = torch.randn(16, 16, generator=g).to(dtype)
    targets = torch.randint(0, 36, (2, 9), generator=g)
    valid = torch.rand(2, 9, generator=g) > 0.2
    return weight, bias, ids, mix, targets, valid


def _linear_ce_run(dtype: torch.dtype, fused: bool) -> dict[str, torch.Tensor]:
    weight, bias, ids, mix, targets, valid = _linear_ce_case(dtype)
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    x = F.embedding(ids, weight) @ mix
    denominator = valid.sum()
    if fused:
        loss, losses = linear_cross_entropy(x, weight, bias, targets, valid, denominator)
    else:
        logits = F.linear(x.float(), weight.float(), bias.float())
        losses = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape) * valid
        loss = losses.sum() / denominator
    (loss * 0.75).backward()  # a scale reaches backward, as DeepSpeed's gradient accumulation divides the loss
    return {"loss": loss.detach(), "losses": losses.detach(), "weight": weight.grad.float(), "bias": bias.grad.float()}


@pytest.mark.parametrize("chunk_rows", [18, 5, 1])
def test_linear_cross_entropy_equals_logits_then_cross_entropy(monkeypatch, chunk_rows):
    """fp32: loss, per-row losses and the gradients of x (through the embedding) and of the tied weight and the
    bias equal torch's two steps to fp32 rounding, whether the 18 rows go in one chunk or several."""
    from megatron_narrow.parallel import cross_entropy

    monkeypatch.setattr(cross_entropy, "LOGITS_CHUNK_BYTES", chunk_rows * 40 * 4)
    expected, actual = _linear_ce_run(torch.float32, fused=False), _linear_ce_run(torch.float32, fused=True)
    for name, value in expected.items():
        close(actual[name], value, {"atol": 2e-6, "rtol": 0.0})
    assert actual["bias"][36:].abs().max() == 0  # the padding columns take no share


def test_linear_cross_entropy_bf16_within_its_rounding(monkeypatch):
    """bf16 x and weight, three chunks, against fp32 maths on the same bf16 values and the same bf16 logits: the
    loss to fp32 rounding; each gradient entry is a sum of products of bf16 operands, off by roundings of 2^-9
    of the sum of its terms' magnitudes: the softmax gradient's, each chunk's product's, the final sum's and the
    backward scale's (4; the two-step path rounds the softmax gradient after the scale and has 2), and torch's
    bf16 GEMMs at these small shapes add up to 2 (measured: 6 for the weight, 3 for x and the bias). Bound: 8."""
    from megatron_narrow.parallel import cross_entropy

    monkeypatch.setattr(cross_entropy, "LOGITS_CHUNK_BYTES", 7 * 40 * 2)
    *_, targets, valid = _linear_ce_case(torch.bfloat16)
    g = generator(14)  # few mantissa bits: every logit is exact in fp32, so both paths round it alike
    x = (torch.randint(-2, 3, (2, 9, 16), generator=g) / 2).bfloat16()
    weight = (torch.randint(-8, 9, (40, 16), generator=g) / 16).bfloat16()
    bias = (torch.randint(-4, 5, (40,), generator=g) / 4).bfloat16()
    bias[36:] = float("-inf")
    leaves = [t.detach().requires_grad_(True) for t in (x, weight, bias)]
    loss, _ = linear_cross_entropy(*leaves, targets, valid, valid.sum())
    (loss * 0.75).backward()
    reference = [t.detach().float().requires_grad_(True) for t in (x, weight, bias)]
    logits = F.linear(*reference).bfloat16().float()  # the bf16 logits both paths see
    expected_losses = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none") * valid.flatten()
    expected = expected_losses.sum() / valid.sum()
    (expected * 0.75).backward()
    close(loss.detach(), expected.detach(), {"atol": 0.0, "rtol": 1e-6})
    rows = (logits.detach().softmax(-1) + F.one_hot(targets, 40)).flatten(0, 1).abs() \
        * (0.75 * valid.flatten()[:, None] / valid.sum())  # |w_r (p - onehot)| <= w_r (p + onehot)
    x32, w32 = x.float().flatten(0, 1), weight.float()
    for leaf, ref, magnitude in zip(leaves, reference, (rows @ w32.abs(), rows.t() @ x32.abs(), rows.sum(0)),
                                    strict=True):
        error = (leaf.grad.float().reshape(magnitude.shape) - ref.grad.reshape(magnitude.shape)).abs()
        assert (error <= 2**-6 * magnitude + 1e-7).all(), (leaf.shape, (error / magnitude.clamp(min=1e-12)).max())


def test_linear_cross_entropy_refuses_a_second_backward():
    weight, bias, ids, mix, targets, valid = _linear_ce_case(torch.float32)
    weight.requires_grad_(True)
    loss, _ = linear_cross_entropy(F.embedding(ids, weight) @ mix, weight, bias, targets, valid, valid.sum())
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()


def _ce_tp2(rank: int, world_size: int) -> None:
    tp = tp_groups().tensor
    logits, grad_loss = _ce_data()
    _ce_check(logits, grad_loss, tp)
    # the maximum logit of a row may sit on either rank
    boosted = logits.clone()
    boosted[0, :, 2] += 50.0  # row 0: maximum on rank 0's shard
    boosted[1, :, 13] += 50.0  # row 1: maximum on rank 1's shard
    _ce_check(boosted, grad_loss, tp)
    # padded vocabulary columns masked to -inf, up to a whole shard: no NaN, zero grad there
    low_targets = CE_TARGETS % 8
    for first_pad in (12, 8):
        padded = logits.clone()
        padded[..., first_pad:] = float("-inf")
        _ce_check(padded, grad_loss, tp, low_targets)


def test_vocab_parallel_cross_entropy_tp2():
    run_distributed(_ce_tp2, 2)


# ----------------------------------------------------------------------------------------------------------------------
# Autograd collectives


def test_mappings_are_identity_for_a_single_rank_group():
    x = torch.randn(3, 4)
    one = GroupInfo.trivial()
    for fn in (copy_to_tensor_region, reduce_from_tensor_region, scatter_to_tensor_region, gather_from_tensor_region):
        assert fn(x, one) is x
    with pytest.raises(ValueError, match="last dimension 3 is not divisible by the tensor-parallel size 2"):
        scatter_to_tensor_region(torch.ones(2, 3), GroupInfo(group=None, rank=0, size=2, ranks=(0, 1)))


def _mappings(rank: int, world_size: int) -> None:
    tp = tp_groups().tensor
    g = generator(3)
    base = torch.randn(2, 6, generator=g)  # identical on both ranks
    mine = base + 10 * rank  # different on each rank
    upstream = [torch.randn(2, 6, generator=g) for _ in range(2)]  # per-rank incoming grads, known to both
    halves = [torch.randn(2, 3, generator=g) for _ in range(2)]

    # copy: fwd identity / bwd all-reduce
    x = base.clone().requires_grad_(True)
    y = copy_to_tensor_region(x, tp)
    close(y.detach(), base)
    y.backward(upstream[rank])
    close(x.grad, upstream[0] + upstream[1])

    # reduce: fwd all-reduce / bwd identity
    x = mine.clone().requires_grad_(True)
    y = reduce_from_tensor_region(x, tp)
    close(y.detach(), 2 * base + 10)
    assert torch.equal(x.detach(), mine)  # the input is not reduced in place
    y.backward(upstream[rank])
    close(x.grad, upstream[rank])

    # scatter: fwd this rank's slice of the last dim / bwd all-gather
    x = base.clone().requires_grad_(True)
    y = scatter_to_tensor_region(x, tp)
    close(y.detach(), base[:, 3 * rank:3 * rank + 3])
    y.backward(halves[rank])
    close(x.grad, torch.cat(halves, dim=-1))

    # gather: fwd all-gather along the last dim / bwd this rank's slice
    x = halves[rank].clone().requires_grad_(True)
    y = gather_from_tensor_region(x, tp)
    close(y.detach(), torch.cat(halves, dim=-1))
    y.backward(upstream[0])  # a replicated downstream: same grad on both ranks
    close(x.grad, upstream[0][:, 3 * rank:3 * rank + 3])

    # scatter then gather is the identity, forward and backward
    x = base.clone().requires_grad_(True)
    y = gather_from_tensor_region(scatter_to_tensor_region(x, tp), tp)
    close(y.detach(), base)
    y.backward(upstream[0])
    close(x.grad, upstream[0])


def test_mappings_forward_and_backward_tp2():
    run_distributed(_mappings, 2)


# ----------------------------------------------------------------------------------------------------------------------
# RNG streams

MASK_N = 4096


def _mask() -> torch.Tensor:
    return F.dropout(torch.ones(MASK_N), p=0.5, training=True) != 0


def _rng(rank: int, world_size: int, seed: int) -> dict:
    groups = tp_groups()
    tracker = RNGStatesTracker.for_model(seed, tensor_rank=groups.tensor.rank)
    before = torch.get_rng_state()
    with tracker.fork():
        tp_mask = _mask()
    assert torch.equal(torch.get_rng_state(), before)  # fork put the default stream back untouched
    default_mask = _mask()
    torch.manual_seed(seed)
    assert torch.equal(default_mask, _mask())  # as if fork had never drawn anything
    with tracker.fork():
        tp_mask_next = _mask()
    assert not torch.equal(tp_mask, tp_mask_next)  # the stream's own state advanced and was kept
    return {"tp": tp_mask, "default": default_mask, "tensor_rank": groups.tensor.rank, "data_rank": groups.data.rank}


def test_rng_streams_across_tensor_and_data_parallel_ranks():
    out = run_distributed(_rng, 4, SEED)  # tp=2, dp=2: ranks (0, 1) and (2, 3) are TP pairs; (0, 2), (1, 3) DP pairs
    assert [(o["tensor_rank"], o["data_rank"]) for o in out] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    assert not torch.equal(out[0]["tp"], out[1]["tp"])  # TP ranks drop different elements in split regions
    assert not torch.equal(out[2]["tp"], out[3]["tp"])
    assert torch.equal(out[0]["tp"], out[2]["tp"]) and torch.equal(out[1]["tp"], out[3]["tp"])  # DP peers match
    for o in out[1:]:  # replicated regions: every rank draws the same mask
        assert torch.equal(o["default"], out[0]["default"])


def test_rng_tracker_state_dict_round_trip_and_errors():
    with torch.random.fork_rng():
        tracker = RNGStatesTracker.for_model(SEED, tensor_rank=0)
        saved = tracker.state_dict()
        with tracker.fork():
            first = _mask()
        with tracker.fork():
            _mask()  # advance further, then rewind
        tracker.load_state_dict(saved)
        with tracker.fork():
            assert torch.equal(_mask(), first)
        fresh = RNGStatesTracker()
        fresh.load_state_dict(saved)
        with fresh.fork():
            assert torch.equal(_mask(), first)
        with tracker.fork():  # state_dict returned a copy: drawing since has not changed `saved`
            _mask()
        fresh.load_state_dict(saved)
        with fresh.fork():
            assert torch.equal(_mask(), first)

        other_stage = RNGStatesTracker.for_model(SEED, tensor_rank=0, pipeline_rank=1)
        with other_stage.fork():
            assert not torch.equal(_mask(), first)  # pipeline stages get their own seeds

        with pytest.raises(ValueError, match="already exists"):
            tracker.add("tensor-parallel", 1)
        with pytest.raises(KeyError, match="never added"):
            with tracker.fork("nope"):
                pass
