"""SIGTERM (cluster preemption) checkpoints and exits cleanly; a run can start from a Hugging Face directory."""

from __future__ import annotations

import json
import runpy
import signal
import time

import pytest

from .conftest import REPO
from .runs import STEPS, latest, losses, pretrain_argv, run_pretraining, start_pretraining


def stop_mid_run(argv: list[str], save_dir, signum: int, *, group: bool) -> tuple[int, str, int]:
    """Start a run, send `signum` once two steps are logged (to its whole process group, as a terminal's Ctrl-C
    or SLURM's --signal does, or to the main process only); returns (exit code, output, last logged step)."""
    process = start_pretraining(argv)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if (save_dir / "metrics.jsonl").is_file() and len(losses(save_dir)) >= 2:
            break
        time.sleep(0.01)
    assert process.poll() is None, "the run ended before the signal"
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

    output = run_pretraining(pretrain_argv(tiny_corpus_data, save_dir, "narrow", **workers))
    assert f"resumed from step {stopped_at}" in output
    assert losses(save_dir) == losses(reference_runs("narrow"))


def test_init_from_hugging_face_starts_from_its_weights(tmp_path, tiny_corpus_data, reference_runs):
    """Continue pretraining from an HF export of a trained run: the first loss starts where that run ended,
    far below a fresh model's."""
    trained = reference_runs("bert")
    hf_dir = tmp_path / "hf"
    tool = runpy.run_path(str(REPO / "tools/convert_checkpoint_to_hf.py"))
    assert tool["main"](["--checkpoint", str(trained), "--output", str(hf_dir)]) == 0
    assert json.loads((hf_dir / "config.json").read_text())["vocab_size"] == 1000
    (hf_dir / "stale.bin").write_bytes(b"from another model")  # converting again: refused, then replaced
    assert tool["main"](["--checkpoint", str(trained), "--output", str(hf_dir)]) == 2
    assert (hf_dir / "stale.bin").is_file()
    assert tool["main"](["--checkpoint", str(trained), "--output", str(hf_dir), "--overwrite"]) == 0
    assert not (hf_dir / "stale.bin").exists() and (hf_dir / "model.safetensors").is_file()

    fresh = losses(trained)[1]
    continued = tmp_path / "continued"
    run_pretraining(pretrain_argv(tiny_corpus_data, continued, "bert", **{"train.init_from_hf": str(hf_dir)}))
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
