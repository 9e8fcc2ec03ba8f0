"""The config reference (docs/config.md), rendered from the config dataclasses: every key with its default
and the docstring under its field, so the documentation cannot drift from the code
(tests/test_config.py fails when docs/config.md is stale; `python -m megatron_narrow.config_reference`
rewrites it)."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import sys
from pathlib import Path

from megatron_narrow.config import DataConfig, ModelConfig, ParallelConfig, TrainConfig
from megatron_narrow.tasks.config import FinetuneConfig, FinetuneModelConfig, TaskConfig

PRETRAINING = (("model", ModelConfig), ("data", DataConfig), ("parallel", ParallelConfig), ("train", TrainConfig))
FINETUNING = (("task", TaskConfig), ("model", FinetuneModelConfig))
OUTPUT = Path(__file__).resolve().parents[1] / "docs" / "config.md"


def field_docstrings(cls: type) -> dict[str, str]:
    """name -> the string literal right under the field's annotation in the class body."""
    body = ast.parse(inspect.getsource(cls)).body[0].body
    docs = {}
    for node, following in zip(body, body[1:], strict=False):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def _default(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        return repr(field.default)
    if field.default_factory is not dataclasses.MISSING:
        return repr(field.default_factory())
    return "required"


def section_table(section: str, cls: type) -> list[str]:
    docs = field_docstrings(cls)
    lines = [f"### {section}", "", "| key | default | meaning |", "|---|---|---|"]
    for field in dataclasses.fields(cls):
        meaning = docs.get(field.name, "").replace("|", "\\|")
        lines.append(f"| `{section}.{field.name}` | `{_default(field)}` | {meaning} |")
    return [*lines, ""]


def render() -> str:
    lines = ["# Config reference", "",
             "Generated from the config dataclasses by `python -m megatron_narrow.config_reference`; a test fails "
             "when this file is stale. Every key can be set in the YAML (`--config`) or on the command line as "
             "`section.key=value`.", "",
             "## Pretraining (`megatron_narrow/pretrain.py`)", ""]
    for section, cls in PRETRAINING:
        lines += section_table(section, cls)
    pretraining_train = dataclasses.asdict(TrainConfig())
    changed = ", ".join(f"`train.{key}={value!r}`" for key, value in dataclasses.asdict(FinetuneConfig().train).items()
                        if pretraining_train[key] != value)
    lines += ["## Fine-tuning (`megatron_narrow/finetune.py`)", "",
              f"The `train` section is the pretraining one above, with other defaults for {changed}.", ""]
    for section, cls in FINETUNING:
        lines += section_table(section, cls)
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    OUTPUT.parent.mkdir(exist_ok=True)
    OUTPUT.write_text(render())
    print(f"wrote {OUTPUT}", file=sys.stderr)
