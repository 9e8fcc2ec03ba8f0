"""SIGTERM (cluster preemption) and Ctrl-C checkpoint and exit cleanly, also when the signal reaches one rank only; a
second Ctrl-C stops at once; a run can start from a Hugging Face directory."""

from __future__ import annotations

import json
import signal
import time

import pytest

from .conftest import REPO
from .runs import STEPS, latest, losses, pretrain_argv, run_to_end, run_tool, start_run_until


def start_and_wait_for_two_steps(argv: list[str], save_dir, world: int = 1):
    """A started run that has logged two steps."""
    return start_run_until(argv, lambda: (save_dir / "metrics.jsonl").is_file() and len(losses(save_dir)) >= 2,
                           world=world)


def stop_mid_run(argv: list[str], save_dir, signum: int, *, group: bool) -> tuple[int, str, int]:
    """Start a run, send `signum` once two steps are logged (to its whole process group, as a terminal's Ctrl-C
    or SLURM's --signal does, or to the main process only); returns (exit code, output, last logged step)."""
    process = start_and_wait_for_two_steps(argv, save_dir)
    process.send_signal(signum, group=group)
    code = process.wait()
    output = process.output()
    assert "Traceback" not in output, output[-3000:]
    return code, output, max(losses(save_dir))


@pytest.mark.parametrize(("signum", "group"), [(signal.SIGTERM, False), (signal.SIGINT, True),
                                               (signal.SIGTERM, True)], ids=["sigterm", "ctrl_c_group",
                                                                             "sigterm_group_with_workers"])
def test_signal_checkpoints_then_the_rerun_equals_an_uninterrupted_run(tmp_path, tiny_corpus_data, reference_runs,
                                                                       signum, group):
    """SIGTERM and Ctrl-C save a checkpoint at the step boundary and exit 75, also when the signal reaches the
    DataLoader workers (train.num_workers=1: they leave it to the main process); the rerun finishes the
    schedule with the losses of an uninterrupted run, bit for bit."""
    save_dir = tmp_path / "run"
    workers = {"train.num_workers": "1"} if group else {}
    code, output, stopped_at = stop_mid_run(pretrain_argv(tiny_corpus_data, save_dir, "narrow", **workers), save_dir,
                                            signum, group=group)
    assert code == 75, "stopped early with a checkpoint: EX_TEMPFAIL, run again to resume"
    assert stopped_at < STEPS, "the run must stop early"
    assert f"{signal.Signals(signum).name}: checkpoint saved at step {stopped_at}" in output
    assert latest(save_dir) == f"step_{stopped_at:07d}"

    output = run_to_end(pretrain_argv(tiny_corpus_data, save_dir, "narrow", **workers))
    assert f"resumed from step {stopped_at}" in output
    assert losses(save_dir) == losses(reference_runs("narrow"))


def test_a_second_ctrl_c_stops_at_once_without_a_checkpoint(tmp_path, tiny_corpus_data):
    """Ctrl-C twice, as a user does (the second after the first was acknowledged): the first asks for a checkpoint
    at the end of the step, the second exits 130 at once, before that step ends (long steps here: 8 micro-batches
    of 64 rows), and no checkpoint is written."""
    save_dir = tmp_path / "run"
    process = start_and_wait_for_two_steps(pretrain_argv(tiny_corpus_data, save_dir, "narrow", **{
        "train.train_steps": "1000", "train.save_interval": "0", "train.micro_batch_size": "64",
        "train.global_batch_size": "512"}), save_dir)
    process.send_signal(signal.SIGINT, group=True)
    deadline = time.monotonic() + 30
    while "interrupt: saving a checkpoint" not in process.output():
        assert time.monotonic() < deadline and process.poll() is None, process.output()[-2000:]
        time.sleep(0.005)
    sent = time.monotonic()
    process.send_signal(signal.SIGINT, group=True)
    assert process.wait() == 130
    assert time.monotonic() - sent < 5.0, "the second Ctrl-C must not wait for the step or the save"
    output = process.output()
    assert "second interrupt: stopping now, without a checkpoint" in output, output[-2000:]
    assert "checkpoint saved" not in output and latest(save_dir) is None


