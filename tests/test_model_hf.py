"""BERT maths against Hugging Face on real weights (all-MiniLM-L6-v2), and NarrowBERT against an
independent reference built from Hugging Face's own layer modules."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_narrow.config import ModelConfig
from megatron_narrow.formats.hf_bert import load_hf_state_dict, to_hf_state_dict
from megatron_narrow.model import BertForPreTraining, BertModel

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Tensor parallelism splits attention heads across ranks.",
    "Short one.",
    "NarrowBERT computes queries only for the positions that need an output, which saves most of the work.",
]


@pytest.fixture(scope="module")
def hf_model(minilm_dir):
    from transformers import BertModel as HFBertModel

    model = HFBertModel.from_pretrained(str(minilm_dir), attn_implementation="eager")
    return model.eval()


@pytest.fixture(scope="module")
def batch(minilm_dir):
    from transformers import BertTokenizerFast

    tokenizer = BertTokenizerFast.from_pretrained(str(minilm_dir))
    encoded = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    assert (encoded["attention_mask"] == 0).any(), "the batch must contain padding"
    return encoded


def config_of(hf_model, **overrides) -> ModelConfig:
    c = hf_model.config
    settings = dict(vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_layers=c.num_hidden_layers,
                    num_heads=c.num_attention_heads, intermediate_size=c.intermediate_size,
                    max_position_embeddings=c.max_position_embeddings, type_vocab_size=c.type_vocab_size,
                    layer_norm_eps=c.layer_norm_eps, hidden_dropout=0.0, attention_dropout=0.0)
    settings.update(overrides)
    return ModelConfig(**settings)


def ours_from_hf(hf_model, **overrides) -> BertForPreTraining:
    model = BertForPreTraining(config_of(hf_model, **overrides)).eval()
    missing = load_hf_state_dict(model, hf_model.state_dict())
    assert all(k.startswith("cls.") for k in missing), missing  # MiniLM ships no MLM head
    return model


def real_positions(mask: torch.Tensor) -> torch.Tensor:
    return mask.bool().unsqueeze(-1)


def test_bert_last_hidden_state_equals_hugging_face(hf_model, batch):
    ours = ours_from_hf(hf_model)
    with torch.no_grad():
        expected = hf_model(**batch).last_hidden_state
        got = ours.bert(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    real = real_positions(batch["attention_mask"])
    diff = ((got - expected).abs() * real).max().item()
    assert diff <= 1e-5, diff


def test_export_then_reload_in_transformers_gives_the_same_again(hf_model, batch, tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    ours = ours_from_hf(hf_model)
    config = BertConfig(**{k: v for k, v in hf_model.config.to_dict().items() if k in BertConfig().to_dict()})
    exported = BertForMaskedLM(config)
    result = exported.load_state_dict(to_hf_state_dict(ours.state_dict(), config.vocab_size), strict=False)
    assert not result.unexpected_keys and set(result.missing_keys) <= {"bert.pooler.dense.weight",
                                                                       "bert.pooler.dense.bias"}
    exported.save_pretrained(tmp_path)
    reloaded = BertForMaskedLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    positions = torch.tensor([[1, 3, 5], [2, 4, 6], [1, 2, 3], [7, 8, 9]])
    valid = torch.ones_like(positions, dtype=torch.bool)
    with torch.no_grad():
        hf_out = reloaded(**batch, output_hidden_states=True)
        out = ours(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], positions,
                   torch.zeros_like(positions), valid)
    real = real_positions(batch["attention_mask"])
    expected_hidden = hf_model(**batch).last_hidden_state
    assert ((hf_out.hidden_states[-1] - expected_hidden).abs() * real).max() <= 1e-5
    hf_logits = hf_out.logits.gather(1, positions.unsqueeze(-1).expand(-1, -1, hf_out.logits.shape[-1]))
    assert (out.logits[..., :config.vocab_size] - hf_logits).abs().max() <= 2e-5  # logits ~10: fp32 rounding
    assert torch.isinf(out.logits[..., config.vocab_size:]).all(), "vocabulary padding must be masked"


def test_narrow_with_all_layers_full_equals_bert(hf_model, batch):
    bert = ours_from_hf(hf_model)
    narrow = ours_from_hf(hf_model, variant="narrow", full_length_layers=hf_model.config.num_hidden_layers)
    positions = torch.tensor([[1, 2, 3], [4, 5, 6], [1, 2, 3], [10, 11, 12]])
    with torch.no_grad():
        args = (batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        a = bert.bert(*args, positions)
        b = narrow.bert(*args, positions)
    assert (a - b).abs().max() <= 1e-6


def hf_narrow_reference(hf_model, lm_head, input_ids, attention_mask, token_type_ids, positions, full_layers):
    """NarrowBERT written from Hugging Face's modules: ordinary layers, then cross-attention of the query
    rows onto the fixed context C with each narrow layer's own projections."""
    hidden = hf_model.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
    additive = (1.0 - attention_mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
    for layer in hf_model.encoder.layer[:full_layers]:
        hidden = layer(hidden, attention_mask=additive)
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden
    context = hidden
    rows = context.gather(1, positions.unsqueeze(-1).expand(-1, -1, context.shape[-1]))
    heads = hf_model.config.num_attention_heads
    for layer in hf_model.encoder.layer[full_layers:]:
        attention = layer.attention.self
        b, q_len, h = rows.shape
        d = h // heads
        q, k, v = (x.view(b, -1, heads, d).transpose(1, 2)
                   for x in (attention.query(rows), attention.key(context), attention.value(context)))
        scores = q @ k.transpose(-1, -2) / math.sqrt(d) + additive
        mixed = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, q_len, h)
        attended = layer.attention.output(mixed, rows)
        rows = layer.output(layer.intermediate(attended), attended)
    return lm_head(rows)


