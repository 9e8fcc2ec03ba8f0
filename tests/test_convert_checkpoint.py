"""tools/convert_checkpoint_to_hf.py on real training checkpoints: TP=2 runs of every variant (ZeRO-0 and
ZeRO-2) and ZeRO-2/ZeRO-3 runs at TP=1 x DP=2 become directories that stock transformers loads, whose MLM
logits equal those of our TP=2 model on the checkpoint's own shards, with a working tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from .conftest import REPO, run_fresh_python, tiny_train_overrides
from .distributed import run_distributed
from .runs import run_to_end, run_tool

TOL = 1e-5
VOCAB = 1000
TEXTS = ["Return the number of items in the container.", "Raise a ValueError if the argument is negative."]
MASKED = [[2, 5], [1, 4]]  # positions (after [CLS]) replaced by [MASK]; the targets of the comparison
# name -> (variant, tensor_parallel, DeepSpeed config). Two CPU ranks each.
RUNS = {
    "bert_tp2": ("bert", 2, "zero0.json"),
    "narrow_tp2_zero2": ("narrow", 2, "zero2.json"),
    "token_drop_tp2": ("token_drop", 2, "zero0.json"),
    "bert_dp2_zero2": ("bert", 1, "zero2.json"),
    "bert_dp2_zero3": ("bert", 1, "zero3.json"),
}


def _ds_config(tmp: Path, name: str) -> Path:
    """The repository's ds_configs/NAME, or an equivalent minimal one (ZeRO stage from the name)."""
    path = REPO / "ds_configs" / name
    if path.is_file():
        return path
    stage = int(name.removeprefix("zero").removesuffix(".json"))
    path = tmp / name
    path.write_text(json.dumps({"zero_optimization": {"stage": stage}}))
    return path


@pytest.fixture(scope="module")
def converted(tmp_path_factory, tiny_corpus_data) -> dict[str, tuple[Path, Path]]:
    """name -> (save_dir, converted HF directory) for every run in RUNS: 2 steps each, dropout off."""
    from megatron_narrow.convert.checkpoint import convert_checkpoint

    root = tmp_path_factory.mktemp("convert_checkpoint")
    out = {}
    for name, (variant, tp, ds_name) in RUNS.items():
        save_dir = root / name
        overrides = tiny_train_overrides(tiny_corpus_data, save_dir, variant, steps=2, **{
            "model.hidden_dropout": "0.0", "model.attention_dropout": "0.0", "parallel.tensor_parallel": str(tp)})
        argv = ["--config", str(REPO / "examples/configs/tiny_cpu.yaml"), "--deepspeed_config",
                str(_ds_config(root, ds_name)), *overrides]
        run_to_end(argv, world=2, timeout=240)
        convert_checkpoint(save_dir, root / f"hf_{name}")  # the command line: tests/test_doc_commands.py
        out[name] = (save_dir, root / f"hf_{name}")
    return out


def step_dir(save_dir: Path) -> Path:
    root = save_dir / "checkpoints"
    return root / (root / "latest").read_text().strip()


