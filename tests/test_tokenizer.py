"""Tokenizer interface: WordPiece parity with transformers on a real vocabulary; sentencepiece training."""

from __future__ import annotations

import numpy as np
import pytest

from megatron_narrow.data.tokenizer import load_tokenizer
from megatron_narrow.data.train_tokenizer import train_sentencepiece

from .conftest import write_jsonl

EXTRA_SENTENCES = [
    "The Quick Brown Fox jumps over the lazy dog.",
    "Naïve café owners in Zürich don't like 'smart quotes' — or em dashes!",
    "北京 is the capital of China; Tokyo (東京) of Japan.",
    "Numbers like 3.14159 and 1,000,000 and e-mail addresses a.b@c.org tokenize too.",
    "  leading and trailing spaces   ",
]


@pytest.mark.parametrize("file_name", ["vocab.txt", "tokenizer.json"])
def test_wordpiece_ids_equal_bert_tokenizer_fast(minilm_dir, stdlib_documents, file_name):
    from transformers import BertTokenizerFast

    ours = load_tokenizer("wordpiece", minilm_dir / file_name)
    reference = BertTokenizerFast.from_pretrained(str(minilm_dir))
    sentences = [p for doc in stdlib_documents[:600] for p in doc.splitlines()] + EXTRA_SENTENCES
    expected = reference(sentences, add_special_tokens=False)["input_ids"]
    got = ours.encode_batch(sentences)
    mismatches = [i for i, (a, b) in enumerate(zip(got, expected, strict=True)) if a != b]
    assert len(sentences) > 1000
    assert mismatches == [], f"{len(mismatches)} of {len(sentences)} differ, first: {sentences[mismatches[0]]!r}"
    assert ours.vocab_size == reference.vocab_size == 30522
    assert ours.special.as_dict() == {
        "pad": reference.pad_token_id, "unk": reference.unk_token_id, "cls": reference.cls_token_id,
        "sep": reference.sep_token_id, "mask": reference.mask_token_id,
    }


def test_wordpiece_word_starts(minilm_dir):
    tokenizer = load_tokenizer("wordpiece", minilm_dir / "vocab.txt")
    starts = tokenizer.word_start_mask()
    ids = tokenizer.encode_batch(["tokenization"])[0]
    assert [tokenizer.id_to_token(i) for i in ids] == ["token", "##ization"]
    assert starts[ids].tolist() == [True, False]


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_sentencepiece_training_has_bert_specials(tmp_path, stdlib_documents, model_type):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", stdlib_documents[:800])
    model = train_sentencepiece([str(corpus)], str(tmp_path / "spm"), vocab_size=600, model_type=model_type)
    tokenizer = load_tokenizer("sentencepiece", model)
    assert tokenizer.special.as_dict() == {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
    assert tokenizer.vocab_size == 600
    encoded = tokenizer.encode_batch(stdlib_documents[800:900] + ["[CLS] [SEP] [MASK] literal text"])
    flat = np.concatenate([np.asarray(e) for e in encoded])
    assert flat.size > 1000
    assert not np.isin(flat, [0, 2, 3, 4]).any(), "text must never encode to [PAD]/[CLS]/[SEP]/[MASK]"
    import hashlib

    file_digest = hashlib.sha256(hashlib.sha256(model.read_bytes()).digest()).hexdigest()
    assert tokenizer.identity == "sha256:" + file_digest  # the file's bytes, nothing else (not its path or time)


def test_tokenizer_errors_are_clear(tmp_path, minilm_dir):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer("wordpiece", tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="expects a .model file"):
        load_tokenizer("sentencepiece", minilm_dir / "vocab.txt")
