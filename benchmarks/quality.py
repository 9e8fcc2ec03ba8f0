#!/usr/bin/env python
"""Does it hold up? bert, narrow and token_drop pretrained on real English text with equal budgets, then
fine-tuned on two downstream tasks, 3 seeds each, with this project's own tools.

Corpus: the docstrings of the Python standard library and of the installed packages (offline, real
English prose: ~40 MB here once exact duplicates are dropped). Documents are split once: 90% pretrain
(sentencepiece tokenizer, Arrow shards, packed rows of 128 tokens), 10% held out for the downstream
tasks, so no downstream sentence was seen as such in pretraining.

Pretraining: one single-process run per variant (gloo, CPU), the same model shape, data, batch, learning
rate schedule and number of steps (`equal steps`), MLM validation loss every tenth of the run. Then
`narrow_time`: NarrowBERT for as many steps as fit in bert's training time (`equal wall-clock`, from the
measured step times; evaluation time is not counted for any run).

Downstream (3 fine-tuning seeds per task and model; accuracy and span F1 in points):
- `library` (sequence classification, 6 classes): which library a held-out documentation sentence comes
  from (the six with the most held-out sentences, balanced). The library's own name is never in the
  sentence (such sentences are dropped), so the label has to be read from what the sentence talks about:
  tensors and devices, arrays and axes, tokenizers and checkpoints, e-mail headers and sockets.
- `replaced_words` (token classification, BIO tags): 15% of a sentence's words replaced by words drawn
  from the held-out text's own word frequencies; tag the replaced ones (ELECTRA's replaced-token
  detection). A replacement is an ordinary word on its own; only its context gives it away.
token_drop's checkpoint fine-tunes as plain BERT (token dropping is a pretraining method); narrow as
NarrowBERT.

Writes OUT (every figure as JSON), OUT's stem + `.md` (the table, mean +- std over seeds) and
`quality_loss_steps.png`, `quality_loss_seconds.png`, `quality_downstream.png` beside it.
Budget: under an hour on two CPU cores at --scale 1 (measured 48 min: corpus 2, pretraining 30, fine-tuning 16);
--scale multiplies the steps of every run and the downstream data.

  python benchmarks/quality.py --json runs/quality/quality.json [--scale 1.0] [--work-dir runs/quality]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_narrow.data.offline_corpus import (  # noqa: E402
    iter_installed_package_docstrings,
    iter_stdlib_docstrings,
)

VARIANTS = ("bert", "narrow", "token_drop")
MODELS = (*VARIANTS, "narrow_time")  # narrow_time: NarrowBERT for bert's wall-clock
TASKS = {"library": ("sequence", "accuracy"), "replaced_words": ("token", "span_f1")}
LIBRARIES = 6
VOCAB_SIZE = 8000
# model shape and pretraining recipe shared by every variant (NarrowBERT's paper: 2 full-length layers of 12;
# here 2 of 6; token dropping keeps half the tokens in its middle layers, as the paper)
MODEL = {"hidden_size": 128, "num_layers": 6, "num_heads": 4, "full_length_layers": 2,
         "max_position_embeddings": 128, "token_drop_keep_ratio": 0.5, "vocab_size": VOCAB_SIZE}
PRETRAIN_STEPS = 1000
PRETRAIN_BATCH = 32
FINETUNE_STEPS = 200
FINETUNE_EXAMPLES = (3000, 600)  # train, valid per task


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(command: list[str], log_file: Path) -> None:
    """Run one stage as its own process (one rank, gloo); its output goes to log_file. A failure raises with
    the log's tail, so a broken stage says why."""
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "DS_ACCELERATOR": "cpu",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(log_file, "w") as out:
        code = subprocess.call([sys.executable, *command], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    if code != 0:
        tail = log_file.read_text().splitlines()[-15:]
        raise RuntimeError(f"{' '.join(command[:2])} failed (exit {code}); {log_file}:\n" + "\n".join(tail))


# ---------------------------------------------------------------------------------------------- data


def is_prose(sentence: str) -> bool:
    """A full sentence of mostly plain words (not code, a table or a signature)."""
    words = sentence.split()
    plain = sum(bool(re.fullmatch(r"[A-Za-z][a-z]*[,.;:]?", w)) for w in words)
    return 8 <= len(words) <= 40 and plain >= 0.8 * len(words) and sentence.endswith(".")


def split_corpus(work: Path) -> tuple[Path, list[tuple[str, str]]]:
    """(pretraining JSONL, held-out (library, sentence) pairs): every tenth distinct docstring is held out."""
    pretrain, held_out, seen = [], [], set()
    sources = itertools.chain((("stdlib", t) for t in iter_stdlib_docstrings()), iter_installed_package_docstrings())
    for library, text in sources:
        if text not in seen:  # templated docstrings repeat across packages
            seen.add(text)
            (held_out if len(seen) % 10 == 0 else pretrain).append((library, text))
    path = work / "raw" / "pretrain.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for _, t in pretrain))
    sentences = set()
    for library, text in held_out:
        for paragraph in text.splitlines():
            for sentence in re.split(r"(?<=[.!?])\s+", paragraph):
                if is_prose(sentence):
                    sentences.add((library, " ".join(sentence.split())))
    log(f"corpus: {len(pretrain)} documents to pretrain on, {len(sentences)} held-out sentences")
    return path, sorted(sentences)


def replaced(words: list[str], rng: random.Random, vocabulary: list[str]) -> tuple[list[str], list[str]]:
    count = max(1, round(0.15 * len(words)))
    positions = set(rng.sample(range(len(words)), count))
    out, tags = [], []
    for i, word in enumerate(words):
        if i in positions:
            new = word
            while new.lower().strip(",.;:") == word.lower().strip(",.;:"):
                new = rng.choice(vocabulary)
            out.append(new)
            tags.append("B-REP")
        else:
            out.append(word)
            tags.append("O")
    return out, tags


def top_libraries(sentences: list[tuple[str, str]]) -> list[str]:
    """The LIBRARIES libraries with the most held-out sentences that do not name them (chosen once, on the
    whole held-out pool, so train and valid share the label set)."""
    counts: dict[str, int] = {}
    for library, sentence in sentences:
        if library.lower() not in sentence.lower():
            counts[library] = counts.get(library, 0) + 1
    return sorted(counts, key=lambda name: (-counts[name], name))[:LIBRARIES]


def library_examples(sentences: list[tuple[str, str]], libraries: list[str], count: int,
                     rng: random.Random) -> list[dict]:
    """Balanced examples of `libraries`, none naming its library."""
    by_library: dict[str, list[str]] = {name: [] for name in libraries}
    for library, sentence in sentences:
        if library in by_library and library.lower() not in sentence.lower():
            by_library[library].append(sentence)
    per_class = min(count // len(libraries), *(len(found) for found in by_library.values()))
    examples = [{"text": s, "label": name} for name in libraries for s in rng.sample(by_library[name], per_class)]
    rng.shuffle(examples)
    return examples


def write_tasks(sentences: list[tuple[str, str]], work: Path, sizes: tuple[int, int], seed: int = 0
                ) -> dict[str, dict]:
    """The two downstream tasks' train/valid JSONL files; held-out sentences are split between train and valid
    first, so no valid sentence is seen in fine-tuning."""
    rng = random.Random(seed)
    pool = sentences[:]
    rng.shuffle(pool)
    cut = len(pool) * sizes[1] // sum(sizes)
    splits = {"valid": pool[:cut], "train": pool[cut:]}
    vocabulary = [w for _, s in splits["train"] for w in s.split()]  # unigram frequencies by repetition
    libraries = top_libraries(pool)
    files: dict[str, dict] = {task: {} for task in TASKS}
    for split, wanted in zip(("train", "valid"), sizes, strict=True):
        tasks = {"library": library_examples(splits[split], libraries, wanted, rng), "replaced_words": []}
        for _, sentence in splits[split][:wanted]:
            tokens, tags = replaced(sentence.split(), rng, vocabulary)
            tasks["replaced_words"].append({"tokens": tokens, "tags": tags})
        for task, records in tasks.items():
            path = work / "tasks" / f"{task}_{split}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(r) + "\n" for r in records))
            files[task][split] = str(path)
            log(f"task {task} {split}: {len(records)} examples" + (
                f" ({', '.join(sorted({r['label'] for r in records}))})" if task == "library" else ""))
    return files


def prepare_data(work: Path) -> tuple[Path, Path, list[tuple[str, str]]]:
    """(tokenizer model, Arrow data directory, held-out sentences)."""
    corpus, sentences = split_corpus(work)
    tokenizer = work / "tokenizer" / "spm"
    run(["tools/train_tokenizer.py", "--input", str(corpus), "--model-prefix", str(tokenizer),
         "--vocab-size", str(VOCAB_SIZE)], work / "logs" / "tokenizer.log")
    data = work / "data"
    run(["tools/preprocess_data.py", "--input", str(corpus), "--output-dir", str(data), "--tokenizer-type",
         "sentencepiece", "--tokenizer-model", f"{tokenizer}.model", "--workers", "2", "--split-sentences",
         "--overwrite"], work / "logs" / "preprocess.log")
    log("tokenizer trained and corpus preprocessed")
    return Path(f"{tokenizer}.model"), data, sentences


# ------------------------------------------------------------------------------------------ training


def read_metrics(save_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (save_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def pretrain(model: str, steps: int, work: Path, tokenizer: Path, data: Path) -> dict:
    """One pretraining run; returns its curve [(step, training seconds so far, validation MLM loss)]."""
    variant = "narrow" if model == "narrow_time" else model
    save_dir = work / "pretrain" / model
    shutil.rmtree(save_dir, ignore_errors=True)
    overrides = [f"model.{k}={v}" for k, v in MODEL.items()] + [
        f"model.variant={variant}", f"data.data_paths=[{data}]", "data.seq_len=128", "data.max_predictions=20",
        "data.packing=concat", "data.split=98,2,0", f"train.micro_batch_size={PRETRAIN_BATCH}",
        f"train.train_steps={steps}", "train.lr=1e-3", f"train.warmup_steps={max(1, steps // 20)}",
        "train.lr_decay=linear", "train.log_interval=1", f"train.eval_interval={max(1, steps // 10)}",
        "train.eval_steps=16", f"train.save_interval={steps}", f"train.save_dir={save_dir}",
        "train.tokenizer_type=sentencepiece", f"train.tokenizer_model={tokenizer}", "train.num_workers=0",
        "train.keep_last=1"]
    started = time.perf_counter()
    run(["megatron_narrow/pretrain.py", "--config", "examples/configs/tiny_cpu.yaml", "--deepspeed_config",
         "ds_configs/zero0.json", *overrides], work / "logs" / f"pretrain_{model}.log")
    records = read_metrics(save_dir)
    elapsed, curve = 0.0, []
    for record in records:
        if "step_time_s" in record:
            elapsed += record["step_time_s"]
        if "eval_loss" in record:
            curve.append([record["step"], round(elapsed, 2), record["eval_loss"]])
    seconds = sum(r["step_time_s"] for r in records if "step_time_s" in r)
    log(f"pretrained {model}: {steps} steps, {seconds:.0f} s of training ({time.perf_counter() - started:.0f} s "
        f"wall), validation MLM loss {curve[-1][2]:.3f}")
    return {"variant": variant, "steps": steps, "train_seconds": seconds, "curve": curve,
            "save_dir": str(save_dir)}


def finetune(model: str, pretrained: dict, task: str, files: dict, seed: int, steps: int, work: Path) -> float:
    kind, metric = TASKS[task]
    save_dir = work / "finetune" / f"{model}_{task}_{seed}"
    shutil.rmtree(save_dir, ignore_errors=True)
    overrides = [f"task.kind={kind}", f"task.train_file={files['train']}", f"task.valid_file={files['valid']}",
                 "task.max_seq_len=64", f"model.init_from={pretrained['save_dir']}", f"model.init_seed={seed}",
                 f"train.seed={seed}", "train.micro_batch_size=32", f"train.train_steps={steps}", "train.lr=2e-4",
                 f"train.warmup_steps={max(1, steps // 10)}", "train.lr_decay=linear",
                 f"train.log_interval={max(1, steps // 5)}", "train.eval_interval=0", f"train.save_dir={save_dir}"]
    run(["megatron_narrow/finetune.py", "--deepspeed_config", "ds_configs/zero0.json", *overrides],
        work / "logs" / f"finetune_{model}_{task}_{seed}.log")
    score = 100.0 * json.loads((save_dir / "eval_results.json").read_text())[metric]
    shutil.rmtree(save_dir / "hf", ignore_errors=True)  # the exports are not needed: keep the disk small
    return score


# ---------------------------------------------------------------------------------------------- report


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def judge(results: dict) -> list[dict]:
    """The issue's targets, each with its numbers and whether it holds."""
    pre, down = results["pretraining"], results["downstream"]
    checks = []
    for model in ("narrow", "token_drop"):
        for task, (_, metric) in TASKS.items():
            gap = mean_std(down[model][task])[0] - mean_std(down["bert"][task])[0]
            checks.append({"target": f"equal steps: {model} {task} {metric} within 2 points of bert",
                           "value": round(gap, 2), "met": gap >= -2.0})
    loss_gap = pre["narrow_time"]["curve"][-1][2] - pre["bert"]["curve"][-1][2]
    checks.append({"target": "equal wall-clock: narrow_time validation MLM loss <= bert's",
                   "value": round(loss_gap, 4), "met": loss_gap <= 0})
    for task, (_, metric) in TASKS.items():
        gap = mean_std(down["narrow_time"][task])[0] - mean_std(down["bert"][task])[0]
        checks.append({"target": f"equal wall-clock: narrow_time {task} {metric} >= bert's",
                       "value": round(gap, 2), "met": gap >= 0})
    return checks


def markdown(results: dict) -> str:
    pre, down = results["pretraining"], results["downstream"]
    seeds = len(results["seeds"])
    columns = [f"{task} {metric} (mean +- std, {seeds} seeds)" for task, (_, metric) in TASKS.items()]
    lines = ["| model | pretraining steps | training s | validation MLM loss | " + " | ".join(columns) + " |",
             "|---|---|---|---|" + "---|" * len(TASKS)]
    for model in MODELS:
        cells = [f"{mean_std(down[model][t])[0]:.1f} +- {mean_std(down[model][t])[1]:.1f}" for t in TASKS]
        lines.append(f"| {model} | {pre[model]['steps']} | {pre[model]['train_seconds']:.0f} | "
                     f"{pre[model]['curve'][-1][2]:.3f} | " + " | ".join(cells) + " |")
    lines += ["", "| target | value | met |", "|---|---|---|"]
    lines += [f"| {c['target']} | {c['value']:+} | {'yes' if c['met'] else 'NO'} |" for c in results["targets"]]
    return "\n".join(lines) + "\n"


def plots(results: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pre, down = results["pretraining"], results["downstream"]
    written = []
    for axis, column, label in (("steps", 0, "pretraining step"), ("seconds", 1, "training seconds (2 CPU cores)")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for model in MODELS:
            curve = pre[model]["curve"]
            ax.plot([p[column] for p in curve], [p[2] for p in curve], marker="o", markersize=3, label=model)
        ax.set_xlabel(label)
        ax.set_ylabel("validation MLM loss")
        ax.set_title(f"MLM validation loss against {axis}")
        ax.grid(alpha=0.3)
        ax.legend()
        path = out.parent / f"quality_loss_{axis}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    fig, axes = plt.subplots(1, len(TASKS), figsize=(4 * len(TASKS), 4))
    for ax, (task, (_, metric)) in zip(axes, TASKS.items(), strict=True):
        stats = [mean_std(down[m][task]) for m in MODELS]
        ax.bar(MODELS, [s[0] for s in stats], yerr=[s[1] for s in stats], capsize=4)
        ax.set_title(f"{task} ({metric}, {len(results['seeds'])} seeds)")
        ax.set_ylim(min(s[0] for s in stats) - 10, 100)
        ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    path = out.parent / "quality_downstream.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", required=True, type=Path, help="write every figure here (and .md, .png beside)")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply every run's steps and the downstream data (default 1: ~50 min on 2 cores)")
    parser.add_argument("--seeds", type=int, default=3, help="fine-tuning seeds per task and model (default 3)")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "quality",
                        help="corpus, shards, checkpoints and logs (default runs/quality)")
    args = parser.parse_args(argv)
    if args.scale <= 0:
        parser.error("--scale must be positive")
    if args.seeds < 1:
        parser.error("--seeds must be >= 1")
    seeds = tuple(range(1, args.seeds + 1))
    work = args.work_dir.resolve()
    (work / "logs").mkdir(parents=True, exist_ok=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    steps = max(20, round(PRETRAIN_STEPS * args.scale))
    ft_steps = max(10, round(FINETUNE_STEPS * args.scale))
    sizes = (max(200, round(FINETUNE_EXAMPLES[0] * args.scale)), max(100, round(FINETUNE_EXAMPLES[1] * args.scale)))

    tokenizer, data, sentences = prepare_data(work)
    files = write_tasks(sentences, work, sizes)
    pretraining = {model: pretrain(model, steps, work, tokenizer, data) for model in VARIANTS}
    per_step = pretraining["narrow"]["train_seconds"] / steps
    time_steps = max(steps, round(pretraining["bert"]["train_seconds"] / per_step))
    pretraining["narrow_time"] = pretrain("narrow_time", time_steps, work, tokenizer, data)
    downstream: dict[str, dict[str, list[float]]] = {}
    for model in MODELS:
        downstream[model] = {}
        for task in TASKS:
            downstream[model][task] = [finetune(model, pretraining[model], task, files[task], seed, ft_steps, work)
                                       for seed in seeds]
            log(f"fine-tuned {model} on {task}: " + ", ".join(f"{s:.1f}" for s in downstream[model][task]))

    results = {"command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
               "date": time.strftime("%Y-%m-%d"), "scale": args.scale, "cores": os.cpu_count(),
               "model": MODEL, "pretrain_batch": PRETRAIN_BATCH, "seq_len": 128, "finetune_steps": ft_steps,
               "task_examples": sizes, "seeds": seeds, "pretraining": pretraining, "downstream": downstream}
    results["targets"] = judge(results)
    results["total_minutes"] = round((time.perf_counter() - started) / 60, 1)
    args.json.write_text(json.dumps(results, indent=1) + "\n")
    table = markdown(results)
    args.json.with_suffix(".md").write_text(table)
    written = plots(results, args.json)
    print(table)
    log(f"done in {results['total_minutes']} min: {args.json}, {args.json.with_suffix('.md')}, "
        + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