def test_narrow_logits_equal_reference_from_hf_layers(hf_model, batch):
    from transformers import BertConfig
    from transformers.models.bert.modeling_bert import BertOnlyMLMHead

    full = 2
    ours = ours_from_hf(hf_model, variant="narrow", full_length_layers=full)
    head = BertOnlyMLMHead(BertConfig(**hf_model.config.to_dict())).eval()
    state = to_hf_state_dict(ours.state_dict(), hf_model.config.vocab_size)
    head.load_state_dict({k.removeprefix("cls."): v for k, v in state.items() if k.startswith("cls.predictions")})
    positions = torch.tensor([[1, 4, 6, 0], [2, 3, 5, 7], [1, 2, 3, 0], [3, 9, 12, 15]])
    valid = positions > 0
    with torch.no_grad():
        expected = hf_narrow_reference(hf_model, head, batch["input_ids"], batch["attention_mask"],
                                       batch["token_type_ids"], positions, full)
        out = ours(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], positions,
                   torch.zeros_like(positions), valid)
    diff = (out.logits[..., :hf_model.config.vocab_size] - expected).abs().max().item()
    assert diff <= 2e-5, diff  # logits ~10: fp32 rounding
    bert = ours_from_hf(hf_model)
    with torch.no_grad():
        bert_logits = bert(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], positions,
                           torch.zeros_like(positions), valid).logits
    assert (bert_logits - out.logits)[..., :100].abs().max() > 1e-2, "narrow must differ from bert here"


def test_bert_model_classification_path_reads_only_cls(hf_model, batch):
    ours = BertModel(config_of(hf_model, variant="narrow")).eval()
    positions = torch.zeros(batch["input_ids"].shape[0], 1, dtype=torch.long)
    with torch.no_grad():
        cls_only = ours(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], positions)
        all_rows = ours(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    assert cls_only.shape == (len(SENTENCES), 1, hf_model.config.hidden_size)
    assert (cls_only[:, 0] - all_rows[:, 0]).abs().max() <= 1e-5


def test_masked_lm_state_dict_round_trip(hf_model):
    """ours -> HF BertForMaskedLM layout -> ours reproduces every tensor (vocabulary padding included)."""
    ours = ours_from_hf(hf_model)
    hf_state = to_hf_state_dict(ours.state_dict(), hf_model.config.vocab_size)
    assert "cls.predictions.decoder.weight" in hf_state
    again = BertForPreTraining(config_of(hf_model))
    assert load_hf_state_dict(again, hf_state) == []
    for key, value in ours.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key


# The key list of the official NarrowBERT code (lihaoxin2020/narrowbert, NarrowBertForMaskedLM under
# transformers 4.28): BertEmbeddings with its position_ids buffer, the full-length layers in
# bert.encoder.layer.0..F-1, the narrow ones in bert.encoder_narrow.layer.0..L-F-1, BERT's MLM head.
OFFICIAL_LAYER_PARTS = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                        "attention.output.LayerNorm", "intermediate.dense", "output.dense", "output.LayerNorm")
OFFICIAL_LAYER_KEYS = [f"{part}.{kind}" for part in OFFICIAL_LAYER_PARTS for kind in ("weight", "bias")]


