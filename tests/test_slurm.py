"""docs/cluster.md's SLURM commands on a real one-node SLURM (tests/slurm_cluster.py), one cluster for the module:
the preprocessing job array, and pretraining (examples/pretrain_slurm.sbatch) signalled as a preempting scheduler
does.

SLURM signals every process of the step (the DataLoader worker too). The run must save a checkpoint and exit 75,
the batch script must requeue the job, and the requeued job must resume and finish with the losses of an
uninterrupted run, bit for bit. The signal is `scancel --signal=TERM`, SLURM's own delivery to the tasks of the
job's steps, which is how `--signal=TERM@300` reaches them too; waiting for a time limit instead would cost ~30 s
more, since slurmctld checks limits only every 30 s.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest

from .conftest import REPO, write_corpus
from .distributed import free_port
from .doc_commands import doc_block, doc_workspace
from .runs import losses, pretrain_argv, start_run
from .slurm_cluster import LocalSlurm, slurm_installed
from .test_preprocess import tree_bytes

STEPS = 100  # ~0.03 s each: the job is signalled once two steps are logged


@pytest.fixture(scope="module")
def local_slurm(tmp_path_factory):
    if not slurm_installed():
        if os.environ.get("CI"):
            pytest.fail("slurm-wlm is not installed: tools/install.sh installs it")
        pytest.skip("slurm-wlm is not installed (tools/install.sh installs it)")
    with LocalSlurm(tmp_path_factory.mktemp("slurm")) as slurm:
        yield slurm


def test_cluster_preprocessing_on_one_node_and_as_a_slurm_array_give_the_same_dataset(
        tmp_path, stdlib_documents, minilm_dir, local_slurm):
    """docs/cluster.md step 1 as written: the one-node command, and the SLURM job array (real `sbatch --array` on
    a local SLURM; three tasks of one CPU here) whose last task merges into data/corpus; then verify_data.py and
    data_stats.py on that directory. Both ways give the same shards, byte for byte."""
    datasets = {}
    for way in ("one-node", "slurm"):
        work = doc_workspace(tmp_path / way)
        write_corpus(work / "corpus", stdlib_documents[:1500], 3)
        (work / "data").mkdir()
        shutil.copy(minilm_dir / "vocab.txt", work / "data/vocab.txt")
        if way == "one-node":
            doc_block("cluster-preprocess-one-node").run(work, replace={"--workers 16": "--workers 2"})
        else:
            doc_block("cluster-preprocess-slurm").run(
                work, env=local_slurm.env, replace={"sbatch --array=0-7": "sbatch --cpus-per-task=1 --array=0-2"})
            deadline = time.monotonic() + 180
            while local_slurm.run(["squeue", "-h"]).stdout.strip():
                assert time.monotonic() < deadline, local_slurm.run(["squeue"]).stdout
                time.sleep(0.3)
            logs = "".join(p.read_text() for p in work.glob("slurm-*.out"))
            assert (work / "data/corpus/index.json").is_file(), logs[-3000:]
            assert sorted(p.name for p in (work / "data/corpus.parts").iterdir()) == [
                "0", "0.done", "1", "1.done", "2", "2.done"]
        checked = doc_block("cluster-verify-data").run(work).stdout
        assert "ok" in checked.lower() and "segments" in checked, checked
        datasets[way] = work / "data/corpus"
    one, array = (tree_bytes(datasets[way]) for way in ("one-node", "slurm"))
    shards = sorted(name for name in one if name.startswith("shard_"))
    assert shards and shards == sorted(name for name in array if name.startswith("shard_"))
    assert all(one[name] == array[name] for name in shards)
    assert json.loads(one["index.json"])["totals"] == json.loads(array["index.json"])["totals"]


def argv(data, save_dir) -> list[str]:
    return pretrain_argv(data, save_dir, "narrow", **{"train.train_steps": str(STEPS), "train.num_workers": "1",
                                                      "train.save_interval": "0"})


def test_slurm_preemption_checkpoints_requeues_and_resumes_exactly(tmp_path, tiny_corpus_data, local_slurm):
    reference_dir = tmp_path / "reference"
    reference = start_run(argv(tiny_corpus_data, reference_dir))  # uninterrupted, beside the job

    save_dir, log = tmp_path / "slurm_run", tmp_path / "job.log"
    job_env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port()),
               "DS_CONFIG": "ds_configs/zero0.json"}
    slurm = local_slurm
    options = ["--parsable", "--nodes=1", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1",
               "--time=10", f"--output={log}"]  # one CPU rank
    submitted = doc_block("cluster-slurm-pretrain").run(REPO, env={**job_env, **slurm.env}, replace={
        "sbatch examples/pretrain_slurm.sbatch": f"sbatch {' '.join(options)} examples/pretrain_slurm.sbatch",
        "examples/configs/narrowbert_base.yaml": "examples/configs/tiny_cpu.yaml"},
        append=" ".join(argv(tiny_corpus_data, save_dir)[4:]))
    job = submitted.stdout.strip().split(";")[0]
    deadline = time.monotonic() + 120
    while not ((save_dir / "metrics.jsonl").is_file() and len(losses(save_dir)) >= 2):
        assert time.monotonic() < deadline, ("the job never trained", slurm.job(job), log.read_text()[-3000:])
        time.sleep(0.05)
    slurm.run(["scancel", "--signal=TERM", job])
    requeued = slurm.wait_for(job, lambda info: (info.get("Restarts") == "1" and info["JobState"] == "PENDING")
                              or info["JobState"] in ("COMPLETED", "FAILED", "TIMEOUT", "CANCELLED"), timeout=120)
    assert requeued.get("Restarts") == "1", (requeued, log.read_text()[-3000:])
    # SLURM holds a requeued job for two minutes: release it, and again whenever the settling requeue holds it
    # back. Not before the node is idle and a few seconds have passed: slurmd refuses to start a job whose previous
    # run it is still cleaning up, or that it revoked within the same seconds ("Job credential revoked").
    deadline = time.monotonic() + 30
    while slurm.run(["sinfo", "-h", "-o", "%t"], check=False).stdout.strip() != "idle":
        assert time.monotonic() < deadline, "the node never became idle after the requeue"
        time.sleep(0.3)
    time.sleep(3)
    deadline = time.monotonic() + 60
    while True:
        info = slurm.job(job)
        if info.get("JobState") not in ("PENDING", "REQUEUED", "COMPLETING", None):
            break  # running (or already done)
        assert time.monotonic() < deadline, ("the requeued job never started", info)
        if info.get("Reason") == "BeginTime":
            slurm.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=False)
        time.sleep(0.3)
    done = slurm.wait_for(job, lambda info: info["JobState"] in ("COMPLETED", "FAILED", "TIMEOUT", "CANCELLED"),
                          timeout=240)
    output = log.read_text()
    assert done["JobState"] == "COMPLETED" and done["ExitCode"] == "0:0", (done, output[-3000:])
    assert "Traceback" not in output, output[-3000:]
    stopped = [line for line in output.splitlines() if "SIGTERM: checkpoint saved at step" in line]
    assert len(stopped) == 1, output[-3000:]
    step = int(stopped[0].split("step ")[1].split(";")[0])
    assert 0 < step < STEPS
    assert "stopped early with a checkpoint; requeueing it to resume" in output
    assert f"resumed from step {step}" in output

    assert reference.wait(timeout=300) == 0, reference.output()[-3000:]
    expected = losses(reference_dir)
    assert sorted(expected) == list(range(1, STEPS + 1))
    assert losses(save_dir) == expected
