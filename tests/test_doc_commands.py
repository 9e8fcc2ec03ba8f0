"""Every shell command of README.md and docs/ runs as written (tests/doc_commands.py reads them from the markdown).

Here: the marker rule, the test command, the data pipeline (one node and a real SLURM job array), and the tools
run on a finished run. The launch commands run in test_train_launchers.py, the SLURM pretraining script in
test_slurm_preemption.py, the quickstart in test_quickstart.py and fine-tuning in test_finetune.py.
"""

from __future__ import annotations

import gzip
import json
import re
import shutil
import time
from pathlib import Path

import pytest

from .conftest import REPO
from .doc_commands import all_blocks, doc_block, doc_workspace
from .slurm_cluster import LocalSlurm, slurm_installed
from .test_preprocess import tree_bytes


def test_every_shell_block_is_run_by_a_test_or_marked_illustrative():
    blocks = all_blocks()
    assert len(blocks) >= 10, [b.where for b in blocks]
    unmarked = [b.where for b in blocks if b.kind is None]
    assert not unmarked, f"shell blocks without <!-- doc-test: NAME --> or <!-- illustrative: REASON -->: {unmarked}"
    assert all(b.label for b in blocks), "an illustrative block must say why it is not run"
    names = [b.label for b in blocks if b.kind == "doc-test"]
    assert len(names) == len(set(names)), f"a doc-test name is used twice: {sorted(names)}"
    quoted = set()  # every name a test passes to doc_block (literally, or from a table of launches)
    for path in (REPO / "tests").glob("test_*.py"):
        quoted |= set(re.findall(r"\"([\w-]+)\"", path.read_text()))
    assert set(names) <= quoted, f"marked doc-test but run by no test: {sorted(set(names) - quoted)}"

def test_ci_runs_exactly_the_readme_test_command():
    (command,) = doc_block("tests").script().splitlines()
    ci = [line for line in (REPO / ".ci/run").read_text().splitlines() if line and not line.startswith(("#", "set",
                                                                                                        "cd"))]
    assert ci == [command], ci


def write_corpus(directory: Path, documents: list[str], parts: int, suffix: str = ".jsonl.gz") -> list[Path]:
    """`documents` as `parts` gzipped JSONL files of different sizes."""
    directory.mkdir(parents=True, exist_ok=True)
    bounds = [len(documents) * i * (i + 1) // (parts * (parts + 1)) for i in range(parts + 1)]
    paths = []
    for index, (lo, hi) in enumerate(zip(bounds, bounds[1:], strict=False)):
        path = directory / f"part{index}{suffix}"
        opener = gzip.open if suffix.endswith(".gz") else open
        with opener(path, "wt", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": text}) + "\n" for text in documents[lo:hi])
        paths.append(path)
    return paths


def test_readme_data_pipeline_runs_as_written(tmp_path, stdlib_documents):
    """Tokenizer, preprocessing (two inputs, one gzipped), verification and the packing statistics: the README's
    blocks with a 1000-piece vocabulary and two workers."""
    work = doc_workspace(tmp_path / "work")
    (corpus,) = write_corpus(work, stdlib_documents[:1000], 1, ".jsonl")
    corpus.rename(work / "corpus.jsonl")
    with gzip.open(work / "corpus.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write((work / "corpus.jsonl").read_text())
    (work / "more.txt").write_text("\n".join(t.replace("\n", " ") for t in stdlib_documents[1000:1200]) + "\n")
    result = doc_block("readme-data-pipeline").run(work, replace={"--vocab-size 32000": "--vocab-size 1000",
                                                                  "--workers 16": "--workers 2"})
    manifest = json.loads((work / "data/corpus/index.json").read_text())
    assert [i["name"] for i in manifest["inputs"]] == ["corpus.jsonl.gz", "more.txt"]
    assert manifest["totals"]["documents"] == 1200 and manifest["rejected_total"] == 0
    assert manifest["tokenizer"]["vocab_size"] == 1000 and (work / "tok/spm.model").is_file()
    assert "ok" in result.stdout.lower(), result.stdout[-2000:]
    stats = doc_block("readme-data-stats").run(work).stdout
    assert "segments" in stats and "512" in stats, stats


@pytest.fixture(scope="module")
def local_slurm(tmp_path_factory):
    if not slurm_installed():
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


def test_the_tools_run_on_finished_runs_as_written(tmp_path, reference_runs):
    """Comparing runs, evaluating one, plotting and exporting: the README's and docs/cluster.md's commands on
    copies of finished 10-step runs."""
    work = doc_workspace(tmp_path / "work")
    for variant in ("bert", "narrow"):
        shutil.copytree(reference_runs(variant), work / "runs" / variant)
    compared = doc_block("readme-compare-runs").run(work, expect=(0, 3))  # 3: not past the unigram baseline yet
    assert (work / "compare.png").read_bytes().startswith(b"\x89PNG")
    assert "unigram baseline" in compared.stdout, compared.stdout[-2000:]
    doc_block("cluster-plot").run(work, replace={"SAVE_DIR [OTHER_RUN ...]": "runs/narrow runs/bert"})
    assert (work / "loss.png").read_bytes().startswith(b"\x89PNG")  # several runs: one figure here

    shutil.copytree(work / "runs/narrow", work / "runs/quickstart/pretrain")
    doc_block("readme-convert").run(work)
    assert json.loads((work / "runs/quickstart/hf/config.json").read_text())["full_length_layers"] == 2
    doc_block("cluster-convert").run(work, replace={"SAVE_DIR": "runs/bert"})
    assert (work / "hf_model/model.safetensors").is_file()
