"""Train a sentencepiece tokenizer (unigram or BPE) with BERT's special tokens at fixed ids.

[PAD]=0 and [UNK]=1 are sentencepiece's pad/unk pieces; [CLS]=2, [SEP]=3, [MASK]=4 are control
symbols, so no text ever encodes to them. sentencepiece's own <s>/</s> are disabled: BERT adds its
markers during sample building.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from megatron_narrow.data.raw_input import iter_documents
from megatron_narrow.data.shards import DataError


def iter_training_sentences(inputs: list[str], *, json_keys: list[str], text_mode: str = "line",
                            max_sentence_chars: int = 4192) -> Iterator[str]:
    """Non-empty lines of every valid document; bad records are skipped exactly as preprocessing skips them."""
    for text in iter_documents(inputs, json_keys=json_keys, text_mode=text_mode):  # type: ignore[arg-type]
        for line in text.splitlines():
            if line.strip():
                yield line[:max_sentence_chars]


def train_sentencepiece(inputs: list[str], model_prefix: str, *, vocab_size: int = 8000,
                        model_type: Literal["unigram", "bpe"] = "unigram", json_keys: list[str] | None = None,
                        text_mode: str = "line", input_sentence_size: int = 2_000_000,
                        character_coverage: float = 0.9995) -> Path:
    """Train and write `{model_prefix}.model` (and `.vocab`); returns the model path."""
    import sentencepiece

    if model_type not in ("unigram", "bpe"):
        raise ValueError(f"model type must be unigram or bpe, got {model_type!r}")
    model = io.BytesIO()
    counted = [0]
    try:
        _train(sentencepiece, _counting(iter_training_sentences(inputs, json_keys=json_keys or ["text"],
                                                                text_mode=text_mode), counted),
               model, vocab_size=vocab_size, model_type=model_type, input_sentence_size=input_sentence_size,
               character_coverage=character_coverage)
    except RuntimeError as error:  # sentencepiece reports input problems as C++ assertions
        raise _training_error(error, inputs, counted[0], vocab_size) from None
    out = Path(f"{model_prefix}.model")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(model.getvalue())
    processor = sentencepiece.SentencePieceProcessor(model_proto=model.getvalue())
    vocab_lines = [f"{processor.id_to_piece(i)}\t{processor.get_score(i)}" for i in range(processor.get_piece_size())]
    Path(f"{model_prefix}.vocab").write_text("\n".join(vocab_lines) + "\n", encoding="utf-8")
    return out


def _train(sentencepiece, sentences: Iterator[str], model: io.BytesIO, *, vocab_size: int, model_type: str,
           input_sentence_size: int, character_coverage: float) -> None:
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=sentences,
        model_writer=model,
        vocab_size=vocab_size,
        model_type=model_type,
        pad_id=0, pad_piece="[PAD]",
        unk_id=1, unk_piece="[UNK]",
        bos_id=-1, eos_id=-1,
        control_symbols=["[CLS]", "[SEP]", "[MASK]"],
        input_sentence_size=input_sentence_size,
        shuffle_input_sentence=True,
        character_coverage=character_coverage,
        num_threads=2,
        minloglevel=2,
    )


def _counting(items: Iterator[str], count: list[int]) -> Iterator[str]:
    """Pass items through, counting them in count[0] (so an empty input can be told from other failures)."""
    for item in items:
        count[0] += 1
        yield item


def _training_error(error: RuntimeError, inputs: list[str], sentences: int, vocab_size: int) -> ValueError:
    """sentencepiece's assertion as one line a user can act on: the inputs or the flag to change."""
    message = str(error)
    if sentences == 0:
        return DataError(f"no training text in {', '.join(inputs)}: every record was rejected or empty; "
                         "check --json-keys and --text-mode")
    if "Vocabulary size too high" in message:
        largest = re.search(r"<= (\d+)", message)
        limit = f" (at most {largest.group(1)} for it)" if largest else ""
        return ValueError(f"--vocab-size {vocab_size} is too large for the text in {', '.join(inputs)}{limit}; "
                          "lower --vocab-size or train on more text")
    return ValueError(f"sentencepiece could not train on {', '.join(inputs)}: {message.strip()}")
