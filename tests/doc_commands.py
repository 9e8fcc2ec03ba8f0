"""The shell commands of README.md and docs/*.md, read from the markdown and run as a user runs them.

Every fenced shell block (```bash, ```sh, ```shell) follows a marker comment on the line before it:

    <!-- doc-test: NAME -->          a test runs it: `doc_block("NAME").run(workspace, replace={...})`
    <!-- illustrative: REASON -->    shown only, with the reason (a server that runs until stopped, say)

A test reads the commands from the document each time, so editing a document changes what is tested. It may
shrink a command to test scale (`replace={"--vocab-size 32000": "--vocab-size 1000"}`), and every text it
replaces must still be in the block: a command whose documented form changes fails the test that ran it.
`doc_workspace` gives a directory laid out like a checkout (tools/, examples/, ... linked) for the relative
paths of the documents.
"""

from __future__ import annotations

import os
import re
import subprocess
import textwrap
from dataclasses import dataclass
from pathlib import Path

from .conftest import REPO

SHELL_LANGUAGES = {"bash", "sh", "shell"}
MARKER = re.compile(r"^\s*<!--\s*(doc-test|illustrative):\s*(.*?)\s*-->\s*$")
FENCE_OPEN = re.compile(r"^(\s*)```(\w*)\s*$")
CHECKOUT_ENTRIES = ("tools", "examples", "megatron_narrow", "ds_configs", "benchmarks", "setup.py", "pyproject.toml")


@dataclass(frozen=True)
class DocBlock:
    """One fenced shell block: where it is, its marker (kind and name or reason) and its text."""

    document: Path
    line: int
    kind: str | None  # "doc-test", "illustrative", or None when the marker is missing
    label: str
    text: str

    @property
    def where(self) -> str:
        return f"{self.document.relative_to(REPO)}:{self.line}"

    def script(self, replace: dict[str, str] | None = None) -> str:
        """The block's text with each `old` replaced by `new`; `old` must occur in the block."""
        text = self.text
        for old, new in (replace or {}).items():
            assert old in text, f"{self.where} ({self.label}) no longer says {old!r}; update the test with the doc"
            text = text.replace(old, new)
        return text

    def start(self, cwd: Path, *, replace: dict[str, str] | None = None, env: dict[str, str] | None = None,
              append: str = "") -> subprocess.Popen:
        """Start the block in bash (-e: the first failing command fails it) in `cwd`, output captured as text;
        `append` goes at the end of its last command (extra key=value overrides)."""
        script = self.script(replace).rstrip()
        if append:
            script = f"{script} {append}"
        return subprocess.Popen(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
                                env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})

    def run(self, cwd: Path, *, replace: dict[str, str] | None = None, env: dict[str, str] | None = None,
            append: str = "", timeout: float = 600, expect: int | tuple[int, ...] = 0
            ) -> subprocess.CompletedProcess:
        """Run the block to its end (see `start`); asserts the exit code and returns the completed process."""
        return self.finish(self.start(cwd, replace=replace, env=env, append=append), timeout=timeout, expect=expect)

    def finish(self, process: subprocess.Popen, *, timeout: float = 600, expect: int | tuple[int, ...] = 0
               ) -> subprocess.CompletedProcess:
        """Wait for a started block (killed after `timeout`); asserts the exit code."""
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate()
        allowed = expect if isinstance(expect, tuple) else (expect,)
        assert process.returncode in allowed, (f"{self.where} ({self.label}) exited {process.returncode}:\n"
                                               f"{process.args[-1]}\n{stdout[-3000:]}\n{stderr[-3000:]}")
        return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def documents() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def shell_blocks(document: Path) -> list[DocBlock]:
    """Every fenced shell block of `document`, with the marker of the line above it (if any)."""
    lines = document.read_text(encoding="utf-8").splitlines()
    blocks, index = [], 0
    while index < len(lines):
        opened = FENCE_OPEN.match(lines[index])
        if not opened:
            index += 1
            continue
        end = next(j for j in range(index + 1, len(lines)) if lines[j].strip() == "```")
        if opened.group(2) in SHELL_LANGUAGES:
            previous = next((lines[j] for j in range(index - 1, -1, -1) if lines[j].strip()), "")
            marker = MARKER.match(previous)
            body = textwrap.dedent("\n".join(lines[index + 1:end]))
            blocks.append(DocBlock(document, index + 1, marker.group(1) if marker else None,
                                   marker.group(2) if marker else "", body))
        index = end + 1
    return blocks


def all_blocks() -> list[DocBlock]:
    return [block for document in documents() for block in shell_blocks(document)]


def doc_block(name: str) -> DocBlock:
    """The block marked `<!-- doc-test: name -->` (exactly one in all the documents)."""
    found = [b for b in all_blocks() if b.kind == "doc-test" and b.label == name]
    assert len(found) == 1, f"{len(found)} blocks marked doc-test: {name} in README.md and docs/"
    return found[0]


def doc_workspace(root: Path) -> Path:
    """`root` laid out like a checkout: the repository's code directories linked in, the rest (data/, runs/,
    corpora) the test's own."""
    root.mkdir(parents=True, exist_ok=True)
    for name in CHECKOUT_ENTRIES:
        if not (root / name).exists():
            (root / name).symlink_to(REPO / name)
    return root
