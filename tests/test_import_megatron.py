"""tools/import_megatron.py against files written by Megatron-LM's own builder (megatron-core)."""

from __future__ import annotations

import json
import shutil
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_narrow.data.megatron_import import import_megatron
from megatron_narrow.data.shards import MANIFEST_NAME, DataError, IndexedDocuments
from megatron_narrow.data.tokenizer import load_tokenizer

from .doc_commands import doc_block, doc_workspace
from .runs import run_tool

DOCUMENTS = 300


def build_megatron_dataset(prefix: Path, documents: list[list[list[int]]], dtype=np.uint16) -> None:
    """PREFIX.bin/.idx written by megatron-core's IndexedDatasetBuilder: one item per sentence."""
    with warnings.catch_warnings():  # megatron.core warns that Transformer Engine and Apex are absent
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for sentences in documents:
        for ids in sentences:
            builder.add_item(torch.tensor(ids, dtype=torch.int64))
        builder.end_document()
    builder.finalize(f"{prefix}.idx")


@pytest.fixture(scope="module")
def megatron_corpus(tmp_path_factory, stdlib_documents, minilm_dir) -> tuple[Path, list[list[list[int]]]]:
    """stdlib docstrings tokenized with MiniLM's WordPiece, a paragraph a sentence, as Megatron writes them;
    one document without tokens, which the import skips."""
    tokenizer = load_tokenizer("wordpiece", str(minilm_dir / "vocab.txt"))
    documents = []
    for text in stdlib_documents[:DOCUMENTS]:
        paragraphs = [p for p in text.splitlines() if p.strip()]
        documents.append([ids for ids in tokenizer.encode_batch(paragraphs) if ids])
    documents[7] = []
    prefix = tmp_path_factory.mktemp("megatron") / "corpus_text_sentence"
    build_megatron_dataset(prefix, documents)
    return prefix, documents


def test_import_keeps_every_document_and_sentence_and_verifies(tmp_path, megatron_corpus, minilm_dir):
    prefix, documents = megatron_corpus
    out = tmp_path / "imported"
    code = run_tool("import_megatron", ["--input", str(prefix), "--output-dir", str(out), "--tokenizer-type",
                                        "wordpiece", "--tokenizer-model", str(minilm_dir / "vocab.txt"),
                                        "--shard-size-mb", str(16 / 1024)])
    assert code == 0
    imported = IndexedDocuments(out)
    kept = [sentences for sentences in documents if sentences]
    assert len(imported) == len(kept) == DOCUMENTS - 1 and imported.manifest["rejected"]["empty"] == 1
    assert imported.manifest["totals"]["shards"] >= 3
    assert imported.manifest["tokenizer"]["vocab_size"] == 30522
    for index, sentences in enumerate(kept):
        assert imported.sentence_lengths(index).tolist() == [len(ids) for ids in sentences]
        assert imported.tokens(index).tolist() == [t for ids in sentences for t in ids]
    assert run_tool("verify_data", [str(out)]) == 0


def _rewrite_idx(source: Path, target: Path, *, offset: int, value: bytes) -> None:
    data = bytearray(source.read_bytes())
    data[offset:offset + len(value)] = value
    target.write_bytes(bytes(data))


def test_unreadable_inputs_are_refused_before_anything_is_written(tmp_path, megatron_corpus, minilm_dir,
                                                                  tiny_corpus_data):
    prefix, _ = megatron_corpus
    idx, bin_ = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
    cases: dict[str, str] = {}

    def variant(name: str, idx_bytes: bytes | None = None, bin_bytes: bytes | None = None) -> str:
        (tmp_path / f"{name}.idx").write_bytes(idx.read_bytes() if idx_bytes is None else idx_bytes)
        (tmp_path / f"{name}.bin").write_bytes(bin_.read_bytes() if bin_bytes is None else bin_bytes)
        return str(tmp_path / name)

    cases[variant("magic", idx_bytes=b"NOTMMIDX" + idx.read_bytes()[8:])] = "no MMIDIDX header"
    version = bytearray(idx.read_bytes())
    version[9:17] = struct.pack("<Q", 2)
    cases[variant("version", idx_bytes=bytes(version))] = "index version 2; only version 1"
    float_dtype = bytearray(idx.read_bytes())
    float_dtype[17] = 6
    cases[variant("float", idx_bytes=bytes(float_dtype))] = "token dtype code 6 is not an integer type"
    cases[variant("short_bin", bin_bytes=bin_.read_bytes()[:-2])] = "truncated, or not this index's .bin"
    cases[variant("short_idx", idx_bytes=idx.read_bytes()[:-8])] = "truncated or damaged"
    for case, message in cases.items():
        out = tmp_path / f"out_{Path(case).name}"
        with pytest.raises(DataError, match=message):
            import_megatron(case, str(out), "wordpiece", str(minilm_dir / "vocab.txt"))
        assert not out.exists()
    small_vocab = tmp_path / "small_vocab_out"
    with pytest.raises(DataError, match=r"holds token id \d+, outside the vocabulary of .* \(1000 ids\)"):
        import_megatron(str(prefix), str(small_vocab), "sentencepiece", str(tiny_corpus_data["tokenizer"]))
    assert not (small_vocab / MANIFEST_NAME).exists()


def test_readme_corpus_commands_run_as_written(tmp_path, megatron_corpus, minilm_dir, stdlib_documents):
    """The README's block for Parquet shards of a FineWeb-style corpus and a Megatron-LM corpus."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    work = doc_workspace(tmp_path / "work")
    (work / "fineweb").mkdir()
    texts = stdlib_documents[:400]
    for part in range(2):
        rows = texts[part * 200:(part + 1) * 200]
        pq.write_table(pa.table({"text": rows, "id": [f"<urn:{part}:{i}>" for i in range(200)]}),
                       work / "fineweb" / f"00{part}_00000.parquet", row_group_size=50)
    (work / "megatron").mkdir()
    prefix, _ = megatron_corpus
    for suffix in (".bin", ".idx"):
        shutil.copy(f"{prefix}{suffix}", work / "megatron" / f"corpus_text_sentence{suffix}")
    shutil.copy(minilm_dir / "vocab.txt", work / "vocab.txt")
    result = doc_block("readme-corpora").run(work, replace={"--workers 16": "--workers 2"})
    fineweb = json.loads((work / "data/fineweb/index.json").read_text())
    imported = json.loads((work / "data/from_megatron/index.json").read_text())
    assert fineweb["totals"]["documents"] == 400 and imported["totals"]["documents"] == DOCUMENTS - 1
    assert result.stdout.count("OK ") == 2, result.stdout[-2000:]
