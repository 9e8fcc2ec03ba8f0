"""Corpora as they ship: compressed JSONL, Parquet, `datasets` directories and .arrow files give the shards
plain JSONL gives; SIGKILL resume on Parquet; one-line errors for broken inputs."""

from __future__ import annotations

import bz2
import lzma
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_narrow.data.shards import DataError

from .conftest import REPO, write_jsonl
from .test_preprocess import run_preprocess, sigkill_after_shards, tree_bytes

DOCUMENTS = 900
SMALL_SHARDS = {"shard_size_bytes": 16 << 10, "work_chunk_bytes": 4 << 10}


@pytest.fixture(scope="module")
def forms(tmp_path_factory, stdlib_documents) -> dict[str, Path]:
    """One corpus in every input form; the columnar ones carry extra columns (an int id, a url)."""
    root = tmp_path_factory.mktemp("forms")
    texts = stdlib_documents[:DOCUMENTS]
    jsonl = write_jsonl(root / "docs.jsonl", texts)
    zst = root / "docs.jsonl.zst"
    with pa.CompressedOutputStream(str(zst), "zstd") as out:
        out.write(jsonl.read_bytes())
    (root / "docs.jsonl.xz").write_bytes(lzma.compress(jsonl.read_bytes()))
    (root / "docs.jsonl.bz2").write_bytes(bz2.compress(jsonl.read_bytes()))
    table = pa.table({"id": list(range(DOCUMENTS)), "text": texts, "url": [f"https://x/{i}" for i in range(DOCUMENTS)]})
    pq.write_table(table, root / "docs.parquet", row_group_size=128)  # 8 row groups
    import datasets

    datasets.Dataset(table).save_to_disk(str(root / "docs_dataset"))
    arrow_file = next((root / "docs_dataset").glob("*.arrow"))
    return {"jsonl": jsonl, "zst": zst, "xz": root / "docs.jsonl.xz", "bz2": root / "docs.jsonl.bz2",
            "parquet": root / "docs.parquet", "datasets": root / "docs_dataset", "arrow": arrow_file}


def _without_inputs(manifest: dict) -> dict:
    """The manifest less what names the inputs (their names and sizes, and the fingerprint made from them)."""
    return {key: value for key, value in manifest.items() if key not in ("inputs", "fingerprint")}


def test_every_form_gives_the_shards_of_plain_jsonl(tmp_path, forms, minilm_dir):
    vocab = minilm_dir / "vocab.txt"
    outputs = {name: run_preprocess([path], tmp_path / name, vocab, workers=2, **SMALL_SHARDS)
               for name, path in forms.items()}
    reference = tree_bytes(tmp_path / "jsonl")
    shards = [name for name in reference if name.endswith(".arrow")]
    assert len(shards) >= 4 and outputs["jsonl"]["totals"]["documents"] == DOCUMENTS
    for name in forms:
        produced = tree_bytes(tmp_path / name)
        assert sorted(produced) == sorted(reference), name
        assert all(produced[shard] == reference[shard] for shard in shards), f"{name}: shard bytes differ"
        assert _without_inputs(outputs[name]) == _without_inputs(outputs["jsonl"]), name


def test_parquet_input_resumes_after_sigkill_byte_identical(tmp_path, forms, minilm_dir):
    vocab = minilm_dir / "vocab.txt"
    reference = tmp_path / "reference"
    run_preprocess([forms["parquet"]], reference, vocab, workers=2, shard_size_bytes=4 << 10,
                   work_chunk_bytes=2 << 10)
    out = tmp_path / "killed"
    command = [sys.executable, str(REPO / "tools/preprocess_data.py"), "--input", str(forms["parquet"]),
               "--output-dir", str(out), "--tokenizer-type", "wordpiece", "--tokenizer-model", str(vocab),
               "--workers", "2", "--shard-size-mb", str(4 / 1024), "--work-chunk-mb", str(2 / 1024), "--quiet"]
    progress = sigkill_after_shards(command, out, 5)
    finished = {record.name.removesuffix(".json") for record in progress.glob("*.json")}
    subprocess.run(command, check=True)
    assert tree_bytes(out) == tree_bytes(reference) and len(finished) >= 5


