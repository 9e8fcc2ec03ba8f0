"""data.packing: rows of several samples.

- segments: a packed batch gives the per-target MLM losses and parameter gradients of the same segments run
  unpacked, one per row (fp32, dropout 0, 1e-5), for bert, narrow and token_drop; with token dropping at
  keep < 1 the kept set is chosen per packed row and the reference keeps the same tokens of each segment.
- the packed index is deterministic (restarts, DataLoader workers) and holds every sample of the split
  exactly once per epoch, on real text; concat rows are [CLS] A [SEP] B [SEP] ... with full attention.
- bad packing configs are refused in one line.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_narrow.config import DataConfig, ModelConfig
from megatron_narrow.data.packing import max_packed_targets, pack_samples
from megatron_narrow.data.samples import BertSampleDataset, split_documents
from megatron_narrow.model import BertForPreTraining

SEQ, M = 64, 10


@pytest.fixture(scope="module")
def documents(tiny_corpus_data):
    from megatron_narrow.data.shards import IndexedDocuments

    return IndexedDocuments(tiny_corpus_data["data"])


def dataset(documents, packing: str, seq_len: int = SEQ, max_predictions: int = M, **extra) -> BertSampleDataset:
    train, _, _ = split_documents(len(documents), "949,50,1")
    return BertSampleDataset(documents, train, DataConfig(seq_len=seq_len, max_predictions=max_predictions,
                                                          packing=packing, **extra))


def batch_of(samples: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    return {key: torch.from_numpy(np.stack([s[key] for s in samples])) for key in samples[0]}


def unpack_rows(batch: dict[str, torch.Tensor], pad_id: int) -> dict[str, torch.Tensor]:
    """Every segment of a packed batch as its own padded row with its own targets: the independent
    reference (plain tensor slicing, none of the code under test)."""
    rows = []
    for b in range(batch["input_ids"].shape[0]):
        segments = batch["segment_ids"][b]
        valid = batch["target_valid"][b]
        positions, ids = batch["target_positions"][b][valid], batch["target_ids"][b][valid]
        for number in range(1, int(segments.max()) + 1):
            span = torch.nonzero(segments == number).flatten()
            start, length = int(span[0]), span.numel()
            row = {"input_ids": torch.full((SEQ,), pad_id), "attention_mask": torch.zeros(SEQ, dtype=torch.long),
                   "token_type_ids": torch.zeros(SEQ, dtype=torch.long),
                   "target_positions": torch.zeros(M, dtype=torch.long),
                   "target_ids": torch.full((M,), pad_id), "target_valid": torch.zeros(M, dtype=torch.bool)}
            row["input_ids"][:length] = batch["input_ids"][b, start:start + length]
            row["attention_mask"][:length] = 1
            mine = (positions >= start) & (positions < start + length)
            count = int(mine.sum())
            row["target_positions"][:count] = positions[mine] - start
            row["target_ids"][:count] = ids[mine]
            row["target_valid"][:count] = True
            rows.append(row)
    return {key: torch.stack([r[key] for r in rows]) for key in rows[0]}


def model_config(variant: str, keep: float = 1.0) -> ModelConfig:
    return ModelConfig(variant=variant, vocab_size=1000, hidden_size=64, num_layers=4, num_heads=4,
                       max_position_embeddings=SEQ, full_length_layers=2, hidden_dropout=0.0, attention_dropout=0.0,
                       token_drop_keep_ratio=keep)


def losses_and_grads(model: BertForPreTraining, batch: dict[str, torch.Tensor], num_targets: torch.Tensor):
    model.zero_grad()
    out = model(**batch, num_targets=num_targets)
    out.loss.backward()
    return (out.target_losses[batch["target_valid"]],
            {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})


@pytest.mark.parametrize(("variant", "keep"), [("bert", 1.0), ("narrow", 1.0), ("token_drop", 1.0),
                                               ("token_drop", 0.5)])
def test_packed_segments_equal_the_segments_run_one_per_row(documents, variant, keep):
    ds = dataset(documents, "segments")
    rows = [ds[i] for i in range(6)]
    packed = batch_of(rows)
    assert int(packed["segment_ids"].max()) >= 2, "the batch must hold rows of several segments"
    unpacked = unpack_rows(packed, ds.special.pad)
    assert unpacked["input_ids"].shape[0] > packed["input_ids"].shape[0]
    num_targets = packed["target_valid"].sum().float()
    assert int(unpacked["target_valid"].sum()) == int(num_targets)

    special = ds.special.as_dict()
    model = BertForPreTraining(model_config(variant, keep), special_ids=special)
    reference = BertForPreTraining(model_config(variant, keep), special_ids=special)
    reference.load_state_dict(model.state_dict())
    if variant == "token_drop" and keep < 1:  # the reference keeps, in each segment's row, what the packed row kept
        importance = model.bert.token_importance
        with torch.no_grad():  # importance that differs per id, so that the choice is not a tie
            importance.importance.copy_(torch.rand(importance.importance.shape, generator=torch.Generator()
                                                   .manual_seed(0)) * 5)
        reference.bert.token_importance.importance.copy_(importance.importance)
        chosen = {}
        original_select = importance.select

        def recording_select(*args):
            chosen["kept"], chosen["mask"] = original_select(*args)
            return chosen["kept"], chosen["mask"]

        importance.select = recording_select
        got, got_grads = losses_and_grads(model, packed, num_targets)
        k = chosen["kept"].shape[1]
        assert (chosen["mask"].sum(1) < packed["attention_mask"].sum(1)).any(), "some real tokens must be dropped"
        kept_rows = []
        for b in range(packed["input_ids"].shape[0]):
            segments = packed["segment_ids"][b]
            kept = chosen["kept"][b]
            for number in range(1, int(segments.max()) + 1):
                span = torch.nonzero(segments == number).flatten()
                mine = kept[segments[kept] == number] - int(span[0])
                padding = torch.arange(span.numel(), SEQ)[: k - mine.numel()]
                kept_rows.append(torch.cat([mine, padding]))
        forced = torch.stack(kept_rows)
        reference.bert.token_importance.select = lambda input_ids, mask, *rest: (
            forced, torch.gather(mask.bool(), 1, forced))
    else:
        got, got_grads = losses_and_grads(model, packed, num_targets)
    expected, expected_grads = losses_and_grads(reference, unpacked, num_targets)

    assert got.shape == expected.shape and got.numel() == int(num_targets)
    worst = (got - expected).abs().max().item()
    print(f"{variant} keep {keep}: largest per-target loss difference {worst:.1e}")
    assert worst <= 1e-5
    assert got_grads.keys() == expected_grads.keys()
    for name, grad in got_grads.items():
        diff = (grad - expected_grads[name]).abs().max().item()
        assert diff <= 1e-5, f"{variant}: gradient of {name} differs by {diff}"


@pytest.mark.parametrize("packing", ["concat", "segments"])
def test_packed_index_holds_every_sample_once_and_is_deterministic(documents, packing):
    plain = dataset(documents, "none")
    packed = dataset(documents, packing)
    n = plain.num_unpacked_samples
    assert packed.num_unpacked_samples == n and len(packed) < n
    members = np.concatenate([packed.row_members(r) for r in range(len(packed))])
    assert np.array_equal(np.sort(members), np.arange(n)), "every sample of the split in exactly one row"

    # the rows' real tokens, unmasked, are the split's samples' tokens, each once
    start, end = plain.sample_token_ranges
    expected = sorted(tuple(documents.tokens(int(d))[s:e].tolist())
                      for d, s, e in zip(plain.sample_documents, start, end, strict=True))
    boundaries = {plain.special.cls, plain.special.sep}  # documents may hold [UNK], never these
    got = []
    for row in range(len(packed)):
        sample = packed[row]  # epoch 0 covers every row once
        ids = sample["input_ids"].copy()
        valid = sample["target_valid"]
        ids[sample["target_positions"][valid]] = sample["target_ids"][valid]
        real = ids[sample["attention_mask"].astype(bool)]
        pieces, current = [], []
        for token in real.tolist():
            if token in boundaries:
                if current:
                    pieces.append(tuple(current))
                current = []
            else:
                current.append(token)
        got.extend(pieces)
    assert sorted(got) == expected

    again = dataset(documents, packing)  # a restart
    for i in (0, 7, len(packed) + 3):  # epoch 1 too
        a, b = packed[i], again[i]
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    fill = np.mean([packed[i]["attention_mask"].mean() for i in range(len(packed))])
    assert fill > 0.9, f"packed rows are only {fill:.2f} real tokens"


def test_packed_rows_are_the_same_through_dataloader_workers(documents):
    from megatron_narrow.training.data import make_loader

    ds = dataset(documents, "segments")
    batches = []
    for workers in (0, 2):
        loader = iter(make_loader(ds, consumed_samples=8, micro_batch_size=4, dp_rank=1, dp_size=2,
                                  num_workers=workers))
        batches.append([next(loader) for _ in range(3)])
    for a, b in zip(*batches, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert "segment_ids" in a and "position_ids" in a


def test_concat_rows_are_samples_separated_by_sep_with_full_attention(documents):
    ds = dataset(documents, "concat")
    row = next(i for i in range(len(ds)) if ds.row_members(int(ds.epoch_permutation(0)[i])).size >= 2)
    sample = ds[row]
    assert set(sample) == {"input_ids", "attention_mask", "token_type_ids", "target_positions", "target_ids",
                           "target_valid"}
    ids = sample["input_ids"].copy()
    valid = sample["target_valid"]
    ids[sample["target_positions"][valid]] = sample["target_ids"][valid]
    members = ds.row_members(int(ds.epoch_permutation(0)[row]))
    start, end = ds.sample_token_ranges
    expected = [ds.special.cls]
    for m in members:
        expected += [*documents.tokens(int(ds.sample_documents[m]))[start[m]:end[m]].tolist(), ds.special.sep]
    assert ids[: len(expected)].tolist() == expected
    assert sample["attention_mask"].sum() == len(expected) and (ids[len(expected):] == ds.special.pad).all()


def test_pack_samples_fills_rows_and_respects_max_segments():
    rng = np.random.default_rng(0)
    costs = np.clip(rng.lognormal(4, 1, 20_000).astype(np.int64) + 2, 3, 512)
    members, starts = pack_samples(costs, 512, np.random.default_rng(1))
    sums = np.add.reduceat(costs[members], starts[:-1])
    assert sums.max() <= 512 and np.array_equal(np.sort(members), np.arange(costs.size))
    assert costs.sum() / (512 * (starts.size - 1)) > 0.99
    members, starts = pack_samples(costs, 512, np.random.default_rng(1), max_segments=3)
    assert np.diff(starts).max() <= 3 and np.array_equal(np.sort(members), np.arange(costs.size))


def test_max_packed_targets_is_the_worst_row():
    """Brute force over every split of a small row into segments against the dynamic programme."""
    import itertools

    def targets(length: int) -> int:
        return int(np.floor(0.15 * length + 0.5))

    for seq_len in (12, 16, 20):
        best = 0
        for count in range(1, seq_len // 3 + 1):
            for lengths in itertools.combinations_with_replacement(range(1, seq_len - 1), count):
                if sum(lengths) + 2 * count <= seq_len:
                    best = max(best, sum(targets(x) for x in lengths))
        assert max_packed_targets(seq_len, 0.15) == best, seq_len
    assert max_packed_targets(512, 0.15) == 85 and max_packed_targets(64, 0.15) == 10


@pytest.mark.parametrize("packing", ["none", "concat", "segments"])
def test_real_token_fraction_is_what_the_rows_hold(documents, packing):
    ds = dataset(documents, packing)
    held = sum(int(ds[i]["attention_mask"].sum()) for i in range(len(ds))) / (len(ds) * SEQ)
    assert ds.real_token_fraction() == pytest.approx(held, abs=1e-12)


def test_data_stats_tool_prints_each_mode(tiny_corpus_data, documents, capsys):
    from .runs import run_tool

    assert run_tool("data_stats", [str(tiny_corpus_data["data"]), "--seq-len", str(SEQ)]) == 0
    out = capsys.readouterr().out
    assert f"{len(documents):,} documents" in out and "p50" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()[:1] in (["none"], ["concat"],
                                                                                              ["segments"])}
    for packing in ("none", "concat", "segments"):
        ds = dataset(documents, packing)
        assert rows[packing][1] == f"{len(ds):,}" and rows[packing][2] == f"{ds.real_token_fraction():.1%}"
    assert run_tool("data_stats", [str(tiny_corpus_data["root"] / "nowhere")]) == 1
    assert capsys.readouterr().err.startswith("error:")
