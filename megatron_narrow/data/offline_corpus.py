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


def iter_sourced_docstrings(root: Path, *, min_words: int = 12,
                            skip: tuple[str, ...] = ("test", "tests")) -> Iterator[tuple[Path, str]]:
    """(file, docstring) for the modules, classes and functions in the .py files under `root`, in a stable
    order; directories named in `skip` are left out."""
    for path in sorted(root.rglob("*.py")):
        if any(part in skip for part in path.relative_to(root).parts):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError, UnicodeDecodeError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc.split()) >= min_words:
                    paragraphs = _paragraphs(doc)
                    if paragraphs:
                        yield path, "\n".join(paragraphs)


def iter_docstrings(root: Path, *, min_words: int = 12, skip: tuple[str, ...] = ("test", "tests")) -> Iterator[str]:
    """The docstrings of iter_sourced_docstrings, without their files."""
    for _, text in iter_sourced_docstrings(root, min_words=min_words, skip=skip):
        yield text


def iter_stdlib_docstrings(min_words: int = 12) -> Iterator[str]:
    """Docstrings of the standard library (its tests and site-packages left out)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    yield from iter_docstrings(root, min_words=min_words, skip=("test", "tests", "site-packages"))


def iter_installed_package_docstrings(min_words: int = 12) -> Iterator[tuple[str, str]]:
    """(package, docstring) of the installed third-party packages (site-packages): several times the
    standard library's text, for a corpus that a small model does not exhaust in a few epochs; the package
    is the top-level directory (or module) the docstring's file sits in."""
    root = Path(sysconfig.get_paths()["purelib"])
    for path, text in iter_sourced_docstrings(root, min_words=min_words):
        yield path.relative_to(root).parts[0].removesuffix(".py"), text


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
