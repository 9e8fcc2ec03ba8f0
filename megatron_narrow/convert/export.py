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

from torch import nn
from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification, BertForTokenClassification

from megatron_narrow.config import ModelConfig
from megatron_narrow.convert.hf_narrow import (
    NarrowBertConfig,
    NarrowBertForMaskedLM,
    NarrowBertForSequenceClassification,
    NarrowBertForTokenClassification,
)
from megatron_narrow.formats.hf_bert import NO_HF_COUNTERPART, to_hf_state_dict, to_official_narrow_layout
from megatron_narrow.model import BertForPreTraining
from megatron_narrow.model import BertForSequenceClassification as OurSequenceClassifier
from megatron_narrow.variants import variant_spec

_NOT_IN_MASKED_LM = ("bert.pooler.", "cls.seq_relationship.")


def hf_config_from_model_config(config: ModelConfig, **overrides) -> BertConfig:
    """The HF config of our model (NarrowBertConfig for variant narrow); `overrides` go to the HF config."""
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
    if variant_spec(config.variant).hf_remote_code:
        return NarrowBertConfig(full_length_layers=config.full_length_layers, **fields)
    return BertConfig(**fields)


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
    if variant_spec(config.variant).hf_remote_code:
        state = to_official_narrow_layout(state, config.full_length_layers)
        NarrowBertConfig.register_for_auto_class()
        NarrowBertForMaskedLM.register_for_auto_class("AutoModelForMaskedLM")
        hf_model = NarrowBertForMaskedLM(hf_config)
    else:
        hf_model = BertForMaskedLM(hf_config)
    hf_model.load_state_dict(state, strict=True)

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    hf_model.save_pretrained(output_dir)  # model.safetensors + config.json
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
    if variant_spec(config.variant).hf_remote_code:
        state = to_official_narrow_layout(state, config.full_length_layers)
        kind = NarrowBertForSequenceClassification if sequence else NarrowBertForTokenClassification
        NarrowBertConfig.register_for_auto_class()
        kind.register_for_auto_class("AutoModelForSequenceClassification" if sequence
                                     else "AutoModelForTokenClassification")
    else:
        kind = BertForSequenceClassification if sequence else BertForTokenClassification
    hf_model = kind(hf_config)
    hf_model.load_state_dict(state, strict=True)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    hf_model.save_pretrained(output_dir)
    return output_dir