def official_narrowbert_keys(num_layers: int, full: int) -> set[str]:
    embeddings = {f"bert.embeddings.{name}" for name in (
        "word_embeddings.weight", "position_embeddings.weight", "token_type_embeddings.weight",
        "LayerNorm.weight", "LayerNorm.bias", "position_ids")}
    layers = {f"bert.encoder.layer.{i}.{k}" for i in range(full) for k in OFFICIAL_LAYER_KEYS}
    narrow = {f"bert.encoder_narrow.layer.{j}.{k}" for j in range(num_layers - full) for k in OFFICIAL_LAYER_KEYS}
    head = {f"cls.predictions.{name}" for name in (
        "bias", "transform.dense.weight", "transform.dense.bias", "transform.LayerNorm.weight",
        "transform.LayerNorm.bias", "decoder.weight", "decoder.bias")}
    return embeddings | layers | narrow | head


def write_official_narrowbert(model: BertForPreTraining, hf_config: dict, full: int, tokenizer_dir, out_dir):
    """A checkpoint directory as the official code saves one: our weights renamed to its key list."""
    import json
    import shutil

    from safetensors.torch import save_file

    from megatron_narrow.formats.hf_bert import to_official_narrow_layout

    state = {key: value.clone()  # no shared storage (the tied decoder) in safetensors
             for key, value in to_official_narrow_layout(to_hf_state_dict(model.state_dict(), hf_config["vocab_size"]),
                                                         full).items()}
    state["bert.embeddings.position_ids"] = torch.arange(hf_config["max_position_embeddings"]).unsqueeze(0)
    assert set(state) == official_narrowbert_keys(hf_config["num_hidden_layers"], full)
    out_dir.mkdir()
    save_file(state, str(out_dir / "model.safetensors"))
    config = {**hf_config, "model_type": "bert", "architectures": ["NarrowBertForMaskedLM"],
              "full_length_layers": full}
    (out_dir / "config.json").write_text(json.dumps(config))
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, out_dir / name)


def test_official_narrowbert_checkpoint_loads_with_equal_logits(hf_model, batch, minilm_dir, tmp_path):
    """Fine-tuning's init_from and pretraining's train.init_from_hf read the official layout: the model built
    from it is narrow with its F, holds the same tensors, and gives the same logits bit for bit; a run whose
    full_length_layers disagrees with the weights is refused."""
    from megatron_narrow.tasks.source import load_pretrained
    from megatron_narrow.training.loop import _load_hf

    full = 2
    ours = ours_from_hf(hf_model, variant="narrow", full_length_layers=full)
    with torch.no_grad():
        ours.cls.predictions.bias.normal_(generator=torch.Generator().manual_seed(0))
    official = tmp_path / "official"
    write_official_narrowbert(ours, hf_model.config.to_dict(), full, minilm_dir, official)

    pretrained = load_pretrained(official)
    assert (pretrained.config.variant, pretrained.config.full_length_layers) == ("narrow", full)
    loaded = BertForPreTraining(pretrained.config).eval()
    loaded.load_state_dict(pretrained.state, strict=False)
    initialised = BertForPreTraining(config_of(hf_model, variant="narrow", full_length_layers=full)).eval()
    _load_hf(initialised, str(official), lambda line: None)
    positions = torch.tensor([[1, 4, 6, 0], [2, 3, 5, 7], [1, 2, 3, 0], [3, 9, 12, 15]])
    inputs = (batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], positions,
              torch.zeros_like(positions), positions > 0)
    with torch.no_grad():
        expected = ours(*inputs).logits
        for model in (loaded, initialised):
            assert torch.equal(model(*inputs).logits, expected)
    wrong = BertForPreTraining(config_of(hf_model, variant="narrow", full_length_layers=3))
    with pytest.raises(ValueError, match="model.full_length_layers=2"):
        _load_hf(wrong, str(official), lambda line: None)
