"""A small English corpus that needs no network: the docstrings of the Python standard library.

The quickstart, the tests and the benchmarks use it. Docstrings are read with `ast` (never imported,
so no module runs), de-indented, and each becomes one JSONL document whose paragraphs are its
blank-line-separated blocks joined into single lines.
"""

from __future__ import annotations

import ast
import itertools
import json
import sysconfig
import warnings
from collections.abc import Iterator
from pathlib import Path


def _paragraphs(docstring: str) -> list[str]:
    blocks = [" ".join(line.strip() for line in block.splitlines()) for block in docstring.split("\n\n")]
    return [b for b in blocks if len(b.split()) >= 4]


def iter_stdlib_docstrings(min_words: int = 12) -> Iterator[str]:
    """Docstrings of modules, classes and functions in the standard library, in a stable order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or "test" in path.parts or "tests" in path.parts:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc.split()) >= min_words:
                    paragraphs = _paragraphs(doc)
                    if paragraphs:
                        yield "\n".join(paragraphs)


def write_offline_corpus(path: str | Path, *, max_documents: int | None = None, repeat: int = 1) -> int:
    """Write the corpus as JSONL ({"text": ...} per line); returns the number of documents written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    documents = list(itertools.islice(iter_stdlib_docstrings(), max_documents))  # stops walking at the limit
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(repeat):
            for text in documents:
                f.write(json.dumps({"text": text}) + "\n")
    return len(documents) * repeat
