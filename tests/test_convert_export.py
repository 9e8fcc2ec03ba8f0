"""Export to Hugging Face: every variant loads with AutoModelForMaskedLM and gives our MLM logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from transformers import AutoModelForMaskedLM, BertForMaskedLM, BertTokenizer

from megatron_narrow.config import ModelConfig
from megatron_narrow.convert.export import export_to_hf, hf_config_from_model_config
from megatron_narrow.formats.hf_bert import to_official_narrow_layout
from megatron_narrow.model import BertForPreTraining

from .test_model_hf import official_narrowbert_keys

VOCAB = 1000
SPECIAL = {0: "[PAD]", 100: "[UNK]", 101: "[CLS]", 102: "[SEP]", 103: "[MASK]"}  # BERT's WordPiece ids
TOL = 1e-5


def tiny_model(variant: str, **overrides) -> BertForPreTraining:
    config = ModelConfig(vocab_size=VOCAB, hidden_size=64, num_layers=4, num_heads=4, max_position_embeddings=64,
                         hidden_dropout=0.0, attention_dropout=0.0, variant=variant, full_length_layers=2,
                         init_seed=7, **overrides)
    model = BertForPreTraining(config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-zero biases and LayerNorm affines, so a misplaced tensor shows in the logits
        for name, p in model.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def batch() -> dict[str, torch.Tensor]:
    """Two sequences of 16 tokens; the second has 5 padding positions at its end."""
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(104, VOCAB, (2, 16), generator=g)
    input_ids[:, 0], input_ids[0, -1], input_ids[1, 10] = 101, 102, 102
    attention_mask = torch.ones(2, 16, dtype=torch.long)
    attention_mask[1, 11:] = 0
    input_ids[1, 11:] = 0
    token_type_ids = torch.zeros(2, 16, dtype=torch.long)
    token_type_ids[0, 8:] = 1
    target_positions = torch.tensor([[2, 5, 13], [1, 4, 9]])
    input_ids[0, 5] = input_ids[1, 4] = 103  # [MASK]
    target_ids = torch.randint(104, VOCAB, (2, 3), generator=g)
    return dict(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                target_positions=target_positions, target_ids=target_ids,
                target_valid=torch.ones(2, 3, dtype=torch.bool))


def our_logits(model: BertForPreTraining, b: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**b).logits[..., :VOCAB]  # our vocabulary is padded; HF's is the real one


def at_targets(logits: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    return logits.gather(1, positions.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))


def hf_inputs(b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: b[k] for k in ("input_ids", "attention_mask", "token_type_ids")}


def tokenizer_files(tmp_path: Path) -> list[Path]:
    """vocab.txt plus the tokenizer.json / tokenizer_config.json of a WordPiece tokenizer over it."""
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("".join(SPECIAL.get(i, f"w{i}") + "\n" for i in range(VOCAB)), encoding="utf-8")
    saved = BertTokenizer(vocab=str(vocab)).save_pretrained(tmp_path / "tokenizer")  # transformers 5: vocab=
    return [vocab, *map(Path, saved)]


def test_hf_config_fields():
    config = tiny_model("narrow").bert.config
    hf = hf_config_from_model_config(config)
    assert (hf.model_type, hf.full_length_layers, hf.vocab_size, hf.num_hidden_layers) == ("bert", 2, VOCAB, 4)
    assert hf.hidden_act == "gelu" and hf.layer_norm_eps == config.layer_norm_eps and hf.tie_word_embeddings
    assert hf_config_from_model_config(tiny_model("bert").bert.config).model_type == "bert"


def test_export_bert(tmp_path):
    model, b = tiny_model("bert"), batch()
    out = export_to_hf(model, tmp_path / "bert", tokenizer_files=tokenizer_files(tmp_path))
    assert {"model.safetensors", "config.json", "vocab.txt", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert not list(out.glob("*.py"))  # stock BERT: no remote code

    hf, info = BertForMaskedLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert hf.cls.predictions.decoder.weight.data_ptr() == hf.bert.embeddings.word_embeddings.weight.data_ptr()

    auto = AutoModelForMaskedLM.from_pretrained(out).eval()
    assert type(auto).__name__ == "BertForMaskedLM"
    with torch.no_grad():
        hf_logits = auto(**hf_inputs(b)).logits
    assert hf_logits.shape == (2, 16, VOCAB)
    torch.testing.assert_close(at_targets(hf_logits, b["target_positions"]), our_logits(model, b), atol=TOL, rtol=0)


def test_export_token_drop_is_plain_bert(tmp_path):
    # The exported token-drop checkpoint is plain BERT (dropping is a training-time schedule, and the
    # importance vector is not exported), so the HF model equals our model only when it keeps every token.
    model, b = tiny_model("token_drop", token_drop_keep_ratio=1.0), batch()
    assert model.bert.token_importance is not None
    out = export_to_hf(model, tmp_path / "token_drop")
    auto = AutoModelForMaskedLM.from_pretrained(out).eval()
    assert type(auto).__name__ == "BertForMaskedLM"
    with torch.no_grad():
        hf_logits = auto(**hf_inputs(b)).logits
    torch.testing.assert_close(at_targets(hf_logits, b["target_positions"]), our_logits(model, b), atol=TOL, rtol=0)


def test_export_narrow(tmp_path):
    model, b = tiny_model("narrow"), batch()
    out = export_to_hf(model, tmp_path / "narrow_export", tokenizer_files=tokenizer_files(tmp_path))
    assert {"modeling_narrow_bert.py", "configuration_narrow_bert.py"} <= {p.name for p in out.glob("*.py")}
    source = (out / "modeling_narrow_bert.py").read_text() + (out / "configuration_narrow_bert.py").read_text()
    assert "megatron_narrow" not in source  # remote code imports only torch and transformers

    hf, info = AutoModelForMaskedLM.from_pretrained(out, trust_remote_code=True, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert type(hf).__name__ == "NarrowBertForMaskedLM" and hf.config.full_length_layers == 2
    # BertForMaskedLM's names, the narrow layers in the official NarrowBERT's second stack
    assert set(hf.state_dict()) == set(to_official_narrow_layout(BertForMaskedLM(hf.config).state_dict(), 2))
    assert any(key.startswith("bert.encoder_narrow.layer.1.") for key in hf.state_dict())
    saved = set(safe_open(str(out / "model.safetensors"), "pt").keys())  # the official code's keys, but for
    assert saved == official_narrowbert_keys(4, 2) - {"bert.embeddings.position_ids",  # a buffer it rebuilds
                                                      "cls.predictions.decoder.weight",  # tied: not stored
                                                      "cls.predictions.decoder.bias"}  # the same tensor as .bias
    hf.eval()
    ours = our_logits(model, b)
    with torch.no_grad():
        sparse = hf(**hf_inputs(b), query_positions=b["target_positions"], labels=b["target_ids"])
        dense = hf(**hf_inputs(b)).logits
    assert sparse.logits.shape == (2, 3, VOCAB) and dense.shape == (2, 16, VOCAB)
    torch.testing.assert_close(sparse.logits, ours, atol=TOL, rtol=0)
    torch.testing.assert_close(at_targets(dense, b["target_positions"]), ours, atol=TOL, rtol=0)
    with torch.no_grad():
        our_loss = model(**b).loss
    torch.testing.assert_close(sparse.loss, our_loss, atol=TOL, rtol=0)

    eager = AutoModelForMaskedLM.from_pretrained(out, trust_remote_code=True, attn_implementation="eager").eval()
    with torch.no_grad():  # the narrow layers go through transformers' attention interface: eager works too
        eager_logits = eager(**hf_inputs(b), query_positions=b["target_positions"]).logits
    torch.testing.assert_close(eager_logits, ours, atol=TOL, rtol=0)

    # loaded as a plain BertForMaskedLM (no remote code), the narrow layers are reported missing, not run as
    # full-length layers in silence
    _, plain_info = BertForMaskedLM.from_pretrained(out, output_loading_info=True)
    narrow_layers = ("bert.encoder.layer.2.", "bert.encoder.layer.3.")
    assert {k for k in plain_info["missing_keys"] if ".layer." in k} == {
        k for k in BertForMaskedLM(hf.config).state_dict() if k.startswith(narrow_layers)}

    fill = transformers.pipeline("fill-mask", model=str(out), trust_remote_code=True, top_k=3)
    predictions = fill("w200 w300 [MASK] w400")  # query_positions=None: logits at every position
    ids = torch.tensor([[101, 200, 300, 103, 400, 102]])
    with torch.no_grad():
        expected = hf(input_ids=ids, query_positions=torch.tensor([[3]])).logits[0, 0].softmax(-1).topk(3)
    assert [p["token"] for p in predictions] == expected.indices.tolist()
    torch.testing.assert_close(torch.tensor([p["score"] for p in predictions]), expected.values, atol=1e-5, rtol=0)


def test_export_refuses_tensor_parallel_shards():
    model = tiny_model("bert")
    model.bert.groups = type("Groups", (), {"tensor": type("Info", (), {"size": 2})()})()
    with pytest.raises(ValueError, match="TP=1"):
        export_to_hf(model, "/nonexistent")
