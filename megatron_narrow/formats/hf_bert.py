"""Hugging Face BERT state dicts <-> ours: a declarative key map (padding and TP slicing are parallel/shards.py's).

Our modules use Hugging Face's names, so the map is short (the official NarrowBERT layout, with its narrow
layers in a second stack, is renumbered into ours on the way in): HF BertModel keys have no "bert." prefix,
the MLM decoder is tied to the word embeddings (its weight is never stored on our side, and HF's
`cls.predictions.decoder.bias` is the same tensor as `cls.predictions.bias`), the importance vector of
token dropping has no HF counterpart, and our vocabulary rows are padded to a multiple of 128 x TP.
Tensor-parallel parameters carry `tensor_parallel_dim`; parallel/shards.py slices and merges by it, so no
table of split dimensions is kept by hand. Read by training (train.init_from_hf), fine-tuning and conversion.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from megatron_narrow.config import ModelConfig
from megatron_narrow.parallel import refit_vocab_rows, split_for_rank, tensor_parallel_dims
from megatron_narrow.variants import layer_roles, variant_of_hf_config

# Keys inside bert.encoder.layer.N, and outside the layers; HF uses the same names (with "bert." for heads).
_LAYER_KEYS = [
    "attention.self.query.weight", "attention.self.query.bias",
    "attention.self.key.weight", "attention.self.key.bias",
    "attention.self.value.weight", "attention.self.value.bias",
    "attention.output.dense.weight", "attention.output.dense.bias",
    "attention.output.LayerNorm.weight", "attention.output.LayerNorm.bias",
    "intermediate.dense.weight", "intermediate.dense.bias",
    "output.dense.weight", "output.dense.bias",
    "output.LayerNorm.weight", "output.LayerNorm.bias",
]
_FIXED_KEYS = [
    "bert.embeddings.word_embeddings.weight",
    "bert.embeddings.position_embeddings.weight",
    "bert.embeddings.token_type_embeddings.weight",
    "bert.embeddings.LayerNorm.weight",
    "bert.embeddings.LayerNorm.bias",
    "bert.pooler.dense.weight",
    "bert.pooler.dense.bias",
    "cls.predictions.transform.dense.weight",
    "cls.predictions.transform.dense.bias",
    "cls.predictions.transform.LayerNorm.weight",
    "cls.predictions.transform.LayerNorm.bias",
    "cls.predictions.bias",
    "cls.seq_relationship.weight",
    "cls.seq_relationship.bias",
]
VOCAB_ROWS = ("bert.embeddings.word_embeddings.weight", "cls.predictions.bias")
NO_HF_COUNTERPART = ("bert.token_importance.importance",)
_HF_ALIASES = {"cls.predictions.decoder.bias": "cls.predictions.bias"}
_HF_IGNORED = re.compile(r"(position_ids|cls\.predictions\.decoder\.weight)$")  # buffers; the tied decoder
_LAYER = re.compile(r"^bert\.encoder\.layer\.(\d+)\.(.+)$")
_OFFICIAL_NARROW_LAYER = re.compile(r"^(bert\.)?encoder_narrow\.layer\.(\d+)\.(.+)$")
_OFFICIAL_FULL_LAYER = re.compile(r"^(bert\.)?encoder\.layer\.(\d+)\.")


def official_full_length_layers(hf_state: dict[str, torch.Tensor]) -> int | None:
    """F of a state dict in the official NarrowBERT layout (lihaoxin2020/narrowbert), which keeps its
    full-length layers in `bert.encoder.layer.0..F-1` and its narrow layers in a second stack,
    `bert.encoder_narrow.layer.0..L-F-1`; None for any other layout."""
    if not any(_OFFICIAL_NARROW_LAYER.match(key) for key in hf_state):
        return None
    full = {int(m.group(2)) for key in hf_state if (m := _OFFICIAL_FULL_LAYER.match(key))}
    if full != set(range(len(full))):
        raise ValueError(f"official NarrowBERT weights with full-length layers {sorted(full)}: expected 0..F-1")
    return len(full)


def check_official_narrow_layers(hf_state: dict[str, torch.Tensor], config: ModelConfig, where: object) -> None:
    """Official NarrowBERT weights hold F full-length layers by their keys; a config that says otherwise would
    run a narrow layer as a full one (or the reverse) with no error anywhere else."""
    full = official_full_length_layers(hf_state)
    if full is None:
        return
    roles = layer_roles(config)
    if roles != ("full",) * full + ("narrow",) * (len(roles) - full):
        variant = variant_of_hf_config({"full_length_layers": full})  # the variant whose official code this is
        raise ValueError(f"{where}: official NarrowBERT weights with {full} full-length layers, but the model is "
                         f"variant={config.variant} with full_length_layers={config.full_length_layers}; set "
                         f"model.variant={variant} model.full_length_layers={full}")


def from_official_narrow_layout(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our single stack from the official layout: narrow layer j becomes layer F + j, F read from the keys
    themselves. Any other state dict is returned unchanged."""
    full = official_full_length_layers(hf_state)
    if full is None:
        return hf_state
    out = {}
    for key, value in hf_state.items():
        match = _OFFICIAL_NARROW_LAYER.match(key)
        if match:
            key = f"{match.group(1) or ''}encoder.layer.{full + int(match.group(2))}.{match.group(3)}"
        out[key] = value
    return out


