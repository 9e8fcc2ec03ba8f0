"""train.wandb_project with WANDB_MODE=offline: the run logs metrics.jsonl's records and its config to Weights &
Biases, and a resumed run continues the same W&B run."""

from __future__ import annotations

import json

from .runs import pretrain_argv, records, run_to_end


def test_wandb_offline_logs_the_records_and_the_config_and_resumes_the_same_run(tmp_path, tiny_corpus_data):
    save_dir = tmp_path / "run"
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(tmp_path)}
    settings = {"train.wandb_project": "megatron_narrow_tests", "train.save_interval": "2",
                "train.eval_interval": "2", "train.eval_steps": "1"}
    run_to_end(pretrain_argv(tiny_corpus_data, save_dir, "token_drop", **settings, **{"train.train_steps": "2"}),
                    env=env)
    run_to_end(pretrain_argv(tiny_corpus_data, save_dir, "token_drop", **settings, **{"train.train_steps": "4"}),
                    env=env)  # resumes from step 2

    run_id = (save_dir / "wandb_run_id").read_text().strip()
    runs = sorted((save_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(f"-{run_id}") for r in runs), runs
    logged = [r for r in records(save_dir) if "loss" in r]
    assert [r["step"] for r in logged] == [1, 2, 3, 4]
    for run in runs:  # W&B's offline log: protobuf records whose keys and values are stored as plain strings
        data = next(run.glob("run-*.wandb")).read_bytes()
        for key in (b"train/loss", b"train/tokens_per_s", b"eval_loss", b"token_drop_force_keep",
                    b"megatron_narrow_tests"):
            assert key in data, (run.name, key)
    last = json.dumps(logged[-1]["loss"]).encode()
    assert last in next(runs[1].glob("run-*.wandb")).read_bytes()  # the resumed run logged step 4's loss
