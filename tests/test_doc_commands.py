"""Every shell command of README.md and docs/ runs as written (tests/doc_commands.py reads them from the markdown).

Here: the marker rule, the test command, the README's data pipeline, and the tools run on a finished run. The
launch commands run in test_train_launchers.py, the cluster preprocessing and the SLURM pretraining script in
test_slurm.py, the quickstart in test_quickstart.py and fine-tuning in test_finetune.py.
"""

from __future__ import annotations

import gzip
import json
import re
import shutil

from .conftest import REPO, write_corpus
from .doc_commands import all_blocks, doc_block, doc_workspace


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
