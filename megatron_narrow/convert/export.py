"""Export trained models as Hugging Face directories: BertForPreTraining as a masked LM, and the fine-tuned
sequence and token classifiers.

bert and token_drop become a stock BertForMaskedLM (token dropping changes training only: its trained
model is plain BERT, so the importance vector is left behind). narrow becomes NarrowBertForMaskedLM,
whose modelling files are saved beside the weights (`auto_map`; load with `trust_remote_code=True`), in the
official NarrowBERT layout: `model_type: bert` with `full_length_layers` (so AutoTokenizer needs no remote
code) and the narrow layers in `bert.encoder_narrow` (so a plain BertModel reports them missing).
The pooler and NSP/SOP head, when present, have no place in a masked-LM model and are not exported.
Classifiers: bert becomes a stock BertForSequenceClassification / BertForTokenClassification; narrow
becomes NarrowBertForSequenceClassification / NarrowBertForTokenClassification (remote code, [CLS] or the
tagged positions as its only query rows), so that `pipeline("text-classification", model=DIR,
trust_remote_code=True)` works. Labels go to the config's id2label / label2id.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import transformers
from torch import nn
from transformers import BertConfig, PreTrainedModel

from megatron_narrow.config import ModelConfig
from megatron_narrow.convert import hf_narrow
from megatron_narrow.formats.hf_bert import NO_HF_COUNTERPART, to_hf_state_dict, to_official_narrow_layout
from megatron_narrow.model import BertForPreTraining
from megatron_narrow.model import BertForSequenceClassification as OurSequenceClassifier
from megatron_narrow.variants import variant_spec

_NOT_IN_MASKED_LM = ("bert.pooler.", "cls.seq_relationship.")


def hf_class(variant: str, suffix: str) -> type:
    """The Hugging Face class of `variant` named `{prefix}{suffix}` (suffix Config, ForMaskedLM,
    ForSequenceClassification or ForTokenClassification): transformers' own, or our shipped modelling code."""
    spec = variant_spec(variant)
    return getattr(hf_narrow if spec.hf_remote_code else transformers, spec.hf_class_prefix + suffix)


def hf_config_from_model_config(config: ModelConfig, **overrides) -> BertConfig:
    """The HF config of our model (the variant's config class, with its marking key); `overrides` go to the
    HF config."""
    fields = dict(
        vocab_size=config.vocab_size,  # the real vocabulary: our padding rows are stripped on export
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        intermediate_size=config.intermediate_size,
        hidden_act="gelu",  # erf GELU, as ours
        hidden_dropout_prob=config.hidden_dropout,
        attention_probs_dropout_prob=config.attention_dropout,
        max_position_embeddings=config.max_position_embeddings,
        type_vocab_size=config.type_vocab_size,
        initializer_range=config.initializer_range,
        layer_norm_eps=config.layer_norm_eps,
        tie_word_embeddings=True,
    )
    fields.update(overrides)
    key = variant_spec(config.variant).hf_config_key
    if key is not None:
        fields[key] = getattr(config, key)
    return hf_class(config.variant, "Config")(**fields)


def export_to_hf(model: BertForPreTraining, output_dir: str | Path, *,
                 tokenizer_files: list[str | Path] | None = None) -> Path:
    """Write `model` (TP=1, or merged into a TP=1 model) to `output_dir` as safetensors + config.

    Returns the directory; `AutoModelForMaskedLM.from_pretrained` loads it (narrow: trust_remote_code=True).
    """
    _require_tp1(model)
    config = model.bert.config
    hf_config = hf_config_from_model_config(config)
    state = {k: v for k, v in to_hf_state_dict(model.state_dict(), config.vocab_size).items()
             if not k.startswith(_NOT_IN_MASKED_LM)}
    output_dir = _save(hf_class(config.variant, "ForMaskedLM"), hf_config, state, config, output_dir,
                       "AutoModelForMaskedLM")  # model.safetensors + config.json
    for file in tokenizer_files or []:
        shutil.copy2(file, output_dir / Path(file).name)
    return output_dir


def _require_tp1(model: nn.Module) -> None:
    tp = model.bert.groups.tensor.size
    if tp != 1:
        raise ValueError(f"export needs a TP=1 model, got tensor_parallel={tp}: merge the shards first "
                         "(merge_tensor_parallel) and load them into a TP=1 model")


def export_classifier_to_hf(model: nn.Module, output_dir: str | Path, labels: list[str], *,
                           task_settings: dict | None = None) -> Path:
    """Write our BertForSequenceClassification / BertForTokenClassification (TP=1) with its label names;
    `task_settings` (e.g. finetune_max_seq_len) are recorded in config.json for tools/predict.py."""
    _require_tp1(model)
    config = model.bert.config
    sequence = isinstance(model, OurSequenceClassifier)
    hf_config = hf_config_from_model_config(config, num_labels=len(labels), id2label=dict(enumerate(labels)),
                                            label2id={label: i for i, label in enumerate(labels)},
                                            **(task_settings or {}))
    own = model.state_dict()
    encoder = {k: v for k, v in own.items() if k.startswith("bert.") and k not in NO_HF_COUNTERPART}
    state = to_hf_state_dict(encoder, config.vocab_size)
    state["classifier.weight"], state["classifier.bias"] = own["head.classifier.weight"], own["head.classifier.bias"]
    head = "ForSequenceClassification" if sequence else "ForTokenClassification"
    return _save(hf_class(config.variant, head), hf_config, state, config, output_dir, f"AutoModel{head}")


def _save(model_class: type[PreTrainedModel], hf_config: BertConfig, state: dict[str, torch.Tensor],
          config: ModelConfig, output_dir: str | Path, auto_class: str) -> Path:
    """`state` (Hugging Face BERT keys) as a `model_class` in `output_dir`. Remote code is registered for
    its Auto classes (so config.json gets an auto_map and the modelling files are copied) and takes the
    official layout."""
    if variant_spec(config.variant).hf_remote_code:
        state = to_official_narrow_layout(state, config.full_length_layers)
        type(hf_config).register_for_auto_class()
        model_class.register_for_auto_class(auto_class)
    hf_model = model_class(hf_config)
    hf_model.load_state_dict(state, strict=True)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    hf_model.save_pretrained(output_dir)
    return output_dir
