"""The sample index cache: a cached index gives the samples of a freshly built one (every packing mode, two
epochs); two ranks starting together build it once and read the same bytes; a damaged entry is rebuilt;
every field the index depends on changes the key."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from megatron_narrow.config import DataConfig
from megatron_narrow.data.samples import BertSampleDataset, split_documents

SEQ, M = 64, 10


@pytest.fixture(scope="module")
def documents(tiny_corpus_data):
    from megatron_narrow.data.shards import IndexedDocuments

    return IndexedDocuments(tiny_corpus_data["data"])


def make(documents, cache_dir, *, split: str = "949,50,1", name: str = "train", **settings) -> BertSampleDataset:
    train, _, _ = split_documents(len(documents), split)
    config = DataConfig(**{"seq_len": SEQ, "max_predictions": M, **settings})
    return BertSampleDataset(documents, train, config, name=name, cache_dir=cache_dir)


def same_samples(a: BertSampleDataset, b: BertSampleDataset, indices) -> bool:
    for i in indices:
        x, y = a[i], b[i]
        if x.keys() != y.keys() or not all(np.array_equal(x[k], y[k]) for k in x):
            return False
    return True


@pytest.mark.parametrize("packing", ["none", "concat", "segments"])
def test_cached_index_gives_the_samples_of_a_fresh_one(documents, tmp_path, packing):
    fresh = make(documents, None, packing=packing)
    built = make(documents, tmp_path, packing=packing)
    assert fresh.cache_entry is None and built.cache_entry is not None
    opened = make(documents, tmp_path, packing=packing)
    assert opened.cache_entry == built.cache_entry
    assert isinstance(opened._sample_local_doc, np.memmap)
    n = len(fresh)
    assert len(built) == len(opened) == n
    indices = [0, 1, n // 2, n - 1, n, 2 * n - 1]  # epochs 0 and 1
    assert same_samples(fresh, built, indices) and same_samples(fresh, opened, indices)
    assert (built.cache_entry / "epoch_1.npy").is_file()


def _start(rank: int, world_size: int, data_dir: str, cache_dir: str) -> dict:
    """One rank of a run: build_datasets_in_turn over a real barrier; which ranks built an index."""
    import torch.distributed as dist

    from megatron_narrow.config import ModelConfig, TrainConfig
    from megatron_narrow.training import data as training_data

    built = []
    original = BertSampleDataset._index_arrays

    def counting(self):
        built.append(self.name)
        return original(self)

    BertSampleDataset._index_arrays = counting
    config = DataConfig(data_paths=[data_dir], seq_len=SEQ, max_predictions=M, packing="segments",
                        index_cache_dir=cache_dir)
    out = training_data.build_datasets_in_turn(config, ModelConfig(vocab_size=1000), TrainConfig(), 64,
                                               rank=rank, local_rank=rank, barrier=dist.barrier)
    samples = [out.train[i] for i in (0, 5, 9)]
    return {"built": built, "entry": str(out.train.cache_entry),
            "samples": [{k: v.tolist() for k, v in s.items()} for s in samples]}


def test_two_ranks_build_once_and_read_the_same_bytes(tiny_corpus_data, tmp_path):
    from .distributed import run_distributed

    ranks = run_distributed(_start, 2, str(tiny_corpus_data["data"]), str(tmp_path / "cache"))
    assert sorted(ranks[0]["built"]) == ["train0", "valid0"] and ranks[1]["built"] == [], ranks
    assert ranks[0]["entry"] == ranks[1]["entry"] and ranks[0]["samples"] == ranks[1]["samples"]
    names = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len([n for n in names if n.startswith("train0-")]) == 1 and not [n for n in names if n.endswith(".tmp")]
    assert [n for n in names if n.startswith("ids_checked-")], "the token-id check is recorded once"


def test_damaged_entry_is_moved_aside_and_rebuilt(documents, tmp_path, capsys):
    from megatron_narrow.data.index_cache import load_or_build

    first = make(documents, tmp_path)
    entry = first.cache_entry
    victim = entry / "piece_start.npy"
    victim.write_bytes(victim.read_bytes()[:-8])  # a full disk cut it short
    said = []
    arrays = load_or_build(entry, make(documents, None)._index_arrays, said.append)
    assert len(said) == 1 and "damaged" in said[0] and entry.name in said[0]
    assert np.array_equal(arrays["piece_start"], make(documents, None)._piece_start)
    assert any(p.name.startswith(f".{entry.name}.damaged.") for p in tmp_path.iterdir())
    assert same_samples(make(documents, tmp_path), make(documents, None), [0, 3, 11])

    # an entry without its complete.json (never renamed into place by a killed writer cannot exist, but a
    # hand-copied one can): rebuilt too
    (entry / "complete.json").unlink()
    rebuilt = make(documents, tmp_path)
    assert json.loads((rebuilt.cache_entry / "complete.json").read_text())["files"]


@pytest.mark.parametrize(("field", "change"), [
    ("seq_len", {"seq_len": 48}), ("packing", {"packing": "concat"}), ("max_segments", {"max_segments": 2}),
    ("pair_task", {"pair_task": "sop", "packing": "none"}), ("seed", {"seed": 7}), ("split", {"split": "90,10,0"}),
    ("name", {"name": "other"}),
])
def test_every_field_of_the_index_changes_the_key(documents, tmp_path, field, change):
    base = {"packing": "segments"}
    a = make(documents, tmp_path, **base)
    b = make(documents, tmp_path, **{**base, **change})
    assert a.cache_entry != b.cache_entry, field
    assert b.cache_entry.is_dir()


def test_a_changed_dataset_changes_the_key(tiny_corpus_data, documents, tmp_path):
    """Another manifest (here the same shards with one more rejected record counted) is another dataset."""
    from megatron_narrow.data.shards import IndexedDocuments

    copy = tmp_path / "data"
    shutil.copytree(tiny_corpus_data["data"], copy, ignore=shutil.ignore_patterns("index_cache"))
    manifest = json.loads((copy / "index.json").read_text())
    manifest.setdefault("rejected", {})["empty"] = manifest.get("rejected", {}).get("empty", 0) + 1
    (copy / "index.json").write_text(json.dumps(manifest))
    a = make(documents, tmp_path / "cache")
    b = make(IndexedDocuments(copy), tmp_path / "cache")
    assert a.cache_entry != b.cache_entry
    assert Path(b.cache_entry).is_dir()


def test_build_index_tool_builds_what_a_run_opens(tiny_corpus_data, tmp_path, monkeypatch, capsys):
    from megatron_narrow.config import load_run_config
    from megatron_narrow.training.data import build_datasets

    from .conftest import REPO, tiny_train_overrides
    from .runs import run_tool

    overrides = tiny_train_overrides(tiny_corpus_data, tmp_path / "run", **{
        "data.packing": "segments", "data.index_cache_dir": str(tmp_path / "cache")})
    config = str(REPO / "examples/configs/tiny_cpu.yaml")
    assert run_tool("build_index", ["--config", config, *overrides]) == 0
    out = capsys.readouterr().out
    assert "train:" in out and "segments packing" in out and str(tmp_path / "cache") in out

    built = []
    monkeypatch.setattr(BertSampleDataset, "_index_arrays", lambda self: built.append(self.name) or {})
    run = load_run_config(config, overrides)
    data = build_datasets(run.data, run.model, run.train, 10)
    assert built == [], "a run after build_index must open the cache, not build"
    assert data.train.cache_entry.parent == tmp_path / "cache" and len(data.train) > 0
    assert run_tool("build_index", ["--config", config, *overrides, "data.max_predictions=9"]) == 2
    assert "too small for data.packing=segments" in capsys.readouterr().err


def test_sentence_lengths_of_many_documents_across_shards(tmp_path, stdlib_documents, tiny_corpus_data):
    """The vectorised read of sentence lengths (what the index build uses) equals asking document by document,
    across shard boundaries and in any order."""
    from megatron_narrow.data.preprocess import PreprocessConfig, preprocess
    from megatron_narrow.data.shards import IndexedDocuments

    from .conftest import write_jsonl

    corpus = write_jsonl(tmp_path / "docs.jsonl", stdlib_documents[:400])
    preprocess(PreprocessConfig(inputs=[str(corpus)], output_dir=str(tmp_path / "data"),
                                tokenizer_type="sentencepiece", tokenizer_model=str(tiny_corpus_data["tokenizer"]),
                                workers=1, split_sentences=True, shard_size_bytes=16 << 10, progress=False))
    documents = IndexedDocuments(tmp_path / "data")
    assert len(documents.manifest["shards"]) >= 4
    rng = np.random.default_rng(0)
    for indices in (np.arange(len(documents)), np.arange(37, 311), rng.permutation(len(documents))[:50],
                    np.zeros(0, dtype=np.int64)):
        lengths, counts = documents.sentence_lengths_of(indices)
        expected = [documents.sentence_lengths(int(i)) for i in indices]
        assert counts.tolist() == [len(x) for x in expected]
        assert lengths.tolist() == [int(v) for x in expected for v in x]


def test_blending_index_is_cached_and_equal(documents, tmp_path):
    from megatron_narrow.data.blending import BlendedDataset

    parts = [make(documents, tmp_path, name="a"), make(documents, tmp_path, name="b", packing="concat")]
    fresh = BlendedDataset(parts, [0.3, 0.7], 5000)
    cached = BlendedDataset(parts, [0.3, 0.7], 5000, cache_dir=tmp_path)
    again = BlendedDataset(parts, [0.3, 0.7], 5000, cache_dir=tmp_path)
    assert fresh.cache_entry is None and cached.cache_entry == again.cache_entry is not None
    assert isinstance(again.dataset_index, np.memmap)
    for blend in (cached, again):
        assert np.array_equal(blend.dataset_index, fresh.dataset_index)
        assert np.array_equal(blend.sample_index, fresh.sample_index)
    assert BlendedDataset(parts, [0.5, 0.5], 5000, cache_dir=tmp_path).cache_entry != cached.cache_entry