def test_broken_columnar_and_compressed_inputs_are_one_line_errors(tmp_path, forms, minilm_dir):
    vocab = minilm_dir / "vocab.txt"
    cases = {}
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"PAR1 this is not a parquet file" * 10)
    cases[garbage] = "is not a readable Parquet file"
    truncated = tmp_path / "truncated.parquet"
    truncated.write_bytes(forms["parquet"].read_bytes()[: forms["parquet"].stat().st_size // 2])
    cases[truncated] = "is not a readable Parquet file"
    zst = tmp_path / "truncated.jsonl.zst"
    zst.write_bytes(forms["zst"].read_bytes()[:5000])
    cases[zst] = "is a truncated or corrupt zstd file"
    xz = tmp_path / "truncated.jsonl.xz"
    xz.write_bytes(forms["xz"].read_bytes()[:5000])
    cases[xz] = "is a truncated or corrupt xz file"
    for path, message in cases.items():
        with pytest.raises(DataError, match=message) as caught:
            run_preprocess([path], tmp_path / f"out_{path.name}", vocab)
        assert str(path) in str(caught.value) and "\n" not in str(caught.value)
        assert not (tmp_path / f"out_{path.name}" / "index.json").exists()

    for form in ("parquet", "datasets"):
        with pytest.raises(DataError, match=r"has no column 'body' \(--json-keys\); its columns are id, text, url"):
            run_preprocess([forms[form]], tmp_path / f"missing_{form}", vocab, json_keys=["body"])
    import datasets

    split_dirs = tmp_path / "dataset_dict"
    datasets.DatasetDict({"train": datasets.load_from_disk(str(forms["datasets"]))}).save_to_disk(str(split_dirs))
    with pytest.raises(DataError, match="holds the splits train .a DatasetDict.; give one split's directory"):
        run_preprocess([split_dirs], tmp_path / "dict_out", vocab)
    plain_dir = tmp_path / "plain_dir"
    plain_dir.mkdir()
    with pytest.raises(ValueError, match="is a directory; give the files in it .* written by datasets' save_to_disk"):
        run_preprocess([plain_dir], tmp_path / "plain_out", vocab)


def test_null_and_non_string_column_values_are_rejected_as_in_jsonl(tmp_path, minilm_dir):
    table = pa.table({"text": ["A first document.", None, "A third one."], "n": [1, 2, 3],
                      "raw": [b"bytes", b"are", b"no text"]})
    pq.write_table(table, tmp_path / "nulls.parquet")
    manifest = run_preprocess([tmp_path / "nulls.parquet"], tmp_path / "a", minilm_dir / "vocab.txt")
    assert manifest["totals"]["documents"] == 2 and manifest["rejected"]["not_a_string"] == 1
    for key in ("n", "raw"):
        with pytest.raises(DataError, match=r"no valid documents in .*nulls.parquet "
                                            r"\(rejected records: not_a_string 3\)"):
            run_preprocess([tmp_path / "nulls.parquet"], tmp_path / f"b_{key}", minilm_dir / "vocab.txt",
                           json_keys=["text", key])


def test_partitions_of_parquet_and_datasets_inputs_merge_into_the_single_node_dataset(tmp_path, forms, minilm_dir):
    """--partition I/N splits columnar inputs by their on-disk size as it splits files (a `datasets` directory
    counts the bytes of its files); the merged parts are the single-node dataset, byte for byte."""
    from megatron_narrow.data.merge import merge_partitions

    inputs = [forms["parquet"], forms["datasets"], forms["zst"]]
    vocab = minilm_dir / "vocab.txt"
    run_preprocess(inputs, tmp_path / "single", vocab, **SMALL_SHARDS)
    parts = [tmp_path / f"part{index}" for index in range(2)]
    for index, part in enumerate(parts):
        run_preprocess(inputs, part, vocab, partition=(index, 2), **SMALL_SHARDS)
    merge_partitions(parts, tmp_path / "merged")
    assert tree_bytes(tmp_path / "merged") == tree_bytes(tmp_path / "single")
    assert tree_bytes(parts[0]) != tree_bytes(parts[1])
