"""Where a fine-tuning run starts: a megatron_narrow pretraining checkpoint or a Hugging Face directory,
read into one form: our model config, our (TP=1) state dict and the tokenizer, plus how to write that
tokenizer beside an export."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from megatron_narrow.config import ModelConfig
from megatron_narrow.data.tokenizer import Tokenizer, load_tokenizer
from megatron_narrow.variants import variant_of_hf_config, variant_spec


@dataclass
class Pretrained:
    config: ModelConfig
    state: dict[str, torch.Tensor]
    """BertForPreTraining's names at TP=1 (bert.*, and cls.* when the source had an MLM head)."""
    tokenizer: Tokenizer
    source: Path
    is_hf_dir: bool
    trust: bool = False

    def save_tokenizer(self, output_dir: Path) -> None:
        """Write the tokenizer as transformers loads it (AutoTokenizer) into output_dir."""
        if self.is_hf_dir:
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(self.source).save_pretrained(output_dir)
            return
        from megatron_narrow.convert.checkpoint import read_checkpoint_info, save_tokenizer

        save_tokenizer(read_checkpoint_info(self.source, trust=self.trust), output_dir)


def model_config_from_hf(config: dict, where: str = "config.json") -> ModelConfig:
    required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "max_position_embeddings")
    missing = [key for key in required if key not in config]
    if missing:
        raise ValueError(f"{where} lacks {missing}: not a BERT config")
    variant = variant_of_hf_config(config)
    if config.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"hidden_act {config['hidden_act']!r}: this model uses erf GELU only")
    return ModelConfig(
        variant=variant, full_length_layers=config.get("full_length_layers", 2),
        vocab_size=config["vocab_size"], hidden_size=config["hidden_size"], num_layers=config["num_hidden_layers"],
        num_heads=config["num_attention_heads"], intermediate_size=config["intermediate_size"],
        max_position_embeddings=config["max_position_embeddings"], type_vocab_size=config.get("type_vocab_size", 2),
        hidden_dropout=config.get("hidden_dropout_prob", 0.1),
        attention_dropout=config.get("attention_probs_dropout_prob", 0.1),
        layer_norm_eps=config.get("layer_norm_eps", 1e-12), initializer_range=config.get("initializer_range", 0.02))


def hf_tokenizer(directory: Path) -> Tokenizer:
    for name in ("tokenizer.json", "vocab.txt"):
        if (directory / name).is_file():
            return load_tokenizer("wordpiece", directory / name)
    raise FileNotFoundError(f"{directory} has neither tokenizer.json nor vocab.txt")


def load_pretrained(init_from: str | Path, trust: bool = False) -> Pretrained:
    """Read a pretraining checkpoint (save_dir or step_ directory) or a Hugging Face BERT/NarrowBERT directory;
    `trust`: a checkpoint's files without the pickle check (train.trust_checkpoint)."""
    from megatron_narrow.formats.hf_bert import check_official_narrow_layers, load_hf_state_dict
    from megatron_narrow.model import BertForPreTraining

    path = Path(init_from)
    if (path / "config.json").is_file():
        config = model_config_from_hf(json.loads((path / "config.json").read_text()), str(path / "config.json"))
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{path} holds no .safetensors weights")
        from safetensors.torch import load_file

        hf_state = {}
        for file in files:
            hf_state.update(load_file(str(file)))
        if any(key.startswith("classifier.") for key in hf_state):
            raise ValueError(f"{path} is a fine-tuned classifier; start from a pretrained (masked-LM or base) model")
        check_official_narrow_layers(hf_state, config, path)
        model = BertForPreTraining(config, pair_head=True)  # with a pooler, to keep a pretrained one
        try:
            missing = load_hf_state_dict(model, hf_state)
        except KeyError as error:
            raise ValueError(f"{path}: {error.args[0]}") from None
        state = {k: v for k, v in model.state_dict().items() if k not in missing}  # only what the source had
        return Pretrained(config, state, hf_tokenizer(path), path, is_hf_dir=True)

    from megatron_narrow.convert.checkpoint import load_merged_model, read_checkpoint_info, tokenizer_source

    info = read_checkpoint_info(path, trust=trust)
    source = tokenizer_source(info)
    if source is None:
        raise ValueError(f"{info.path}: the pretraining run named no train.tokenizer_model, so its tokenizer is "
                         "unknown")
    config = info.model_config
    config = replace(config, variant=variant_spec(config.variant).trained_model)  # token_drop trains BERT
    state = load_merged_model(info).state_dict()
    state.pop("bert.token_importance.importance", None)
    return Pretrained(config, state, load_tokenizer(*source), info.path, is_hf_dir=False, trust=trust)

