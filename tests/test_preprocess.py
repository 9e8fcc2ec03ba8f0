"""Preprocessing guarantees: determinism, SIGKILL resume, bad input accounting, corruption detection."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from megatron_narrow.data.preprocess import REJECT_KINDS, PreprocessConfig, preprocess
from megatron_narrow.data.shards import DataError, IndexedDocuments
from megatron_narrow.data.tokenizer import load_tokenizer

from .conftest import REPO, write_jsonl
from .runs import run_tool


def run_preprocess(inputs, out, vocab, **overrides) -> dict:
    settings = dict(inputs=[str(p) for p in inputs], output_dir=str(out), tokenizer_type="wordpiece",
                    tokenizer_model=str(vocab), shard_size_bytes=64 << 10, progress=False)
    settings.update(overrides)
    return preprocess(PreprocessConfig(**settings))


def tree_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, stdlib_documents) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    return write_jsonl(path, stdlib_documents[:2500])


def test_output_identical_for_any_worker_count(tmp_path, corpus, minilm_dir):
    vocab = minilm_dir / "vocab.txt"
    outputs = {}
    for workers in (1, 2, 3):  # 8 KB work chunks, 8 to a 64 KB shard: the workers share every shard
        out = tmp_path / f"w{workers}"
        manifest = run_preprocess([corpus], out, vocab, workers=workers, split_sentences=True,
                                  work_chunk_bytes=8 << 10)
        outputs[workers] = tree_bytes(out)
    assert manifest["totals"]["shards"] >= 8, "the corpus must span many shards for this test to mean anything"
    assert manifest["totals"]["documents"] == 2500
    assert outputs[1] == outputs[2] == outputs[3]
    # the shards are whole groups of work chunks: 8 chunks of ~8 KB make each ~64 KB shard
    sizes = [shard["bytes"] for shard in manifest["shards"][:-1]]
    assert min(sizes) > 16 << 10, sizes


def test_documents_equal_tokenizer_output(tmp_path, corpus, minilm_dir, stdlib_documents):
    from transformers import BertTokenizerFast

    reference = BertTokenizerFast.from_pretrained(str(minilm_dir))
    out = tmp_path / "out"
    run_preprocess([corpus], out, minilm_dir / "vocab.txt", workers=2)
    documents = IndexedDocuments(out)
    assert len(documents) == 2500
    for index in range(0, 2500, 97):
        paragraphs = [p for p in stdlib_documents[index].splitlines() if p.strip()]
        expected = reference(paragraphs, add_special_tokens=False)["input_ids"]
        expected = [ids for ids in expected if ids]
        assert documents.sentence_lengths(index).tolist() == [len(ids) for ids in expected]
        assert documents.tokens(index).tolist() == [t for ids in expected for t in ids]


def sigkill_after_shards(command: list[str], out: Path, shards: int) -> Path:
    """Start `command` (tools/preprocess_data.py writing `out`), SIGKILL its process group once `shards` shards
    are finished (their progress records exist), check it left no manifest; returns the progress directory."""
    process = subprocess.Popen(command, start_new_session=True)
    progress, deadline = out / ".progress", time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if progress.is_dir() and len(list(progress.glob("*.json"))) >= shards:
            break
        time.sleep(0.002)
    assert process.poll() is None, "preprocessing finished before it could be killed"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (out / "index.json").exists()
    return progress


def test_sigkill_then_rerun_is_byte_identical_and_skips_finished_shards(tmp_path, corpus, minilm_dir):
    vocab = minilm_dir / "vocab.txt"
    reference = tmp_path / "reference"
    run_preprocess([corpus], reference, vocab, workers=2, split_sentences=True, shard_size_bytes=16 << 10,
                   work_chunk_bytes=4 << 10)
    expected = tree_bytes(reference)

    out = tmp_path / "killed"
    command = [sys.executable, str(REPO / "tools/preprocess_data.py"), "--input", str(corpus),
               "--output-dir", str(out), "--tokenizer-type", "wordpiece", "--tokenizer-model", str(vocab),
               "--workers", "2", "--split-sentences", "--shard-size-mb", str(16 / 1024),
               "--work-chunk-mb", str(4 / 1024), "--quiet"]
    survivors = {}
    for kill_after in (3, 30):  # kill twice, at different depths, before letting it finish
        progress = sigkill_after_shards(command, out, kill_after + len(survivors))
        for record in progress.glob("*.json"):
            shard = out / record.name.removesuffix(".json")
            survivors[shard.name] = shard.stat().st_ino, shard.stat().st_mtime_ns
    assert len(survivors) >= 30

    subprocess.run(command, check=True)
    assert tree_bytes(out) == expected
    assert not (out / ".progress").exists()
    for name, (inode, mtime) in survivors.items():
        assert ((out / name).stat().st_ino, (out / name).stat().st_mtime_ns) == (inode, mtime), (
            f"{name} was finished before the kill but written again"
        )


def test_every_bad_input_counted_and_every_valid_document_kept(tmp_path, minilm_dir):
    valid = [f"Valid document number {i}. It has two sentences." for i in range(40)]
    bad = {
        "invalid_json": [b"{not json", b'{"text": "unterminated', b"[1, 2, 3]"],
        "missing_key": [b'{"title": "no text key"}', b"{}"],
        "not_a_string": [b'{"text": 42}', b'{"text": ["a", "b"]}', b'{"text": null}'],
        "invalid_utf8": [b'{"text": "bad \xff\xfe bytes"}', b'{"text": "lone \\ud800 surrogate"}'],
        "empty": [b'{"text": ""}', b'{"text": "   \\n\\t "}', b""],
        "too_large": [json.dumps({"text": "word " * 400}).encode()],
    }
    lines, expected_kinds = [], []
    bad_items = [(kind, line) for kind, items in bad.items() for line in items]
    for i, text in enumerate(valid):
        lines.append(json.dumps({"text": text}).encode())
        if i < len(bad_items):
            lines.append(bad_items[i][1])
            expected_kinds.append(bad_items[i][0])
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    text_path = tmp_path / "blocks.txt"
    text_path.write_bytes(b"First block line one.\nline two.\n\n\xff\xfe broken block\n\n  \n\nLast block.\n")

    rejects = tmp_path / "rejects.jsonl"
    manifest = run_preprocess([path, text_path], tmp_path / "out", minilm_dir / "vocab.txt", workers=2,
                              max_document_bytes=1000, text_mode="block", reject_file=str(rejects),
                              shard_size_bytes=300)
    expected_counts = {kind: len(items) for kind, items in bad.items()}
    expected_counts["invalid_utf8"] += 1  # the broken text block
    assert manifest["rejected"] == expected_counts
    assert set(manifest["rejected"]) == set(REJECT_KINDS)
    written = [json.loads(line) for line in rejects.read_text().splitlines()]
    assert [w["kind"] for w in written] == expected_kinds + ["invalid_utf8"]
    assert written[-1]["source"].endswith("blocks.txt") and written[-1]["line"] == 4

    documents = IndexedDocuments(tmp_path / "out")
    tokenizer = load_tokenizer("wordpiece", minilm_dir / "vocab.txt")
    expected_texts = valid + ["First block line one.\nline two.", "Last block."]
    assert len(documents) == len(expected_texts) == manifest["totals"]["documents"]
    for index, text in enumerate(expected_texts):
        expected = [t for ids in tokenizer.encode_batch(text.splitlines()) for t in ids]
        assert documents.tokens(index).tolist() == expected


def test_gzip_input_gives_the_same_shards(tmp_path, corpus, minilm_dir):
    gz = tmp_path / "docs.jsonl.gz"
    gz.write_bytes(gzip.compress(corpus.read_bytes()))
    run_preprocess([corpus], tmp_path / "plain", minilm_dir / "vocab.txt")
    run_preprocess([gz], tmp_path / "gz", minilm_dir / "vocab.txt")
    plain, gzipped = tree_bytes(tmp_path / "plain"), tree_bytes(tmp_path / "gz")
    shards = [n for n in plain if n.endswith(".arrow")]
    assert len(shards) > 1
    assert all(plain[n] == gzipped[n] for n in shards)


@pytest.fixture()
def small_dataset(tmp_path, corpus, minilm_dir) -> Path:
    out = tmp_path / "data"
    run_preprocess([corpus], out, minilm_dir / "vocab.txt", shard_size_bytes=256 << 10)
    return out


def test_flipped_byte_is_detected_and_names_the_shard(small_dataset, capsys):
    assert run_tool("verify_data", [str(small_dataset)]) == 0
    shard = sorted(small_dataset.glob("shard_*.arrow"))[2]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    capsys.readouterr()
    assert run_tool("verify_data", [str(small_dataset)]) == 1
    err = capsys.readouterr().err
    assert shard.name in err and "checksum" in err
    with pytest.raises(DataError, match=shard.name):
        IndexedDocuments(small_dataset, verify_checksums=True)


def test_truncated_or_missing_shard_is_refused_at_open(small_dataset, capsys):
    shard = sorted(small_dataset.glob("shard_*.arrow"))[1]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 100)
    with pytest.raises(DataError, match=f"shard {shard.name} .*truncated"):
        IndexedDocuments(small_dataset)
    capsys.readouterr()
    assert run_tool("verify_data", [str(small_dataset)]) == 1 and shard.name in capsys.readouterr().err
    shard.unlink()
    with pytest.raises(DataError, match=f"missing: {shard.name}"):
        IndexedDocuments(small_dataset)


def test_tokenizer_or_vocabulary_mismatch_is_refused(small_dataset):
    with pytest.raises(DataError, match="vocabulary size 30522 but the model expects 32000"):
        IndexedDocuments(small_dataset, expected_vocab_size=32000)
    with pytest.raises(DataError, match="preprocess again with the model's tokenizer"):
        IndexedDocuments(small_dataset, expected_identity="sha256:0123456789abcdef0123")


def test_shards_load_with_plain_pyarrow_and_hf_datasets(small_dataset):
    import datasets

    documents = IndexedDocuments(small_dataset)
    manifest = documents.manifest
    first = manifest["shards"][1]
    path = small_dataset / first["file"]
    table = pa.ipc.open_stream(pa.memory_map(str(path))).read_all()
    hf = datasets.Dataset.from_file(str(path))
    assert table.num_rows == len(hf) == first["documents"]
    index = first["first_document"] + 3
    expected = documents.tokens(index)
    assert table.column("input_ids")[3].as_py() == hf[3]["input_ids"] == expected.tolist()
    assert sum(hf[3]["sentence_lengths"]) == len(expected)
    lengths = documents.document_lengths()
    assert int(lengths.sum()) == manifest["totals"]["tokens"]
    assert np.array_equal(lengths[:50], [len(documents.tokens(i)) for i in range(50)])


def test_rerun_of_finished_dataset_does_nothing_and_other_settings_are_refused(small_dataset, corpus, minilm_dir):
    before = {p.name: p.stat().st_mtime_ns for p in small_dataset.iterdir()}
    run_preprocess([corpus], small_dataset, minilm_dir / "vocab.txt", shard_size_bytes=256 << 10)
    assert {p.name: p.stat().st_mtime_ns for p in small_dataset.iterdir()} == before
    with pytest.raises(ValueError, match="--overwrite"):
        run_preprocess([corpus], small_dataset, minilm_dir / "vocab.txt", split_sentences=True)


def test_an_input_of_only_bad_records_becomes_an_empty_shard(tmp_path, minilm_dir):
    good = write_jsonl(tmp_path / "good.jsonl", ["A valid document.", "Another one."])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "x"}\n{"text": ""}\nnot json\n')
    manifest = run_preprocess([good, bad], tmp_path / "out", minilm_dir / "vocab.txt", workers=2)
    assert manifest["totals"]["documents"] == 2 and manifest["totals"]["shards"] == 2
    assert manifest["shards"][1]["documents"] == 0
    assert manifest["rejected"]["missing_key"] == 1 and manifest["rejected"]["empty"] == 1
    assert manifest["rejected"]["invalid_json"] == 1
    assert len(IndexedDocuments(tmp_path / "out")) == 2
