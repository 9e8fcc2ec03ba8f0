"""The README's main job, end to end: its command (read from README.md) on a small corpus with a short run.

Every stage runs as the user runs it (tokenizer, preprocessing with two workers, verify, the deepspeed
launcher on two CPU ranks, export, fill-mask in stock transformers); only the install step (what CI just
did) is skipped and the run is 300 short steps (sequences of 64, micro-batches of 8) instead of 600.
"""

from __future__ import annotations

import json
import re

import torch

from megatron_narrow.training.precision import fast_bf16

from .conftest import REPO, write_jsonl
from .distributed import free_port
from .doc_commands import doc_block
from .runs import run_tool


def test_quickstart_runs_end_to_end(tmp_path, stdlib_documents):
    corpus = write_jsonl(tmp_path / "docs.jsonl", stdlib_documents[:1500])
    work = tmp_path / "quickstart"
    args = ["--skip-install", "--work-dir", str(work), "--input", str(corpus), "--vocab-size", "1000", "--",
            "train.train_steps=300", "data.seq_len=64", "data.max_predictions=10", "train.micro_batch_size=8",
            "train.warmup_steps=30", "train.log_interval=50", "train.eval_interval=300"]
    result = doc_block("quickstart").run(REPO, append=" ".join(args), env={"MASTER_PORT": str(free_port())})
    stages = re.findall(r"^== (\d)/8", result.stdout, flags=re.M)
    fast, why = fast_bf16(torch.device("cpu"))  # tiny_cpu.yaml trains with train.precision=auto
    assert f"\nprecision {'bf16' if fast else 'fp32'} (train.precision=auto: {why})\n" in result.stdout
    assert stages == [str(i) for i in range(1, 9)], stages
    summary = re.search(r"^done: step 300 \(300 this run, [\d.]+ min\) \| last loss [\d.]+ \| last validation loss "
                        r"[\d.]+\n  checkpoint  (\S+)", result.stdout, flags=re.M)
    assert summary and summary.group(1) == str(work / "pretrain" / "checkpoints" / "step_0000300"), result.stdout
    assert "tensorboard --logdir" in result.stdout and "tools/convert_checkpoint_to_hf.py" in result.stdout
    png = (work / "pretrain" / "loss.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000  # a drawn figure, not an empty canvas
    accuracy = {name: float(value) for name, value in re.findall(
        r"^  (trained model|unigram baseline|untrained model)\s+([\d.]+)%", result.stdout, flags=re.M)}
    assert set(accuracy) == {"trained model", "unigram baseline", "untrained model"}, result.stdout[-3000:]
    # past the unigram plateau, which lasts a few hundred steps (measured 8.0% against 6.4%; 80 steps: 6.4% = 6.4%)
    assert accuracy["trained model"] > accuracy["unigram baseline"] > accuracy["untrained model"], accuracy
    assert len(re.findall(r"^    answer '.*': before \[.*\] -> after \[.*\]$", result.stdout, flags=re.M)) == 3
    guesses = re.findall(r"^  (0\.\d{3})  Return the number of(.*) in the list\.$", result.stdout, flags=re.M)
    assert len(guesses) == 5 and all(0 < float(score) <= 1 for score, _ in guesses), result.stdout[-2000:]
    assert f"done: model in {work}/hf" in result.stdout

    records = [json.loads(line) for line in (work / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "loss" in r]
    assert [r["step"] for r in logged] == [50, 100, 150, 200, 250, 300] and logged[-1]["loss"] < logged[0]["loss"]
    assert logged[-1]["consumed_samples"] == 300 * 2 * 8  # two ranks x micro-batch 8
    assert any("eval_loss" in r for r in records)
    for name in ("config.json", "model.safetensors", "modeling_narrow_bert.py", "tokenizer.json", "README.md"):
        assert (work / "hf" / name).is_file(), name


def test_make_offline_corpus_writes_the_stdlib_docstrings(tmp_path, stdlib_documents):
    """The quickstart's default corpus (step 2, skipped above by --input): the same documents as the fixture."""
    out = tmp_path / "corpus.jsonl"
    assert run_tool("make_offline_corpus", ["--output", str(out), "--max-documents", "50", "--repeat", "2"]) == 0
    texts = [json.loads(line)["text"] for line in out.read_text().splitlines()]
    assert texts == stdlib_documents[:50] * 2
