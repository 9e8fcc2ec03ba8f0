"""The variant registry (megatron_narrow/variants.py) is the one place a variant is defined: the roles give
the walk, the pipeline state, the cost model and the importance vector; a variant added there alone trains
under PP=2 with the losses of the built-in variant it equals."""

from __future__ import annotations

import pytest

from megatron_narrow.config import ModelConfig
from megatron_narrow.model.costs import layer_costs
from megatron_narrow.model.encoder import state_fields
from megatron_narrow.variants import VARIANTS, VariantSpec, layer_roles, variant_spec

from .runs import losses, pretrain_argv, run_to_end


def _late_narrow_roles(config: ModelConfig) -> tuple[str, ...]:
    """Only the last layer narrow: NarrowBERT with full_length_layers = num_layers - 1, defined independently."""
    return ("full",) * (config.num_layers - 1) + ("narrow",)


LATE_NARROW = VariantSpec("late_narrow", "late NarrowBERT", _late_narrow_roles, trained_model="late_narrow")


def test_roles_of_the_built_in_variants():
    config = dict(vocab_size=100, hidden_size=32, num_layers=6, num_heads=2, full_length_layers=2)
    assert layer_roles(ModelConfig(**config)) == ("full",) * 6
    assert layer_roles(ModelConfig(**config, variant="narrow")) == ("full", "full") + ("narrow",) * 4
    assert layer_roles(ModelConfig(**config, variant="token_drop")) == (
        "full", "full", "transition", "kept", "kept", "rejoin")
    with pytest.raises(ValueError, match="model.variant must be one of bert, narrow, token_drop, got 'wide'"):
        variant_spec("wide")


def test_a_registered_variant_is_known_everywhere(monkeypatch):
    monkeypatch.setitem(VARIANTS, LATE_NARROW.name, LATE_NARROW)
    ours = ModelConfig(vocab_size=100, hidden_size=32, num_layers=4, num_heads=2, variant="late_narrow")
    same = ModelConfig(vocab_size=100, hidden_size=32, num_layers=4, num_heads=2, variant="narrow",
                       full_length_layers=3)
    assert layer_costs(ours, 64, 10) == layer_costs(same, 64, 10)
    assert [state_fields(ours, i) for i in range(5)] == [state_fields(same, i) for i in range(5)]


def register_late_narrow() -> None:
    """In a rank, before the entry point: the extra variant is known there (registered in that process only)."""
    from megatron_narrow import variants

    variants.VARIANTS[LATE_NARROW.name] = LATE_NARROW


def test_a_variant_added_through_the_registry_alone_trains_under_pp2(tmp_path, tiny_corpus_data):
    from .conftest import REPO

    settings = {"parallel.pipeline_parallel": "2", "train.train_steps": "2", "train.global_batch_size": "16",
                "model.hidden_dropout": "0.0", "model.attention_dropout": "0.0", "train.save_interval": "0"}
    zero1 = str(REPO / "ds_configs/zero1.json")
    run_to_end(pretrain_argv(tiny_corpus_data, tmp_path / "narrow", "narrow", ds_config=zero1, **settings,
                             **{"model.full_length_layers": "3"}), world=2)
    run_to_end(pretrain_argv(tiny_corpus_data, tmp_path / "late", "late_narrow", ds_config=zero1, **settings),
               world=2, before_main=register_late_narrow)
    expected, got = losses(tmp_path / "narrow"), losses(tmp_path / "late")
    assert sorted(got) == [1, 2] and got == expected