def hf_batch(hf_dir: Path) -> dict[str, torch.Tensor]:
    """TEXTS through the exported tokenizer, padded, with MASKED positions set to [MASK]."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    enc = tokenizer(TEXTS, padding=True, return_tensors="pt")
    positions = torch.tensor(MASKED)
    target_ids = enc["input_ids"].gather(1, positions)
    enc["input_ids"].scatter_(1, positions, tokenizer.mask_token_id)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "token_type_ids": torch.zeros_like(enc["input_ids"]), "target_positions": positions,
            "target_ids": target_ids}


def _reference_logits(rank: int, world_size: int, jobs: list[tuple[str, dict]]) -> list[torch.Tensor]:
    """Our TP=2 model on each checkpoint's own shard (its DeepSpeed module states): this rank's logits."""
    from megatron_narrow.config import ModelConfig, ParallelConfig
    from megatron_narrow.model import BertForPreTraining
    from megatron_narrow.parallel import ProcessGroups

    groups = ProcessGroups.from_world(ParallelConfig(tensor_parallel=2))
    out = []
    for path, batch in jobs:
        run = json.loads((Path(path) / "run_config.json").read_text())
        model_cfg = dict(run["model"])
        if model_cfg["variant"] == "token_drop":  # token dropping is a training schedule: the model is BERT
            model_cfg["variant"] = "bert"
        model = BertForPreTraining(ModelConfig(**model_cfg), groups, pair_head=run["data"]["pair_task"] != "none")
        module = torch.load(Path(path) / f"mp_rank_{groups.tensor.rank:02d}_model_states.pt", map_location="cpu",
                            weights_only=False)["module"]
        module.pop("bert.token_importance.importance", None)
        model.load_state_dict(module, strict=True)
        with torch.no_grad():
            logits = model.eval()(**batch, target_valid=torch.ones_like(batch["target_ids"], dtype=torch.bool)).logits
        out.append(logits)
    return out


@pytest.fixture(scope="module")
def reference(converted) -> dict[str, torch.Tensor]:
    """name -> (B, M, VOCAB) logits of our TP=2 model for the TP=2 runs (shards gathered, padding stripped)."""
    names = [n for n, (_, tp, _) in RUNS.items() if tp == 2]
    jobs = [(str(step_dir(converted[n][0])), hf_batch(converted[n][1])) for n in names]
    per_rank = run_distributed(_reference_logits, 2, jobs, timeout=120)
    return {n: torch.cat([r[i] for r in per_rank], dim=-1)[..., :VOCAB] for i, n in enumerate(names)}


def hf_logits(hf_dir: Path, batch: dict[str, torch.Tensor], **load) -> torch.Tensor:
    from transformers import AutoModelForMaskedLM

    model = AutoModelForMaskedLM.from_pretrained(hf_dir, **load).eval()
    with torch.no_grad():
        logits = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}).logits
    positions = batch["target_positions"]
    return logits.gather(1, positions.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))


@pytest.mark.parametrize("name", ["bert_tp2", "narrow_tp2_zero2", "token_drop_tp2"])
def test_tp2_checkpoint_matches_our_tp2_model(converted, reference, name):
    save_dir, hf_dir = converted[name]
    variant = RUNS[name][0]
    files = {p.name for p in hf_dir.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "README.md"} <= files
    assert ("modeling_narrow_bert.py" in files) == (variant == "narrow")
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["vocab_size"] == VOCAB and config["model_type"] == "bert"  # narrow: as the official NarrowBERT
    assert ("full_length_layers" in config) == (variant == "narrow")

    batch = hf_batch(hf_dir)
    got = hf_logits(hf_dir, batch, trust_remote_code=variant == "narrow")
    assert got.shape == reference[name].shape == (2, 2, VOCAB)
    torch.testing.assert_close(got, reference[name], atol=TOL, rtol=0)

    card = (hf_dir / "README.md").read_text()
    assert f"| variant | {variant} |" in card and "| training steps | 2 |" in card
    assert ("trust_remote_code=True" in card) == (variant == "narrow")
    if variant == "narrow":  # the card's snippet, run as written in a fresh interpreter: no prompt, no warning
        snippet = card.split("```python\n", 1)[1].split("```", 1)[0]
        result = run_fresh_python(snippet)
        assert result.returncode == 0 and "'token_str'" in result.stdout, result.stdout + result.stderr
        assert result.stderr.strip() == "", result.stderr


def test_tokenizer_and_fill_mask(converted, tiny_corpus_data):
    import transformers
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from megatron_narrow.data.tokenizer import load_tokenizer

    hf_dir = converted["bert_tp2"][1]
    ours = load_tokenizer("sentencepiece", tiny_corpus_data["tokenizer"])
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    special = ours.special
    assert (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id,
            tokenizer.mask_token_id) == special.ids()
    texts = [*TEXTS, "  Extra   spaces, digits 12,345 and ünïcödé ﬁ.", "x"]
    for text, ids in zip(texts, ours.encode_batch(texts), strict=True):  # the ids training saw
        assert tokenizer(text)["input_ids"] == [special.cls, *ids, special.sep]
    masked = tokenizer(f"Return the {tokenizer.mask_token} of items.")["input_ids"]
    assert masked.count(special.mask) == 1

    fill = transformers.pipeline("fill-mask", model=str(hf_dir), top_k=3)
    text = f"Return the {tokenizer.mask_token} of items in the container."
    predictions = fill(text)
    assert len(predictions) == 3 and all(p["token_str"] == tokenizer.decode([p["token"]]) for p in predictions)
    model = AutoModelForMaskedLM.from_pretrained(hf_dir).eval()
    ids = tokenizer(text, return_tensors="pt")
    position = ids["input_ids"][0].tolist().index(special.mask)
    with torch.no_grad():
        expected = model(**ids).logits[0, position].softmax(-1).topk(3)
    assert [p["token"] for p in predictions] == expected.indices.tolist()


def test_zero2_checkpoint_at_tp1_converts(converted):
    """ZeRO-2 keeps fp32 master weights partitioned over the 2 data-parallel ranks; its module file still holds
    the full fp32 weights, an independent reference for what zero_to_fp32 consolidated."""
    from safetensors.torch import load_file
    from transformers import AutoModelForMaskedLM

    from megatron_narrow.formats.hf_bert import VOCAB_ROWS

    save_dir, hf_dir = converted["bert_dp2_zero2"]
    step = step_dir(save_dir)
    assert sorted(p.name for p in step.glob("*optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    module = torch.load(step / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    exported = load_file(str(hf_dir / "model.safetensors"))
    for key, value in module.items():
        if key.startswith(("bert.pooler.", "cls.seq_relationship.")):
            continue
        torch.testing.assert_close(exported[key], value[:VOCAB] if key in VOCAB_ROWS else value, atol=0, rtol=0)
    assert type(AutoModelForMaskedLM.from_pretrained(hf_dir)).__name__ == "BertForMaskedLM"


def test_zero3_checkpoint_at_tp1_converts(converted):
    """ZeRO-3 saves no weights in its module files; the consolidated model equals the ZeRO-2 run's (the same
    training, only the partitioning differs)."""
    from safetensors.torch import load_file

    save_dir, hf_dir = converted["bert_dp2_zero3"]
    step = step_dir(save_dir)
    assert sorted(p.name for p in step.glob("*model_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt"]
    zero3 = load_file(str(hf_dir / "model.safetensors"))
    zero2 = load_file(str(converted["bert_dp2_zero2"][1] / "model.safetensors"))
    assert zero3.keys() == zero2.keys()
    for key in zero2:
        torch.testing.assert_close(zero3[key], zero2[key], atol=TOL, rtol=0, msg=key)


def test_step_directory_and_errors(converted, tmp_path, capsys):
    from megatron_narrow.convert.checkpoint import CheckpointError, read_checkpoint_info, resolve_checkpoint

    save_dir = converted["bert_tp2"][0]
    step = step_dir(save_dir)
    assert resolve_checkpoint(save_dir) == resolve_checkpoint(save_dir / "checkpoints") == resolve_checkpoint(step)
    info = read_checkpoint_info(step)
    assert (info.tensor_parallel, info.zero_stage, info.step, info.model_config.variant) == (2, 0, 2, "bert")
    assert read_checkpoint_info(converted["bert_dp2_zero3"][0]).zero_stage == 3
    with pytest.raises(CheckpointError, match="neither"):
        resolve_checkpoint(tmp_path)
    assert run_tool("convert_checkpoint_to_hf", ["--checkpoint", str(tmp_path), "--output", str(tmp_path / "out")]) == 2
    assert "neither a checkpoint directory" in capsys.readouterr().err


def test_missing_optimizer_shard_is_one_line_naming_the_checkpoint(converted, tmp_path, capsys):
    """A ZeRO-2 checkpoint copied without one data-parallel rank's optimizer shard: with its completion marker
    the file is named as missing; without (an older checkpoint) DeepSpeed's complaint about the temporary
    view is replaced by the step directory and the fix."""
    import shutil

    step = shutil.copytree(step_dir(converted["bert_dp2_zero2"][0]), tmp_path / "step_0000002")
    (step / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    capsys.readouterr()
    assert run_tool("convert_checkpoint_to_hf", ["--checkpoint", str(step), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "zero_pp_rank_1_mp_rank_00_optim_states.pt is missing" in err[0], err
    (step / "complete.json").unlink()
    assert run_tool("convert_checkpoint_to_hf", ["--checkpoint", str(step), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # DeepSpeed's loading progress bar may come first
    assert [line for line in err if line.startswith("error:")] == err[-1:], err
    assert str(step) in err[-1] and "optimizer shards" in err[-1] and "/tmp/mp_rank_" not in err[-1], err
    assert "Traceback" not in "\n".join(err) and not (tmp_path / "out").exists()
