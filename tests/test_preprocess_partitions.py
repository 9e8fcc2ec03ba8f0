"""Multi-node preprocessing: N partitions of the inputs, merged, are byte for byte the single-node dataset (the
SLURM job-array example runs under a real sbatch in test_doc_commands.py)."""

from __future__ import annotations

import pytest

from megatron_narrow.data.merge import merge_partitions
from megatron_narrow.data.preprocess import partition_inputs
from megatron_narrow.data.shards import DataError, IndexedDocuments

from .conftest import write_jsonl
from .test_preprocess import run_preprocess, tree_bytes

SETTINGS = {"split_sentences": True, "shard_size_bytes": 16 << 10, "work_chunk_bytes": 4 << 10}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, stdlib_documents) -> list:
    """Four JSONL files of real text, of different sizes."""
    root = tmp_path_factory.mktemp("partition_inputs")
    bounds = [0, 150, 500, 600, 1000]
    return [write_jsonl(root / f"part{i}.jsonl", stdlib_documents[lo:hi])
            for i, (lo, hi) in enumerate(zip(bounds, bounds[1:], strict=False))]


@pytest.fixture(scope="module")
def single_node(inputs, minilm_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "corpus"
    run_preprocess(inputs, out, minilm_dir / "vocab.txt", workers=2, **SETTINGS)
    return out


def test_partitions_are_whole_files_covering_the_inputs_once(inputs):
    for count in (1, 2, 3, 4, 7):
        parts = [partition_inputs([str(p) for p in inputs], i, count) for i in range(count)]
        assert [p for part in parts for p in part] == [str(p) for p in inputs], count


def test_two_partitions_merged_equal_the_single_node_run(inputs, minilm_dir, single_node, tmp_path):
    parts = []
    for index in range(2):
        part = tmp_path / f"part{index}"
        manifest = run_preprocess(inputs, part, minilm_dir / "vocab.txt", workers=1, partition=(index, 2), **SETTINGS)
        assert manifest["partition"]["index"] == index and manifest["totals"]["documents"] > 0
        parts.append(part)
    merged = merge_partitions(parts[::-1], tmp_path / "merged")  # any order
    assert merged["totals"]["shards"] >= 4
    assert tree_bytes(tmp_path / "merged") == tree_bytes(single_node)
    assert merge_partitions(parts, tmp_path / "merged") == merged  # again: nothing to do
    assert len(IndexedDocuments(tmp_path / "merged", verify_checksums=True)) == 1000

    with pytest.raises(DataError, match=r"missing \[1\]"):
        merge_partitions(parts[:1], tmp_path / "incomplete")
    with pytest.raises(DataError, match="not a partition"):
        merge_partitions([single_node, parts[1]], tmp_path / "mixed")

