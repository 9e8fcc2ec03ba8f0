"""Preprocessed shards -> memory-mapped reader -> masked BERT samples, on a real WordPiece vocabulary."""

from __future__ import annotations

from megatron_narrow.config import DataConfig
from megatron_narrow.data.preprocess import PreprocessConfig, preprocess, split_paragraphs
from megatron_narrow.data.samples import BertSampleDataset, split_documents
from megatron_narrow.data.shards import IndexedDocuments
from megatron_narrow.data.tokenizer import load_tokenizer

from .conftest import write_jsonl


def test_samples_from_shards_rebuild_every_document(tmp_path, minilm_dir, stdlib_documents):
    corpus = write_jsonl(tmp_path / "docs.jsonl", stdlib_documents[:600])
    vocab = minilm_dir / "vocab.txt"
    preprocess(PreprocessConfig(inputs=[str(corpus)], output_dir=str(tmp_path / "data"), tokenizer_type="wordpiece",
                                tokenizer_model=str(vocab), workers=2, split_sentences=True,
                                shard_size_bytes=32 << 10, progress=False))
    tokenizer = load_tokenizer("wordpiece", vocab)
    documents = IndexedDocuments(tmp_path / "data", expected_identity=tokenizer.identity,
                                 expected_vocab_size=tokenizer.vocab_size)
    config = DataConfig(data_paths=[str(tmp_path / "data")], seq_len=128, max_predictions=20,
                        whole_word_masking=True)
    train, valid, test = split_documents(len(documents), config.split)
    assert len(train) + len(valid) + len(test) == 600
    dataset = BertSampleDataset(documents, train, config, word_start=tokenizer.word_start_mask())

    rebuilt: dict[int, list[int]] = {}
    starts, _ = dataset.sample_token_ranges
    order = dataset.epoch_permutation(0)
    assert sorted(order.tolist()) == list(range(len(dataset)))
    for i in range(len(dataset)):
        sample = dataset[i]
        index_sample = int(order[i])
        ids = sample["input_ids"].copy()
        valid_slots = sample["target_valid"]
        ids[sample["target_positions"][valid_slots]] = sample["target_ids"][valid_slots]  # undo the masking
        real = ids[sample["attention_mask"] == 1]
        assert real[0] == tokenizer.special.cls and real[-1] == tokenizer.special.sep
        document = int(dataset.sample_documents[index_sample])
        rebuilt.setdefault(document, []).append((int(starts[index_sample]), real[1:-1].tolist()))
    texts = stdlib_documents[:600]  # the reference: the tokenizer on the raw text, not the shard reader
    for document in train.tolist():
        pieces = [tokens for _, tokens in sorted(rebuilt.get(document, []))]
        expected = [t for ids in tokenizer.encode_batch(split_paragraphs(texts[document], True)) for t in ids]
        assert [t for piece in pieces for t in piece] == expected