def test_sigterm_to_one_rank_checkpoints_every_rank(tmp_path, tiny_corpus_data):
    """SIGTERM reaches rank 1 of two only (a node's agent signals its own processes): the ranks agree at the next
    step boundary (an all-reduce of the flag), both write their part of one checkpoint (ZeRO-1: an optimizer
    shard each) and exit 75; the rerun resumes from it and finishes."""
    save_dir = tmp_path / "run"
    argv = pretrain_argv(tiny_corpus_data, save_dir, "narrow", ds_config=str(REPO / "ds_configs/zero1.json"),
                         **{"train.train_steps": "40", "train.save_interval": "0"})
    process = start_and_wait_for_two_steps(argv, save_dir, world=2)
    process.send_signal(signal.SIGTERM, ranks=[1])
    assert process.wait() == 75 and [p.exitcode for p in process.processes] == [75, 75]
    stopped_at = max(losses(save_dir))
    assert f"signal on another rank: checkpoint saved at step {stopped_at}" in process.output(0), process.output(0)
    tag = save_dir / "checkpoints" / f"step_{stopped_at:07d}"
    assert latest(save_dir) == tag.name and (tag / "complete.json").is_file()
    assert sorted(p.name for p in tag.glob("*optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    output = run_to_end(argv, world=2)
    assert f"resumed from step {stopped_at}" in output and max(losses(save_dir)) == 40


def test_init_from_hugging_face_starts_from_its_weights(tmp_path, tiny_corpus_data, reference_runs):
    """Continue pretraining from an HF export of a trained run: the first loss starts where that run ended,
    far below a fresh model's."""
    trained = reference_runs("bert")
    hf_dir = tmp_path / "hf"
    convert = ["--checkpoint", str(trained), "--output", str(hf_dir)]
    assert run_tool("convert_checkpoint_to_hf", convert) == 0
    assert json.loads((hf_dir / "config.json").read_text())["vocab_size"] == 1000
    (hf_dir / "stale.bin").write_bytes(b"from another model")  # converting again: refused, then replaced
    assert run_tool("convert_checkpoint_to_hf", convert) == 2
    assert (hf_dir / "stale.bin").is_file()
    assert run_tool("convert_checkpoint_to_hf", [*convert, "--overwrite"]) == 0
    assert not (hf_dir / "stale.bin").exists() and (hf_dir / "model.safetensors").is_file()

    fresh = losses(trained)[1]
    continued = tmp_path / "continued"
    run_to_end(pretrain_argv(tiny_corpus_data, continued, "bert", **{"train.init_from_hf": str(hf_dir)}))
    first = losses(continued)[1]
    assert first < fresh - 0.5, f"continued pretraining starts at {first:.3f}, a fresh model at {fresh:.3f}"
    assert first < losses(trained)[10] + 0.3, "it must start about where the trained run ended"
    check_init_from_hf_loads_every_weight(trained, hf_dir, tmp_path)


def check_init_from_hf_loads_every_weight(trained, hf_dir, tmp_path) -> None:
    """What the run loads is the trained checkpoint bit for bit; a missing head warns; a missing encoder tensor
    is refused (a half-fresh encoder would train silently)."""
    import torch
    from safetensors.torch import load_file, save_file

    from megatron_narrow.config import ModelConfig
    from megatron_narrow.model import BertForPreTraining
    from megatron_narrow.training.loop import _load_hf

    root = trained / "checkpoints"
    tag = root / (root / "latest").read_text().strip()
    model_config = ModelConfig(**json.loads((tag / "run_config.json").read_text())["model"])
    expected = torch.load(tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    model, said = BertForPreTraining(model_config), []
    _load_hf(model, str(hf_dir), said.append)
    assert said == []
    got = model.state_dict()
    names = [k for k in expected if k != "bert.token_importance.importance"]
    assert sorted(names) == sorted(k for k in got if k != "bert.token_importance.importance")
    for name in names:
        assert torch.equal(got[name], expected[name]), name

    state = load_file(str(hf_dir / "model.safetensors"))
    for dropped, outcome in (("cls.predictions.transform.dense.weight", "warning"),
                             ("bert.encoder.layer.2.attention.output.dense.weight", "error")):
        partial = tmp_path / f"partial_{outcome}"
        partial.mkdir()
        save_file({k: v for k, v in state.items() if k != dropped}, str(partial / "model.safetensors"))
        said.clear()
        if outcome == "warning":
            _load_hf(BertForPreTraining(model_config), str(partial), said.append)
            assert len(said) == 1 and said[0].startswith("warning:") and dropped in said[0], said
        else:
            with pytest.raises(ValueError, match="no weights for 1 encoder tensors"):
                _load_hf(BertForPreTraining(model_config), str(partial), said.append)