def to_official_narrow_layout(hf_state: dict[str, torch.Tensor], full_length_layers: int) -> dict[str, torch.Tensor]:
    """The official layout from our single stack (the inverse of from_official_narrow_layout): layer F + j
    becomes `bert.encoder_narrow.layer.j`. Exports use it, so that they load in the official code, and so that
    a plain BertModel loaded from them reports the narrow layers missing instead of running them as full ones."""
    out = {}
    for key, value in hf_state.items():
        match = _LAYER.match(key)
        if match and int(match.group(1)) >= full_length_layers:
            key = f"bert.encoder_narrow.layer.{int(match.group(1)) - full_length_layers}.{match.group(2)}"
        out[key] = value
    return out


def _known(key: str) -> bool:
    match = _LAYER.match(key)
    return key in _FIXED_KEYS or (match is not None and match.group(2) in _LAYER_KEYS)


def _normalise_hf(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF keys of BertModel, BertForMaskedLM or BertForPreTraining, as our (bert.-prefixed) keys."""
    decoder = hf_state.get("cls.predictions.decoder.weight")
    words = hf_state.get("bert.embeddings.word_embeddings.weight")
    if decoder is not None and words is not None and not torch.equal(decoder, words):
        raise ValueError("this checkpoint's MLM decoder is not tied to its word embeddings; BERT ties them "
                         "and so do we, so its decoder weights would be lost")
    out = {}
    for key, value in from_official_narrow_layout(hf_state).items():
        if _HF_IGNORED.search(key):
            continue
        key = _HF_ALIASES.get(key, key)
        if not key.startswith(("bert.", "cls.")):
            key = "bert." + key
        key = key.replace(".gamma", ".weight").replace(".beta", ".bias")  # TF-era LayerNorm names
        out[key] = value
    return out


def from_hf_state_dict(hf_state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """A state dict for `model` (this rank's TP shards, padded vocabulary) from an HF BERT state dict.

    Raises if HF holds a tensor that has no place here or a shape that does not fit. Tensors the
    model has but HF lacks (the MLM head of a BertModel checkpoint) are left out of the result."""
    return hf_to_shards(hf_state, model.state_dict(), tensor_parallel_dims(model), _tp_size(model), _tp_rank(model))


def hf_to_shards(hf_state: dict[str, torch.Tensor], target: dict[str, torch.Tensor], dims: dict[str, int],
                 tp_size: int, tp_rank: int) -> dict[str, torch.Tensor]:
    """from_hf_state_dict for any holder of our names: `target` (name -> this rank's tensor) says which
    tensors to make and their shapes, `dims` which are split over the TP ranks and along which dimension."""
    source = _normalise_hf(hf_state)
    unknown = sorted(k for k in source if not _known(k))
    if unknown:
        raise KeyError(f"Hugging Face tensors with no counterpart here: {unknown[:5]}")
    out: dict[str, torch.Tensor] = {}
    for key, mine in target.items():
        if key in NO_HF_COUNTERPART or key not in source:
            continue
        full = source[key].to(mine.dtype)
        if key in VOCAB_ROWS:
            full = refit_vocab_rows(full, full.shape[0], mine.shape[0] * tp_size)
        if key in dims:
            full = split_for_rank(full, dims[key], tp_size, tp_rank)
        if full.shape != mine.shape:
            raise ValueError(f"{key}: Hugging Face shape {tuple(source[key].shape)} does not fit ours "
                             f"{tuple(mine.shape)}")
        out[key] = full.clone()
    return out


def load_hf_into_pipeline(pipe: nn.Module, hf_state: dict[str, torch.Tensor]) -> list[str]:
    """Load HF weights into this stage of a BertPipeline (both copies of the tied word embeddings get them);
    returns our names that HF did not provide."""
    from megatron_narrow.model.pipeline import model_key

    config, groups = pipe.config, pipe.groups
    target, dims, owners = {}, {}, []
    for item, module in pipe.items():
        for name, tensor in module.state_dict().items():
            target[model_key(config, item, name)] = tensor
        for name, dim in tensor_parallel_dims(module).items():
            dims[model_key(config, item, name)] = dim
        owners.append((item, module))
    converted = hf_to_shards(hf_state, target, dims, groups.tensor.size, groups.tensor.rank)
    for item, module in owners:
        own = {name: converted[key] for name in module.state_dict()
               if (key := model_key(config, item, name)) in converted}
        module.load_state_dict(own, strict=False)
    return sorted(k for k in target if k not in converted and k not in NO_HF_COUNTERPART)


def load_hf_state_dict(model: nn.Module, hf_state: dict[str, torch.Tensor]) -> list[str]:
    """Load HF weights into `model`; returns our keys that HF did not provide (e.g. a fresh head)."""
    converted = from_hf_state_dict(hf_state, model)
    missing = model.load_state_dict(converted, strict=False).missing_keys
    return [k for k in missing if k not in NO_HF_COUNTERPART]


def to_hf_state_dict(full_state: dict[str, torch.Tensor], vocab_size: int) -> dict[str, torch.Tensor]:
    """An HF BertForMaskedLM/BertForPreTraining state dict from our merged (TP=1) state dict.

    Vocabulary padding is stripped, the tied decoder weight and bias are written out as HF expects,
    and buffers without an HF counterpart are dropped."""
    out = {}
    for key, value in full_state.items():
        if key in NO_HF_COUNTERPART:
            continue
        if not _known(key):
            raise KeyError(f"{key} has no Hugging Face counterpart")
        if key in VOCAB_ROWS:
            value = value[:vocab_size]
        out[key] = value.contiguous()
    if "cls.predictions.bias" in out:
        out["cls.predictions.decoder.weight"] = out["bert.embeddings.word_embeddings.weight"]
        out["cls.predictions.decoder.bias"] = out["cls.predictions.bias"]
    return out


def _tp_size(model: nn.Module) -> int:
    return _groups(model).tensor.size


def _tp_rank(model: nn.Module) -> int:
    return _groups(model).tensor.rank


def _groups(model: nn.Module):
    for module in model.modules():
        groups = getattr(module, "groups", None)
        if groups is not None:
            return groups
    raise ValueError("model has no process groups (expected a megatron_narrow model)")
