"""The variants, each stated once: which role every encoder layer plays, and the facts that the rest of the
code (encoder walk, pipeline state, cost model, token importance, export, fine-tuning, model card) reads.

Roles of a layer:
- full: queries for every position (or kept row), keys and values from the same rows;
- narrow: queries for the query positions only, keys and values from the fixed context C (NarrowBERT);
- transition: queries for the kept tokens, keys and values from all tokens (token dropping picks them here);
- kept: the kept tokens only;
- rejoin: the dropped tokens' states come back, then a full layer.

A leaf module (no torch, nothing of ours) so that configuration can validate a variant name. Adding a
variant is one entry in VARIANTS (and its tests), as long as its roles follow the walk's grammar:
full* (narrow+ | transition kept* rejoin)?.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from megatron_narrow.config import ModelConfig

Role = Literal["full", "narrow", "transition", "kept", "rejoin"]


@dataclass(frozen=True)
class VariantSpec:
    name: str
    title: str
    """How a model card names it."""
    roles: Callable[[ModelConfig], tuple[Role, ...]]
    """One role per encoder layer."""
    trained_model: str
    """The variant a fine-tuned or exported model of it runs as (token dropping is a pretraining schedule: BERT)."""
    hf_class_prefix: str = "Bert"
    """Its Hugging Face classes are `{prefix}Config`, `{prefix}ForMaskedLM`, `{prefix}ForSequenceClassification`
    and `{prefix}ForTokenClassification`."""
    hf_remote_code: bool = False
    """Those classes are our modelling code, saved beside the weights (`trust_remote_code=True`), not
    transformers' own; such an export keeps the official code's layout (layers split into two stacks)."""
    hf_model_type: str = "bert"
    """The `model_type` of its Hugging Face config.json."""
    hf_config_key: str | None = None
    """A config.json key that marks it whatever the model_type says (the official NarrowBERT code writes
    model_type bert with full_length_layers); the ModelConfig field of the same name is written there."""
    min_layers: int = 1


def _bert_roles(config: ModelConfig) -> tuple[Role, ...]:
    return ("full",) * config.num_layers


def _narrow_roles(config: ModelConfig) -> tuple[Role, ...]:
    return tuple("full" if i < config.full_length_layers else "narrow" for i in range(config.num_layers))


def _token_drop_roles(config: ModelConfig) -> tuple[Role, ...]:
    """Hou et al.: layers 0..L/2-2 full, L/2-1 the transition, then kept-only layers, the last one rejoins."""
    n = config.num_layers
    transition = n // 2 - 1
    return tuple("full" if i < transition else "transition" if i == transition else "rejoin" if i == n - 1
                 else "kept" for i in range(n))


VARIANTS: dict[str, VariantSpec] = {
    "bert": VariantSpec("bert", "BERT", _bert_roles, trained_model="bert"),
    "narrow": VariantSpec("narrow", "NarrowBERT", _narrow_roles, trained_model="narrow",
                          hf_class_prefix="NarrowBert", hf_remote_code=True, hf_model_type="narrow_bert",
                          hf_config_key="full_length_layers"),
    "token_drop": VariantSpec("token_drop", "BERT (pretrained with token dropping)", _token_drop_roles,
                              trained_model="bert", min_layers=3),
}


def variant_spec(name: str) -> VariantSpec:
    """The spec of variant `name`; a one-line ValueError naming the known ones otherwise."""
    if name not in VARIANTS:
        raise ValueError(f"model.variant must be one of {', '.join(VARIANTS)}, got {name!r}")
    return VARIANTS[name]


def trained_variant(name: str) -> str:
    """`name` when a model of it can be fine-tuned or exported as it is; a one-line ValueError otherwise."""
    spec = variant_spec(name)
    if spec.trained_model != spec.name:
        raise ValueError(f"model.variant={name}: {spec.title} is a pretraining schedule; a model of it runs as "
                         f"model.variant={spec.trained_model}")
    return name


def variant_of_hf_config(config: dict) -> str:
    """The variant a Hugging Face config.json describes: the one whose marking key it holds, else the one of
    its model_type (token dropping leaves no trace in a model: its exports are BERT's)."""
    trained = [spec for spec in VARIANTS.values() if spec.trained_model == spec.name]
    for spec in trained:
        if spec.hf_config_key is not None and spec.hf_config_key in config:
            return spec.name
    kind = config.get("model_type", "bert")
    for spec in trained:
        if spec.hf_model_type == kind:
            return spec.name
    raise ValueError(f"model_type {kind!r} is not BERT (expected {' or '.join(s.hf_model_type for s in trained)})")


def layer_roles(config: ModelConfig) -> tuple[Role, ...]:
    return variant_spec(config.variant).roles(config)


def drops_tokens(config: ModelConfig) -> bool:
    """Whether the variant keeps a token-importance vector and drops tokens (it has a transition layer)."""
    return "transition" in layer_roles(config)
