"""Nothing lost on resume: SIGKILL after a checkpoint gives the same losses bit for bit; a damaged or missing
newest checkpoint falls back to the previous complete one; a run never starts fresh over checkpoints;
the schedule is a pure function of the step and the current config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_narrow.formats import checkpoint_files

from .runs import (
    KILL_AFTER,
    STEPS,
    assert_same_weights,
    copy_run_dir,
    kill_once_checkpointed,
    latest,
    losses,
    pretrain_argv,
    records,
    resume_from,
    run_to_end,
)


@pytest.mark.parametrize(("variant", "packing"), [("bert", "none"), ("narrow", "none"), ("token_drop", "none"),
                                                  ("narrow", "segments")])
def test_sigkill_then_resume_gives_identical_losses(tmp_path, tiny_corpus_data, reference_runs, variant, packing):
    expected = losses(reference_runs(variant, packing))
    assert sorted(expected) == list(range(1, STEPS + 1))
    assert expected[STEPS] < expected[1], "the tiny run must learn"

    killed = tmp_path / "killed"
    argv = pretrain_argv(tiny_corpus_data, killed, variant, **{"data.packing": packing})
    assert kill_once_checkpointed(argv, killed, KILL_AFTER) == KILL_AFTER
    killed_at = max(losses(killed))
    assert KILL_AFTER <= killed_at < STEPS, (killed_at, latest(killed))

    output = run_to_end(argv)
    assert f"resumed from step {KILL_AFTER}" in output
    resumed = losses(killed)
    assert sorted(resumed) == list(range(1, STEPS + 1)), "metrics.jsonl must hold each step once"
    for step in range(KILL_AFTER + 1, STEPS + 1):
        assert resumed[step] == expected[step], f"step {step}: {resumed[step]!r} != {expected[step]!r}"
    assert_same_weights(killed, reference_runs(variant, packing))


def test_truncated_newest_checkpoint_falls_back_to_the_previous_one_bit_exact(tmp_path, tiny_corpus_data,
                                                                            reference_runs):
    """The newest checkpoint (step 10, named by `latest`) has a file cut short, as a full disk or a partial
    copy leaves it: the run says so in one line, resumes from step 9 and trains step 10 to the same loss."""
    reference = reference_runs("narrow")
    save_dir = copy_run_dir(reference, tmp_path / "run")
    newest = save_dir / "checkpoints" / f"step_{STEPS:07d}"
    assert latest(save_dir) == newest.name
    victim = max(newest.glob("*.pt"), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])

    output = run_to_end(pretrain_argv(tiny_corpus_data, save_dir, "narrow"))
    warnings = [line for line in output.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and newest.name in warnings[0] and victim.name in warnings[0], output
    assert "resuming from step_0000009" in warnings[0]
    assert "resumed from step 9" in output
    assert losses(save_dir) == losses(reference), "the redone step must equal the uninterrupted run bit for bit"
    assert "Traceback" not in output

    # `latest` naming a tag that is not there (a partial rsync): the newest complete tag resumes, nothing is
    # pruned, and no step is trained twice
    (save_dir / "checkpoints" / "latest").write_text("step_0000099\n")
    output = run_to_end(pretrain_argv(tiny_corpus_data, save_dir, "narrow", **{
        "train.train_steps": "2", "train.save_interval": "1", "train.keep_last": "1"}))
    assert "step_0000099: named by latest, but it does not exist" in output
    assert f"resumed from step {STEPS}" in output
    tags = sorted(p.name for p in (save_dir / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert tags == ["step_0000009", f"step_{STEPS:07d}"], tags
    assert losses(save_dir) == losses(reference)


def test_extending_a_run_and_changing_lr_follow_the_new_schedule(tmp_path, tiny_corpus_data, reference_runs):
    """Resume a finished 10-step run with train_steps=12 and a new lr: step 11 trains at the new schedule's
    rate for step 11 (never 0, never the old schedule's), and the change is reported in one line."""
    save_dir = copy_run_dir(reference_runs("narrow"), tmp_path / "run")
    new_lr, warmup, steps = 1.0e-3, 2, 12  # tiny_train_overrides: warmup 2; linear decay to min_lr 0
    output = run_to_end(pretrain_argv(tiny_corpus_data, save_dir, "narrow", **{
        "train.train_steps": str(steps), "train.lr": str(new_lr)}))
    changed = [line for line in output.splitlines() if line.startswith("config changed")]
    assert len(changed) == 1, output
    assert "train.lr 0.002 -> 0.001" in changed[0] and "train.train_steps 10 -> 12" in changed[0], changed
    lrs = {r["step"]: r["lr"] for r in records(save_dir) if "lr" in r}
    for step in (11, 12):  # the update of step s is the (s-1)-th after warmup's 2: lr x (1 - (s-1-2)/(12-2))
        assert lrs[step] == pytest.approx(new_lr * (1 - (step - 1 - warmup) / (steps - warmup)), rel=1e-12), lrs
    assert lrs[1] == pytest.approx(2.0e-3 / warmup, rel=1e-12), "warmup starts at lr/warmup_steps"


def test_resume_refuses_a_changed_model_shape_and_unusable_checkpoints(tmp_path, reference_runs, tiny_corpus_data):
    """Checked before any process-group work: one line naming both values, or naming every skipped tag."""
    from megatron_narrow.config import load_run_config
    from megatron_narrow.training.setup import check_resumable

    save_dir = copy_run_dir(reference_runs("narrow"), tmp_path / "run")
    argv = pretrain_argv(tiny_corpus_data, save_dir, "narrow")
    config_path, overrides = argv[1], argv[4:]
    run_config = load_run_config(config_path, [*overrides, "model.hidden_size=128", "model.num_heads=4"])
    refusal = r"step_0000010 with a changed model.hidden_size 64 -> 128; .*\(checkpoint -> config\)"
    with pytest.raises(ValueError, match=refusal):
        check_resumable(run_config)
    check_resumable(load_run_config(config_path, [*overrides, "train.lr=1e-3"]))  # a schedule change is fine
    with pytest.raises(ValueError, match=r"a changed data.packing none -> concat"):  # rows of another kind
        check_resumable(load_run_config(config_path, [*overrides, "data.packing=concat"]))

    for tag in checkpoint_files.all_tags(save_dir):
        (checkpoint_files.checkpoint_root(save_dir) / tag / checkpoint_files.COMPLETE_NAME).unlink()
    with pytest.raises(ValueError, match=r"holds 2 checkpoint\(s\) but none is usable .*train.restart=true"):
        check_resumable(load_run_config(config_path, overrides))
    restart = load_run_config(config_path, [*overrides, "train.restart=true"])
    check_resumable(restart)
    moved = checkpoint_files.move_aside(save_dir)
    assert sorted(p.name for p in moved.iterdir()) == ["latest", "metrics.jsonl", "step_0000009", "step_0000010"]
    assert not checkpoint_files.checkpoint_root(save_dir).exists()


def test_pruning_never_deletes_a_tag_newer_than_the_one_saved(tmp_path):
    from megatron_narrow.training import checkpoint

    class Engine:  # stands in for DeepSpeed: writes a tag directory with one file
        def save_checkpoint(self, root, tag, client_state, save_latest):
            (Path(root) / tag).mkdir(parents=True, exist_ok=True)
            (Path(root) / tag / "mp_rank_00_model_states.pt").write_bytes(b"x" * 10)

    root = checkpoint_files.checkpoint_root(tmp_path)
    (root / "step_0000050").mkdir(parents=True)  # an older save that was killed half-way
    (root / "step_0000200").mkdir(parents=True)  # a newer save that was killed half-way
    for step in (100, 150):
        checkpoint.save(Engine(), tmp_path, step, {}, run_config={}, tokenizer_model=None, keep_last=1,
                        is_rank0=True)
    assert checkpoint_files.all_tags(tmp_path) == ["step_0000150", "step_0000200"]
    assert checkpoint_files.latest_tag(tmp_path) == "step_0000150"
    checkpoint.save(Engine(), tmp_path, 300, {}, run_config={}, tokenizer_model=None, keep_last=2, is_rank0=True)
    assert checkpoint_files.all_tags(tmp_path) == ["step_0000150", "step_0000300"], "keep_last=2 complete tags"


def test_resume_drops_a_metrics_line_torn_by_the_kill(tmp_path):
    from megatron_narrow.training.metrics import MetricsLogger

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n'
                                            '{"step": 3, "loss": 1.0}\n{"step": 4, "lo')
    logger = MetricsLogger(tmp_path, enabled=True, resume_step=2, total_steps=10)
    logger.close()
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_a_checkpoint_from_before_packing_and_backends_resumes_and_converts(tmp_path, tiny_corpus_data,
                                                                             reference_runs):
    """Checkpoints written before this round have no model.attention_backend, data.packing, data.max_segments or
    index-cache keys in their run_config.json: they resume (their defaults are what those runs did, so the
    losses equal an uninterrupted run's) and convert to Hugging Face."""
    from megatron_narrow.convert.checkpoint import convert_checkpoint

    save_dir = resume_from(reference_runs("narrow"), tmp_path / "old", 9)
    new_keys = {"model": ("attention_backend",), "data": ("packing", "max_segments", "index_cache_dir",
                                                          "index_cache_shared")}
    for tag in checkpoint_files.all_tags(save_dir):
        path = checkpoint_files.checkpoint_root(save_dir) / tag / "run_config.json"
        config = json.loads(path.read_text())
        for section, keys in new_keys.items():
            for key in keys:
                config[section].pop(key)
        path.write_text(json.dumps(config))
        root = checkpoint_files.checkpoint_root(save_dir)
        checkpoint_files.write_completion_marker(root / tag)  # the file sizes changed
    hf_dir = convert_checkpoint(save_dir, tmp_path / "hf")
    assert (hf_dir / "config.json").is_file()
    output = run_to_end(pretrain_argv(tiny_corpus_data, save_dir, "narrow"))
    assert "resumed from step 9" in output
    assert losses(save_dir) == losses(reference_runs("narrow"))
