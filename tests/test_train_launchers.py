"""The documents' launch commands, as written, on two local CPU ranks: the README's deepspeed command, and
docs/cluster.md's deepspeed with a hostfile, mpirun with a hostfile (ranks through mpi4py) and torchrun's
two-node command as two torchrun processes meeting at a c10d rendezvous on localhost. Each run reproduces one
process with the same global batch (the warm runs of tests/runs.py cover the variants under every layout)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from .conftest import REPO, tiny_train_overrides
from .distributed import free_port
from .doc_commands import doc_block, doc_workspace
from .runs import losses, records, run_to_end

STEPS = 6
TINY = {"model.hidden_dropout": "0.0", "model.attention_dropout": "0.0", "train.global_batch_size": "16",
        "train.precision": "fp32"}  # the base configs train bf16; fp32 keeps the comparison at 1e-5
MPI_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1", "OMPI_MCA_btl": "self,tcp",
           "OMPI_MCA_btl_tcp_if_include": "lo", "OMPI_MCA_oob_tcp_if_include": "lo"}
# DeepSpeed checks a hostfile's nodes over passwordless ssh: here the node is this machine (tests/simulated_node/ssh)
SSH_TO_THIS_MACHINE = {"PATH": f"{REPO / 'tests/simulated_node'}:{os.environ['PATH']}"}
NARROWBERT_BASE = "examples/configs/narrowbert_base.yaml"
# doc block -> (its config, the variant it trains, what shrinks it to two local ranks)
LAUNCHES = {
    "readme-pretrain": ("examples/configs/tiny_cpu.yaml", "token_drop",
                        {"train.train_steps=200": f"train.train_steps={STEPS}"}),
    "cluster-deepspeed-hostfile": (NARROWBERT_BASE, "narrow", {"examples/hostfile.example": "hostfile",
                                                               "train.save_dir=/shared/runs/nb": ""}),
    "cluster-mpirun": (NARROWBERT_BASE, "narrow", {"-np 16": "-np 2"}),
    "cluster-torchrun": (NARROWBERT_BASE, "narrow", {"--nproc_per_node 8": "--nproc_per_node 1"}),
}


def launch(name: str, work: Path, data, save_dir: Path) -> str:
    """Run the block `name` in `work` with the tiny overrides appended; returns its output."""
    config, variant, replace = LAUNCHES[name]
    block = doc_block(name)
    append = " ".join(tiny_train_overrides(data, save_dir, variant, steps=STEPS, **TINY))
    if name == "cluster-torchrun":  # two nodes: the same command twice, one rendezvous
        replace = {**replace, "HOST:29500": f"127.0.0.1:{free_port()}"}
        nodes = [block.start(work, replace=replace, append=append) for _ in range(2)]
        return "".join(block.finish(node, timeout=300).stderr for node in nodes)
    port = str(free_port())  # not DeepSpeed's default 29500, which another test may hold
    if name == "readme-pretrain":
        replace = {**replace, "deepspeed --num_gpus": f"deepspeed --master_port {port} --num_gpus"}
    env = {"cluster-mpirun": MPI_ENV, "cluster-deepspeed-hostfile": SSH_TO_THIS_MACHINE}.get(name, {})
    return block.run(work, replace=replace, append=append, env={**env, "MASTER_PORT": port}, timeout=300).stderr


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_corpus_data):
    """(config, variant) -> per-step losses of one process taking the global batch of 16 at once (made once)."""
    made: dict[tuple[str, str], dict[int, float]] = {}

    def get(config: str, variant: str) -> dict[int, float]:
        if (config, variant) not in made:
            save_dir = tmp_path_factory.mktemp("one_process") / "run"
            run_to_end(["--config", str(REPO / config), "--deepspeed_config", str(REPO / "ds_configs/zero1.json"),
                        *tiny_train_overrides(tiny_corpus_data, save_dir, variant, steps=STEPS,
                                              **{**TINY, "train.micro_batch_size": "16"})])
            made[config, variant] = losses(save_dir)
        return made[config, variant]

    return get


@pytest.mark.parametrize("name", list(LAUNCHES))
def test_documented_launch_on_two_ranks_equals_one_process(name, tmp_path, tiny_corpus_data, one_process):
    """Two data-parallel ranks find their rank (from the launcher's environment, mpi4py, or the c10d rendezvous)
    and read different halves of every global batch: their per-step losses equal one process with the same
    global batch at 1e-5. Two ranks reading the same data, or one rank training alone, would give other losses."""
    config, variant, _ = LAUNCHES[name]
    work = doc_workspace(tmp_path / "work")
    (work / "hostfile").write_text("localhost slots=2\n")  # the deepspeed launcher's format
    (work / "hosts").write_text("localhost slots=2\n")  # Open MPI's
    parallel = tmp_path / "dp2"
    stderr = launch(name, work, tiny_corpus_data, parallel)
    a, b = one_process(config, variant), losses(parallel)
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-5, f"{name} step {step}: one process {a[step]!r}, two ranks {b[step]!r}"
    assert a[STEPS] < a[1], "the tiny run must learn"
    assert [r["consumed_samples"] for r in records(parallel)] == [16 * step for step in range(1, STEPS + 1)]
    assert "Traceback" not in stderr

