"""Config validation: one clear line naming the field and its value, before any compute."""

from __future__ import annotations

import pytest

from megatron_narrow.config import DataConfig, ModelConfig, ParallelConfig


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: ModelConfig(hidden_size=100, num_heads=12), "hidden_size=100 is not divisible by model.num_heads=12"),
        (lambda: ModelConfig(num_layers=4, full_length_layers=5), "full_length_layers=5 is out of range"),
        (lambda: ModelConfig(full_length_layers=-1), "full_length_layers=-1 is out of range"),
        (lambda: ModelConfig(token_drop_keep_ratio=0.0), "token_drop_keep_ratio must be in \\(0, 1\\], got 0.0"),
        (lambda: ModelConfig(token_drop_keep_ratio=1.5), "token_drop_keep_ratio must be in \\(0, 1\\], got 1.5"),
        (lambda: ModelConfig(variant="wide"), "model.variant must be one of bert, narrow, token_drop, got 'wide'"),
        (lambda: ModelConfig(num_heads=12).validate(tensor_parallel=5), "num_heads=12 is not divisible by "
                                                                      "parallel.tensor_parallel=5"),
        (lambda: ModelConfig().validate(seq_len=128, max_predictions=200), "max_predictions=200 is more targets "
                                                                            "than seq_len=128"),
        (lambda: ModelConfig().validate(seq_len=1024), "seq_len=1024 exceeds model.max_position_embeddings=512"),
        (lambda: DataConfig(seq_len=128, max_predictions=129), "max_predictions must be in \\[1, seq_len=128\\]"),
        (lambda: DataConfig(split="a,b"), "data.split must be comma-separated numbers"),
        (lambda: ParallelConfig(tensor_parallel=3).resolve(8), "world size 8 is not divisible by tensor_parallel=3"),
    ],
)
def test_bad_configs_are_refused_in_one_line(build, message):
    with pytest.raises(ValueError, match=message) as error:
        build()
    assert "\n" not in str(error.value)


def test_derived_values():
    config = ModelConfig(hidden_size=256, num_heads=4)
    assert config.intermediate_size == 1024 and config.head_dim == 64
    assert config.kept_tokens(512) == 256
    assert ModelConfig(token_drop_keep_tokens=100).kept_tokens(512) == 100
    assert ParallelConfig(tensor_parallel=2, pipeline_parallel=2).resolve(8).data_parallel == 2


@pytest.mark.parametrize("name", ["bert_base", "narrowbert_base", "tokendrop_base", "tiny_cpu"])
def test_example_configs_load_and_validate(name):
    from megatron_narrow.config import load_run_config

    from .conftest import REPO

    run = load_run_config(str(REPO / "examples/configs" / f"{name}.yaml"), ["train.lr=3e-4"])
    run.model.validate(tensor_parallel=1, seq_len=run.data.seq_len, max_predictions=run.data.max_predictions)
    assert run.train.lr == 3e-4
    assert run.train.gradient_accumulation(data_parallel=1) >= 1
    if name.endswith("_base"):
        assert (run.model.hidden_size, run.model.num_layers, run.model.num_heads) == (768, 12, 12)


def test_unknown_keys_and_bad_values_are_named():
    from megatron_narrow.config import load_run_config

    with pytest.raises(ValueError, match="unknown key\\(s\\) train.learning_rate"):
        load_run_config(None, ["train.learning_rate=1"])
    with pytest.raises(ValueError, match="train.lr must be a number, got 'fast'"):
        load_run_config(None, ["train.lr=fast"])
    with pytest.raises(ValueError, match="must look like section.key=value"):
        load_run_config(None, ["lr=1"])


@pytest.mark.parametrize(("name", "kind"), [("finetune_classification", "sequence"), ("finetune_ner", "token")])
def test_finetune_example_configs_load(name, kind):
    from megatron_narrow.tasks.config import load_finetune_config

    from .conftest import REPO

    run = load_finetune_config(str(REPO / "examples/configs" / f"{name}.yaml"), ["train.lr=1e-5"])
    assert run.task.kind == kind and run.train.lr == 1e-5 and run.model.init_from
    assert run.train.gradient_accumulation(data_parallel=1) >= 1
    with pytest.raises(ValueError, match="unknown key"):
        load_finetune_config(str(REPO / "examples/configs" / f"{name}.yaml"), ["task.lables=[a]"])


def test_config_reference_is_current():
    """docs/config.md is rendered from the dataclasses' field docstrings; regenerate it with
    `python -m megatron_narrow.config_reference` after changing a config field."""
    from megatron_narrow.config_reference import OUTPUT, render

    assert OUTPUT.read_text() == render(), "docs/config.md is stale: run python -m megatron_narrow.config_reference"
    assert "| `train.optimizer` | `'adamw'` |" in OUTPUT.read_text()
