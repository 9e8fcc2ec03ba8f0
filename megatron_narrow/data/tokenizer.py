"""One tokenizer interface over sentencepiece `.model`, WordPiece `vocab.txt` and `tokenizer.json`.

Preprocessing encodes raw text *without* special tokens (samples add [CLS]/[SEP] later), and every
manifest records the tokenizer's identity so that training can refuse data made with another one.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np

TokenizerType = Literal["sentencepiece", "wordpiece"]

BERT_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


@dataclass(frozen=True, slots=True)
class SpecialTokens:
    """Ids of BERT's special tokens; [PAD] is the one padding and the importance vector pin low."""

    pad: int
    unk: int
    cls: int
    sep: int
    mask: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def ids(self) -> tuple[int, ...]:
        return (self.pad, self.unk, self.cls, self.sep, self.mask)


class Tokenizer(Protocol):
    """What preprocessing, sample building and training need from a tokenizer."""

    kind: TokenizerType
    path: str
    vocab_size: int
    special: SpecialTokens
    identity: str

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, no special tokens added."""
        ...

    def id_to_token(self, token_id: int) -> str: ...

    def word_start_mask(self) -> np.ndarray:
        """bool[vocab]: True where a token starts a word (for whole-word masking)."""
        ...


def file_identity(*parts: bytes) -> str:
    """A stable identity for a tokenizer: sha256 over its defining bytes."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(hashlib.sha256(part).digest())
    return "sha256:" + digest.hexdigest()


def _special_ids(lookup: dict[str, int] | None, token_to_id, path: str) -> SpecialTokens:
    ids = {}
    for name, token in zip(("pad", "unk", "cls", "sep", "mask"), BERT_SPECIAL_TOKENS, strict=True):
        token_id = lookup.get(token) if lookup is not None else token_to_id(token)
        if token_id is None or token_id < 0:
            raise ValueError(f"tokenizer {path} has no {token} token; BERT needs {', '.join(BERT_SPECIAL_TOKENS)}")
        ids[name] = int(token_id)
    return SpecialTokens(**ids)


class SentencePieceTokenizer:
    """A sentencepiece `.model` (unigram or BPE) trained with BERT's special tokens."""

    kind: TokenizerType = "sentencepiece"

    def __init__(self, path: str | Path) -> None:
        import sentencepiece

        self.path = str(path)
        data = Path(path).read_bytes()
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_proto=data)
        except RuntimeError:  # its message is a C++ source location, nothing a user can act on
            raise ValueError(
                f"tokenizer {path} is not a valid sentencepiece model (it cannot be parsed); give a .model file "
                "written by tools/train_tokenizer.py or sentencepiece"
            ) from None
        self.vocab_size = int(self._sp.get_piece_size())
        self.identity = file_identity(data)
        unk = self._sp.unk_id()

        def piece_id(token: str) -> int | None:
            token_id = self._sp.piece_to_id(token)
            return None if token_id == unk and token != "[UNK]" else token_id

        self.special = _special_ids(None, piece_id, self.path)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._sp.encode(texts, out_type=int)

    def id_to_token(self, token_id: int) -> str:
        return self._sp.id_to_piece(token_id)

    def word_start_mask(self) -> np.ndarray:
        pieces = [self._sp.id_to_piece(i) for i in range(self.vocab_size)]
        return np.array([p.startswith("\u2581") for p in pieces], dtype=bool)


class HFTokenizer:
    """WordPiece `vocab.txt` (BERT's basic tokenizer + WordPiece) or any `tokenizer.json`.

    For `vocab.txt`, lower-casing follows a `tokenizer_config.json` beside it when there is one,
    as transformers does; otherwise it is inferred: a vocabulary without upper-case letters is uncased.
    """

    kind: TokenizerType = "wordpiece"

    def __init__(self, path: str | Path) -> None:
        import tokenizers

        path = Path(path)
        self.path = str(path)
        data = path.read_bytes()
        # tokenizers raises bare Exceptions (and TypeError for a vocab.txt without [SEP]); name the file
        try:
            if path.suffix == ".json":
                self._tok = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
                self.identity = file_identity(data)
            else:
                lowercase = _vocab_is_uncased(path, data)
                self._tok = tokenizers.BertWordPieceTokenizer(str(path), lowercase=lowercase)._tokenizer
                self.identity = file_identity(data, b"lowercase=%d" % lowercase)
        except Exception as error:  # whatever the library raises, the file is unusable
            raise ValueError(f"tokenizer {path} cannot be loaded ({error}); {_wordpiece_hint(path)}") from None
        self._tok.no_padding()
        self._tok.no_truncation()
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        self.special = _special_ids(None, self._tok.token_to_id, self.path)
        self._continuation = "##"

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        encodings = self._tok.encode_batch_fast(texts, add_special_tokens=False)
        return [e.ids for e in encodings]

    def id_to_token(self, token_id: int) -> str:
        return self._tok.id_to_token(token_id)

    def word_start_mask(self) -> np.ndarray:
        vocab = self._tok.get_vocab(with_added_tokens=True)
        mask = np.ones(self.vocab_size, dtype=bool)
        for token, token_id in vocab.items():
            if token.startswith(self._continuation):
                mask[token_id] = False
        return mask


def _wordpiece_hint(path: Path) -> str:
    if path.suffix == ".json":
        return "give a tokenizer.json saved by the tokenizers or transformers library"
    return (f"give a WordPiece vocab.txt: UTF-8, one token per line, including {' '.join(BERT_SPECIAL_TOKENS)} "
            "(and a valid tokenizer_config.json beside it, if any)")


def _vocab_is_uncased(vocab_path: Path, data: bytes) -> bool:
    config = vocab_path.with_name("tokenizer_config.json")
    if config.exists():
        try:
            setting = json.loads(config.read_text()).get("do_lower_case")
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as error:
            raise ValueError(f"{config} is not a JSON object ({error})") from None
        if setting is not None:
            return bool(setting)
    tokens = data.decode("utf-8").splitlines()
    ordinary = (t for t in tokens if t not in BERT_SPECIAL_TOKENS and not t.startswith("[unused"))
    return not any(any(c.isupper() for c in t) for t in ordinary)


def load_tokenizer(kind: TokenizerType, path: str | Path) -> Tokenizer:
    """Open a tokenizer by type and file; raises a clear error for a missing or mismatched file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer model {path} does not exist")
    if kind == "sentencepiece":
        if path.suffix != ".model":
            raise ValueError(f"--tokenizer-type sentencepiece expects a .model file, got {path}")
        return SentencePieceTokenizer(path)
    if kind == "wordpiece":
        if path.suffix not in (".txt", ".json"):
            raise ValueError(f"--tokenizer-type wordpiece expects vocab.txt or tokenizer.json, got {path}")
        return HFTokenizer(path)
    raise ValueError(f"unknown tokenizer type {kind!r}; choose sentencepiece or wordpiece")


def tokenizer_description(tokenizer: Tokenizer) -> dict:
    """The manifest's record of a tokenizer: enough to refuse data made with a different one."""
    return {
        "type": tokenizer.kind,
        "file": Path(tokenizer.path).name,
        "identity": tokenizer.identity,
        "vocab_size": tokenizer.vocab_size,
        "special_ids": tokenizer.special.as_dict(),
    }
