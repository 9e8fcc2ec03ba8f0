"""A run that cannot be right is refused with one line (`error: ...`, exit code 2) before any process-group
work; a non-finite loss stops the run with one line, or is skipped and counted."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_narrow.formats import checkpoint_files

from .conftest import REPO, tiny_train_overrides
from .distributed import free_port
from .runs import pretrain_argv, records, run_in_this_process, run_to_end

SCRIPT = str(REPO / "megatron_narrow/pretrain.py")
TINY = str(REPO / "examples/configs/tiny_cpu.yaml")
ZERO0 = REPO / "ds_configs/zero0.json"


@pytest.fixture(scope="module")
def other_tokenizer(tiny_corpus_data, tmp_path_factory) -> Path:
    """Another sentencepiece model of the same vocabulary size, trained on the same text (BPE, not unigram)."""
    from megatron_narrow.data.train_tokenizer import train_sentencepiece

    root = tmp_path_factory.mktemp("other_tokenizer")
    return train_sentencepiece([str(tiny_corpus_data["root"] / "docs.jsonl")], str(root / "spm"), vocab_size=1000,
                               model_type="bpe")


def write_ds(tmp_path: Path, **settings) -> Path:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 0}, **settings}))  # settings may replace the stage
    return path


# id -> (overrides, DeepSpeed JSON settings or None for ds_configs/zero0.json, WORLD_SIZE, what the line says)
CASES = {
    "global_batch_not_multiple": ({"train.global_batch_size": "24"}, None, 2,
                                  "train.global_batch_size=24 is not a multiple of train.micro_batch_size=8 x "
                                  "data_parallel=2"),
    "ds_train_batch_size_conflict": ({}, {"train_batch_size": 999}, 1,
                                     "train_batch_size=999 disagrees with the run config (8 from train.*"),
    "ds_micro_batch_conflict": ({}, {"train_micro_batch_size_per_gpu": 4}, 1,
                                "train_micro_batch_size_per_gpu=4 disagrees with the run config"),
    "ds_optimizer_section": ({}, {"optimizer": {"type": "Adam", "params": {"lr": 1e-3}}}, 1,
                             "remove the 'optimizer' section"),
    "ds_precision_conflict": ({}, {"bf16": {"enabled": True}}, 1,
                              "bf16.enabled=true disagrees with train.precision=fp32"),
    "fp16_at_zero_stage_0": ({"train.precision": "fp16"}, None, 1, "fp16 needs ZeRO stage >= 1"),
    "other_tokenizer": ({"train.tokenizer_model": "{other_tokenizer}"}, None, 1,
                        "but the model's tokenizer is"),
    "vocab_size": ({"model.vocab_size": "999"}, None, 1,
                   "data was tokenized with vocabulary size 1000 but the model expects 999"),
    "seq_len_over_positions": ({"data.seq_len": "128"}, None, 1,
                               "data.seq_len=128 exceeds model.max_position_embeddings=64"),
    "missing_data_path": ({"data.data_paths": "[{tmp_path}/nowhere]"}, None, 1, "nowhere has no index.json"),
    "pipeline_zero_stage_0": ({"parallel.pipeline_parallel": "2"}, None, 2,
                              "ZeRO stage 0 with parallel.pipeline_parallel=2: pipelines run with ZeRO stage 1"),
    "pipeline_zero_stage_2": ({"parallel.pipeline_parallel": "2"}, {"zero_optimization": {"stage": 2}}, 2,
                              "ZeRO stage 2 with parallel.pipeline_parallel=2: pipelines run with ZeRO stage 1"),
    "pipeline_partitioned_activations": ({"parallel.pipeline_parallel": "2"},
                                         {"zero_optimization": {"stage": 1}, "pipeline": {"pipe_partitioned": True}},
                                         2, "pipeline.pipe_partitioned=true splits only the first tensor"),
    "more_stages_than_layers": ({"parallel.pipeline_parallel": "8"}, {"zero_optimization": {"stage": 1}}, 8,
                                "parallel.pipeline_parallel=8: cannot split 4 layers into 8 pipeline stages"),
    "packing_with_pair_task": ({"data.packing": "segments", "data.pair_task": "sop"}, None, 1,
                               "data.packing=segments with data.pair_task=sop: a packed row has no single sentence "
                               "pair; set data.pair_task=none"),
    "packed_targets_too_few": ({"data.packing": "segments", "data.max_predictions": "9"}, None, 1,
                               "data.max_predictions=9 is too small for data.packing=segments: a packed row of 64 "
                               "can need 10 targets"),
    "max_segments_zero": ({"data.packing": "concat", "data.max_segments": "0"}, None, 1,
                          "data.max_segments must be >= 1 (or null for no bound), got 0"),
    "unknown_packing": ({"data.packing": "pack"}, None, 1, "data.packing must be none, concat or segments"),
    "lamb_with_zero": ({"train.optimizer": "lamb"}, {"zero_optimization": {"stage": 1}}, 1,
                       "train.optimizer=lamb runs with ZeRO stage 0, fp32 and no pipeline"),
    "unknown_optimizer": ({"train.optimizer": "sgd"}, None, 1, "train.optimizer must be adamw or lamb, got 'sgd'"),
    "unavailable_attention_backend": ({"model.attention_backend": "flash9"}, None, 1,
                                      "model.attention_backend='flash9' is not available here; choose one of"),
    "seq_len_schedule_with_pipeline": ({"parallel.pipeline_parallel": "2",
                                        "data.seq_len_schedule": "[{{until_step: 1, seq_len: 32}}]"},
                                       {"zero_optimization": {"stage": 1}}, 2,
                                       "data.seq_len_schedule with parallel.pipeline_parallel > 1"),
    "compile_with_pipeline": ({"parallel.pipeline_parallel": "2", "model.compile": "true"},
                              {"zero_optimization": {"stage": 1}}, 2,
                              "model.compile=true with parallel.pipeline_parallel > 1"),
    "seq_len_phase_drops_targets": ({"model.variant": "token_drop", "model.token_drop_keep_tokens": "10",
                                     "data.seq_len_schedule": "[{{until_step: 1, seq_len: 32, max_predictions: 9}}]"},
                                    None, 1, "model token_drop keeps 10 of 32 tokens but every sample forces up to "
                                    "11 in"),
    "ramp_batch_not_multiple": ({"train.global_batch_size": "32", "train.batch_size_rampup": "[4, 4, 100]"},
                                None, 1, "global batch 4 of train.batch_size_rampup is not a multiple of "
                                "train.micro_batch_size=8"),
}


def case_argv(name: str, data, tmp_path: Path, other_tokenizer: Path) -> tuple[list[str], int, str]:
    overrides, ds_settings, world, expected = CASES[name]
    overrides = {key: value.format(tmp_path=tmp_path, other_tokenizer=other_tokenizer)
                 for key, value in overrides.items()}
    ds = ZERO0 if ds_settings is None else write_ds(tmp_path, **ds_settings)
    argv = ["--config", TINY, "--deepspeed_config", str(ds),
            *tiny_train_overrides(data, tmp_path / "run", steps=2, **overrides)]
    return argv, world, expected


@pytest.mark.parametrize("name", list(CASES))
def test_refused_before_process_group_work(name, tiny_corpus_data, other_tokenizer, tmp_path, monkeypatch, capsys):
    argv, world, expected = case_argv(name, tiny_corpus_data, tmp_path, other_tokenizer)
    capsys.readouterr()
    assert run_in_this_process(argv, monkeypatch, world=world) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert expected in lines[0], lines[0]
    assert not (tmp_path / "run").exists(), "a refused run must not create its save_dir"


def environment(world: int = 1) -> dict[str, str]:
    env = dict(os.environ, DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0",
               WORLD_SIZE=str(world))
    return env


@pytest.mark.parametrize("name", ["missing_data_path"])  # the rest of the table runs in-process above
def test_command_line_refusal_is_one_line_and_exit_code_2(name, tiny_corpus_data, other_tokenizer, tmp_path):
    """The real command line. Rank 0 of a two-rank launch whose other rank never comes: a run that reached
    process-group work would wait for it until the timeout."""
    argv, world, expected = case_argv(name, tiny_corpus_data, tmp_path, other_tokenizer)
    result = subprocess.run([sys.executable, SCRIPT, *argv], env=environment(2), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines
    assert result.stdout == ""


def run_nonfinite(data, save_dir: Path, policy: str, ds_config: Path, variant: str = "narrow",
                  expect: int = 0, save_interval: int = 0) -> str:
    """An absurd learning rate: step 1 (finite loss) throws the weights to ~1e29, so every later loss is NaN."""
    return run_to_end(pretrain_argv(data, save_dir, variant, ds_config=str(ds_config), **{
        "train.train_steps": "3", "train.save_interval": str(save_interval), "train.keep_last": "3",
        "train.lr": "1.0e+30", "train.nonfinite_loss": policy}), expect=expect)


def test_nonfinite_loss_stop_ends_the_run_with_one_line(tiny_corpus_data, tmp_path):
    output = run_nonfinite(tiny_corpus_data, tmp_path / "run", "stop", ZERO0, expect=1)
    assert "Traceback" not in output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert errors == ["error: non-finite loss at step 2; stopping (train.nonfinite_loss=stop; set it to skip to "
                      "skip such steps and count them)"], output[-3000:]
    assert [r["step"] for r in records(tmp_path / "run")] == [1]
    assert checkpoint_files.latest_tag(tmp_path / "run") is None, "a stopped run must not checkpoint the broken step"


@pytest.mark.parametrize("ds_name", ["zero0", "zero2"])  # our own skip (ZeRO-0 fp32) and DeepSpeed's overflow skip
def test_nonfinite_loss_skip_continues_counts_and_applies_nothing(ds_name, tiny_corpus_data, tmp_path):
    import torch

    save_dir = tmp_path / "run"
    run_nonfinite(tiny_corpus_data, save_dir, "skip", REPO / "ds_configs" / f"{ds_name}.json", variant="token_drop",
                  save_interval=1)
    logged = [r for r in records(save_dir) if "loss" in r]
    assert [r["step"] for r in logged] == [1, 2, 3]
    assert math.isfinite(logged[0]["loss"]) and all(r["loss"] is None for r in logged[1:])  # NaN is written null
    assert [r["skipped_steps"] for r in logged] == [0, 1, 2]  # each skipped step counted once

    # the skipped updates were not applied: weights and the token-drop importance after step 3 are those after
    # step 1 bit for bit (a skip that still applied momentum or weight decay would move ~1e29 weights by ~1e30)
    assert checkpoint_files.latest_tag(save_dir) == "step_0000003"
    after_1, after_3 = (torch.load(save_dir / "checkpoints" / f"step_000000{step}" / "mp_rank_00_model_states.pt",
                                   map_location="cpu", weights_only=False)["module"] for step in (1, 3))
    assert any("importance" in name for name in after_3) and sorted(after_1) == sorted(after_3)
    assert all(value.isfinite().all() for value in after_3.values() if value.is_floating_point())
    changed = [name for name in after_3 if not torch.equal(after_1[name], after_3[name])]
    assert not changed, f"skipped steps changed {changed}"


@pytest.mark.parametrize(("name", "expected"), [
    ("invalid_yaml", "is not valid YAML"),
    ("yaml_not_a_mapping", "a run config is a mapping of sections"),
    ("missing_yaml", "does not exist (--config takes a YAML file"),
    ("invalid_ds_json", "is not valid JSON (Expecting"),
])
def test_bad_config_files_are_one_line_naming_the_file(name, expected, tmp_path, monkeypatch, capsys):
    config, ds = tmp_path / "run.yaml", tmp_path / "ds.json"
    config.write_text({"invalid_yaml": "model:\n  hidden_size: [64\n", "yaml_not_a_mapping": "- a\n- b\n"}
                      .get(name, "train:\n  train_steps: 1\n"))
    ds.write_text('{"zero_optimization": {"stage": 0},}' if name == "invalid_ds_json" else "{}")
    if name == "missing_yaml":
        config.unlink()
    capsys.readouterr()
    argv = ["--config", str(config), "--deepspeed_config", str(ds)]
    assert run_in_this_process(argv, monkeypatch) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    named = ds if name == "invalid_ds_json" else config
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(named) in lines[0] and expected in lines[0], lines

    monkeypatch.setenv("MEGATRON_NARROW_DEBUG", "1")  # the traceback stays available
    assert run_in_this_process(argv, monkeypatch) == 2
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and err.strip().splitlines()[-1] == lines[0]


def test_only_set_up_errors_are_refusals_a_training_bug_keeps_its_traceback(capsys):
    """A ValueError raised around set-up (`refusing()`) is one `error:` line and exit 2; one raised later, while
    training, is a bug: it propagates with its traceback instead of being printed as a refusal."""
    from megatron_narrow.cli import refusing
    from megatron_narrow.entry import run_entry

    argv = ["--deepspeed_config", "unused.json"]

    def refused(config, ds_config, stop) -> None:
        with refusing():
            raise ValueError("data.seq_len=7: give at least 8")

    def load(path, overrides) -> None:
        return None

    assert run_entry(argv, lambda: (load, refused), description="", sections="") == 2
    assert capsys.readouterr().err.strip() == "error: data.seq_len=7: give at least 8"

    def bug(config, ds_config, stop) -> None:
        raise ValueError("operands could not be broadcast together")

    with pytest.raises(ValueError, match="operands could not be broadcast"):
        run_entry(argv, lambda: (load, bug), description="", sections="")
    assert "error:" not in capsys.readouterr().err
