#!/usr/bin/env python
"""Does it hold up? bert, narrow and token_drop pretrained on real English text with equal budgets, past the
unigram plateau, then fine-tuned on downstream tasks, with this project's own tools.

Corpus: the docstrings of the Python standard library and of the installed packages (offline, real
English prose: ~40 MB here once exact duplicates are dropped). Documents are split once: 90% pretrain
(sentencepiece tokenizer, Arrow shards, packed rows of 128 tokens), 10% held out for the downstream
tasks, so no downstream sentence was seen as such in pretraining.

Pretraining: for each pretraining seed, one single-process run per variant (gloo, CPU, `train.precision:
auto`: bf16 where the CPU has it), the same model shape, data, batch, learning-rate schedule and number of
steps (`equal steps`); dropout 0 (a short budget; ModernBERT pretrains without dropout too). Then
`narrow_time`: NarrowBERT for as many steps as fit in bert's training time (`equal wall-clock`, from the
measured step times; evaluation time is not counted). Each checkpoint is scored by tools/evaluate_mlm.py:
held-out masked top-1 (`mlm_top1`) against the unigram baseline (`unigram_top1`, always the most frequent
token); the study wants bert at 3x the baseline at least, so that the variants are compared off the plateau.

Downstream (every pretrained checkpoint x --seeds fine-tuning seeds; accuracy and span F1 in points):
- `library` (sentence, 6 classes): which library a held-out documentation sentence comes from (the six with
  the most held-out sentences, balanced). The library's own name is never in the sentence.
- `sentence_ends` (token, BIO tags): two or three held-out sentences (in the shuffled pool's order, so mostly
  from different docstrings) run together with the full stops between them removed; tag the words a removed
  stop followed (sentence segmentation). At 64 tokens 3% of the boundaries are truncated away (predicted O).
(Dropped, measured: `replaced_words`, ELECTRA's replaced-token detection, span F1 0 for every model and seed of
the 2026-11-30 study; `punctuation`, comma restoration, span F1 28.8 / 43.8 / 45.4 after 200 / 600 / 1200
fine-tuning steps from a bert at 3.5x the unigram baseline: below the 50 the rule needs.)
A task counts only when bert learns it: a sentence task when bert beats its majority baseline by 15 points, a
token task when bert reaches span F1 50. Otherwise the study prints "not informative" for it and gives no
verdict on it. token_drop fine-tunes as plain BERT (token dropping is a pretraining method); narrow as
NarrowBERT.

Every finished run leaves its result in --work-dir; a rerun (after a kill, or with more seeds) does only what
is missing (--fresh starts over). Writes OUT (every figure as JSON), OUT's stem + `.md` (the tables, mean +-
std and min-max over all runs) and `quality_loss_steps.png`, `quality_loss_seconds.png`,
`quality_downstream.png` beside it. With --official-dir, a narrow checkpoint's Hugging Face export is also run
through the official NarrowBERT code (benchmarks/vs_official.py --fidelity) and the figure is quoted.
--scale multiplies the steps of every run and the downstream data. At --scale 1 (bert at 3.8x the unigram
baseline) the study took 111 minutes on two cores, and its item-5 ablation (the checkpoints fine-tuned as the other
variant) ~17 more (2026-12-07, benchmarks/RESULTS.md). Runs go --jobs at a time (default: one per core).

  python benchmarks/quality.py --json runs/quality/quality.json [--scale 1.0] [--seeds 3] [--pretrain-seeds 2]
      [--work-dir runs/quality] [--official-dir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# the study's task builders live in example_tasks; library_examples, sentence_ends and top_libraries are
# imported as quality.X for tests/test_quality_study.py
from megatron_narrow.tasks.example_tasks import (  # noqa: E402
    EXAMPLE_TASKS,
    library_docstrings,
    library_examples,  # noqa: F401
    prose_sentences,
    sentence_ends,  # noqa: F401
    split_held_out,
    top_libraries,  # noqa: F401
    write_example_tasks,
)
from megatron_narrow.tasks.jobs import JobPool  # noqa: E402

VARIANTS = ("bert", "narrow", "token_drop")
MODELS = (*VARIANTS, "narrow_time")  # narrow_time: NarrowBERT for bert's wall-clock
TASKS = {task: (EXAMPLE_TASKS[task].kind, EXAMPLE_TASKS[task].metric, level)
         for task, level in (("library", "sentence"), ("sentence_ends", "token"))}
"""task -> (fine-tuning kind, metric: from example_tasks.EXAMPLE_TASKS, level: what makes it informative)"""
ABLATIONS = {"narrow_as_bert": ("narrow", "bert"), "bert_as_narrow": ("bert", "narrow")}
"""Item 5, where narrow loses to bert: name -> (checkpoint, model.variant it is fine-tuned as), every task.
narrow_as_bert runs a narrow checkpoint with every layer full-length (its top layers' queries, [CLS] or the tagged
words, mix with every position again); bert_as_narrow runs a bert checkpoint with those queries the only rows
of its top layers. Which of the two moves the score says whether the weights or the structure carry a gap."""
SENTENCE_MARGIN = 15.0
"""A sentence task is informative when bert beats its majority baseline by this many points."""
TOKEN_F1 = 50.0
"""A token task is informative when bert's span F1 reaches this."""
MLM_FACTOR = 3.0
"""bert's held-out masked top-1 must be this many times the unigram baseline's."""
VOCAB_SIZE = 8000
# model shape and pretraining recipe shared by every variant (NarrowBERT's paper: 2 full-length layers of 12;
# here 2 of 6; token dropping keeps half the tokens in its middle layers, as the paper)
MODEL = {"hidden_size": 128, "num_layers": 6, "num_heads": 4, "full_length_layers": 2,
         "max_position_embeddings": 128, "token_drop_keep_ratio": 0.5, "vocab_size": VOCAB_SIZE,
         "hidden_dropout": 0.0, "attention_dropout": 0.0}
PRETRAIN_STEPS = 2500  # bert: 18.5% held-out top-1, 3.5x unigram (RESULTS.md)
PRETRAIN_BATCH = 32
PRETRAIN_LR = 1e-3
FINETUNE_STEPS = 200
FINETUNE_LR = {"sequence": 5e-4, "token": 5e-4}  # 5e-4 beat 2e-4 on library for bert and narrow (RESULTS)
FINETUNE_EXAMPLES = (3000, 600)  # train, valid per task
MLM_SAMPLES = 512


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def run(command: list[str], log_file: Path) -> None:
    """Run one stage alone, as its own process with every core (a Runner of one); its output goes to log_file.
    A failure raises with the log's tail, so a broken stage says why."""
    Runner(1)(command, log_file)


def _check(code: int | None, command: list[str], log_file: Path) -> None:
    if code != 0:
        tail = log_file.read_text().splitlines()[-15:]
        raise RuntimeError(f"{' '.join(command[:2])} failed (exit {code}); {log_file}:\n" + "\n".join(tail))


CPU = {"DS_ACCELERATOR": "cpu"}  # the study runs on the CPU even where a GPU is


class Runner:
    """Runs stages `jobs` at a time (megatron_narrow/tasks/jobs.py), each with cores // jobs threads: this model
    (hidden 128) keeps one core busy far better than two (RESULTS.md), so two one-thread runs finish sooner than
    two two-thread runs in turn. A free slot goes to the waiting stage of lowest priority number, then in order:
    a checkpoint's MLM score and the equal-wall-clock run (which waits on bert's and narrow's) first, then
    pretraining, then fine-tuning, so that the long runs start early and the short ones fill the gaps."""

    def __init__(self, jobs: int) -> None:
        self.pool = JobPool(jobs, cwd=ROOT, env=CPU)
        self.jobs, self.threads = self.pool.jobs, self.pool.threads

    def __call__(self, command: list[str], log_file: Path, priority: int = 1) -> None:
        log_file.unlink(missing_ok=True)  # the pool appends: a stage's log is its last attempt's
        _check(self.pool.run(command, log_file, priority), command, log_file)


# ---------------------------------------------------------------------------------------------- data


def split_corpus(work: Path) -> tuple[Path, list[tuple[str, str]]]:
    """(pretraining JSONL, held-out (library, sentence) pairs): every tenth distinct docstring of the standard
    library and the installed packages is held out (megatron_narrow/tasks/example_tasks.py)."""
    pretrain, held_out = split_held_out(library_docstrings(packages=True))
    path = work / "raw" / "pretrain.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in pretrain))
    sentences = prose_sentences(held_out)
    log(f"corpus: {len(pretrain)} documents to pretrain on, {len(sentences)} held-out sentences")
    return path, sentences


def write_tasks(sentences: list[tuple[str, str]], work: Path, sizes: tuple[int, int], seed: int = 0
                ) -> dict[str, dict]:
    """The downstream tasks' train/valid JSONL files in WORK/tasks (example_tasks.write_example_tasks: held-out
    sentences are split between train and valid first, so no valid sentence is seen in fine-tuning), with
    `exclusive=False` as before it: the few sentence texts held out under two libraries may fall to both sides
    (8 at --scale 1 here), kept so that a rerun writes the very files its finished fine-tuning runs, reused by
    path, were made with."""

    def written(task: str, split: str, records: list[dict], path: Path) -> None:
        labels = EXAMPLE_TASKS[task].labels(records) if TASKS[task][2] == "sentence" else None
        log(f"task {task} {split}: {len(records)} examples" + (f" ({', '.join(labels)})" if labels is not None else ""))

    return write_example_tasks(sentences, work / "tasks", sizes, seed, tuple(TASKS), exclusive=False,
                               on_written=written)


def majority_baseline(valid_file: str) -> float:
    """Accuracy in points of always answering the most frequent label of a sequence task's valid split."""
    labels = [json.loads(line)["label"] for line in Path(valid_file).read_text().splitlines() if line.strip()]
    return 100.0 * max(labels.count(label) for label in set(labels)) / len(labels)


def prepare_data(work: Path) -> tuple[Path, Path, list[tuple[str, str]]]:
    """(tokenizer model, Arrow data directory, held-out sentences), made once per work directory."""
    tokenizer, data, held_out = work / "tokenizer" / "spm", work / "data", work / "held_out.json"
    if held_out.exists():
        log(f"corpus, tokenizer and shards from an earlier run in {work}")
        return Path(f"{tokenizer}.model"), data, [tuple(pair) for pair in json.loads(held_out.read_text())]
    corpus, sentences = split_corpus(work)
    run(["tools/train_tokenizer.py", "--input", str(corpus), "--model-prefix", str(tokenizer),
         "--vocab-size", str(VOCAB_SIZE)], work / "logs" / "tokenizer.log")
    run(["tools/preprocess_data.py", "--input", str(corpus), "--output-dir", str(data), "--tokenizer-type",
         "sentencepiece", "--tokenizer-model", f"{tokenizer}.model", "--workers", "2", "--split-sentences",
         "--overwrite"], work / "logs" / "preprocess.log")
    held_out.write_text(json.dumps(sentences))  # written last: its presence says the data is complete
    log("tokenizer trained and corpus preprocessed")
    return Path(f"{tokenizer}.model"), data, sentences


# ------------------------------------------------------------------------------------------ training


def read_metrics(save_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (save_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def pretrain(model: str, seed: int, steps: int, work: Path, tokenizer: Path, data: Path, runner: Runner
             ) -> dict:
    """One pretraining run and its MLM score: {steps, recipe, train_seconds, curve [(step, training seconds so
    far, validation MLM loss)], mlm_top1, unigram_top1 (points), save_dir}. A finished run of the same recipe
    (model, data and schedule settings) is reused."""
    variant = "narrow" if model == "narrow_time" else model
    save_dir = work / "pretrain" / f"{model}_seed{seed}"
    result_file = save_dir / "study_result.json"
    recipe = [f"model.{k}={v}" for k, v in MODEL.items()] + [
        f"model.variant={variant}", f"model.init_seed={seed}", f"train.seed={seed}", "data.seq_len=128",
        "data.max_predictions=20", "data.packing=concat", "data.split=98,2,0",
        f"train.micro_batch_size={PRETRAIN_BATCH}", f"train.train_steps={steps}", f"train.lr={PRETRAIN_LR}",
        f"train.warmup_steps={max(1, steps // 20)}", "train.lr_decay=linear"]
    if result_file.exists():
        result = json.loads(result_file.read_text())
        if result.get("recipe") == recipe:
            log(f"pretrained {model} seed {seed}: from an earlier run ({steps} steps)")
            return result
    shutil.rmtree(save_dir, ignore_errors=True)
    overrides = [*recipe, f"data.data_paths=[{data}]", "train.log_interval=1",
                 f"train.eval_interval={max(1, steps // 10)}", "train.eval_steps=16", f"train.save_interval={steps}",
                 f"train.save_dir={save_dir}", "train.tokenizer_type=sentencepiece",
                 f"train.tokenizer_model={tokenizer}", "train.num_workers=0", "train.keep_last=1"]
    started = time.perf_counter()
    runner(["megatron_narrow/pretrain.py", "--config", "examples/configs/tiny_cpu.yaml", "--deepspeed_config",
            "ds_configs/zero0.json", *overrides], work / "logs" / f"pretrain_{model}_seed{seed}.log",
           priority=-1 if model == "narrow_time" else 0)
    records = read_metrics(save_dir)
    elapsed, curve = 0.0, []
    for record in records:
        if "step_time_s" in record:
            elapsed += record["step_time_s"]
        if "eval_loss" in record:
            curve.append([record["step"], round(elapsed, 2), record["eval_loss"]])
    seconds = sum(r["step_time_s"] for r in records if "step_time_s" in r)
    report = save_dir / "mlm_report.json"
    with contextlib.suppress(RuntimeError):  # exit 3: not past the unigram baseline, still a result
        runner(["tools/evaluate_mlm.py", str(save_dir), "--samples", str(MLM_SAMPLES), "--json", str(report)],
               work / "logs" / f"evaluate_mlm_{model}_seed{seed}.log", priority=-1)
    if not report.exists():
        raise RuntimeError(f"tools/evaluate_mlm.py wrote no report for {save_dir}; see its log in {work / 'logs'}")
    scores = json.loads(report.read_text())
    result = {"variant": variant, "seed": seed, "steps": steps, "recipe": recipe, "train_seconds": seconds,
              "curve": curve,
              "mlm_top1": round(100 * scores["trained_accuracy"], 2),
              "unigram_top1": round(100 * scores["unigram_accuracy"], 2), "save_dir": str(save_dir)}
    result_file.write_text(json.dumps(result))
    log(f"pretrained {model} seed {seed}: {steps} steps, {seconds:.0f} s of training "
        f"({time.perf_counter() - started:.0f} s wall), validation MLM loss {curve[-1][2]:.3f}, held-out top-1 "
        f"{result['mlm_top1']:.1f}% (unigram {result['unigram_top1']:.1f}%)")
    return result


def finetune(pretrained: dict, task: str, files: dict, seed: int, steps: int, work: Path, runner: Runner,
             variant: str | None = None) -> float:
    """One fine-tuning run's validation score in points (as `variant`, default the checkpoint's own); a finished
    run of the same settings on the same pretrained checkpoint is reused."""
    kind, metric, _ = TASKS[task]
    name = f"{Path(pretrained['save_dir']).name}_{task}_ft{seed}" + (f"_as_{variant}" if variant else "")
    save_dir = work / "finetune" / name
    overrides = [f"task.kind={kind}", f"task.train_file={files['train']}", f"task.valid_file={files['valid']}",
                 "task.max_seq_len=64", f"model.init_from={pretrained['save_dir']}", f"model.init_seed={seed}",
                 f"train.seed={seed}", "train.micro_batch_size=32", f"train.train_steps={steps}",
                 f"train.lr={FINETUNE_LR[kind]}", f"train.warmup_steps={max(1, steps // 10)}", "train.lr_decay=linear",
                 f"train.log_interval={max(1, steps // 5)}", "train.eval_interval=0", f"train.save_dir={save_dir}",
                 *([f"model.variant={variant}"] if variant else [])]
    done = {"overrides": overrides, "pretrained": pretrained["recipe"]}
    marker = save_dir / "study_run.json"
    if not (marker.exists() and json.loads(marker.read_text()) == done):
        shutil.rmtree(save_dir, ignore_errors=True)
        runner(["megatron_narrow/finetune.py", "--deepspeed_config", "ds_configs/zero0.json", *overrides],
               work / "logs" / f"finetune_{name}.log")
        shutil.rmtree(save_dir / "hf", ignore_errors=True)  # the exports are not needed: keep the disk small
        marker.write_text(json.dumps(done))
    return 100.0 * json.loads((save_dir / "eval_results.json").read_text())[metric]


# ---------------------------------------------------------------------------------------------- report


def summary(values: list[float]) -> dict:
    """Mean, sample standard deviation (0 for one value), min and max, rounded to 0.01."""
    return {"mean": round(statistics.mean(values), 2),
            "std": round(statistics.stdev(values), 2) if len(values) > 1 else 0.0,
            "min": round(min(values), 2), "max": round(max(values), 2), "runs": len(values)}


def task_informative(task: str, bert: dict, baseline: float | None) -> tuple[bool, str]:
    """(whether bert learned `task` well enough for a verdict on it, the rule with its numbers)."""
    level = TASKS[task][2]
    if level == "sentence":
        needed = baseline + SENTENCE_MARGIN
        return bert["mean"] >= needed, f"bert {bert['mean']:.1f} vs majority {baseline:.1f} + {SENTENCE_MARGIN:g}"
    return bert["mean"] >= TOKEN_F1, f"bert span F1 {bert['mean']:.1f} vs {TOKEN_F1:g} needed"


def judge(results: dict) -> list[dict]:
    """The issue's targets, each with its numbers and whether it holds; none on a task bert did not learn."""
    mlm, tasks = results["mlm_top1"], results["tasks"]
    unigram = results["unigram_top1"]
    checks = [{"target": f"bert held-out masked top-1 >= {MLM_FACTOR:g} x unigram ({unigram:.1f}%)",
               "value": round(mlm["bert"]["mean"] / unigram, 2) if unigram else None,
               "met": mlm["bert"]["mean"] >= MLM_FACTOR * unigram}]
    for task, info in tasks.items():
        metric = TASKS[task][1]
        if not info["informative"]:
            checks.append({"target": f"{task}: every verdict", "value": None, "met": None,
                           "verdict": f"not informative ({info['rule']})"})
            continue
        bert = info["models"]["bert"]["mean"]
        for model in ("narrow", "token_drop"):
            gap = round(info["models"][model]["mean"] - bert, 2)
            checks.append({"target": f"equal steps: {model} {task} {metric} within 2 points of bert",
                           "value": gap, "met": gap >= -2.0})
        gap = round(info["models"]["narrow_time"]["mean"] - bert, 2)
        checks.append({"target": f"equal wall-clock: narrow_time {task} {metric} >= bert's", "value": gap,
                       "met": gap >= 0})
    gap = round(mlm["narrow_time"]["mean"] - mlm["bert"]["mean"], 2)
    checks.append({"target": "equal wall-clock: narrow_time held-out masked top-1 >= bert's", "value": gap,
                   "met": gap >= 0})
    return checks


def verdict_text(check: dict) -> str:
    if check.get("verdict"):
        return check["verdict"]
    return "yes" if check["met"] else "NO"


def markdown(results: dict) -> str:
    pre, mlm, tasks = results["pretraining"], results["mlm_top1"], results["tasks"]
    runs = f"{results['pretrain_seeds']} pretraining x {len(results['seeds'])} fine-tuning seeds"
    lines = [f"held-out masked top-1 of the unigram baseline: {results['unigram_top1']:.1f}%; training seconds are "
             f"each run's own steps, {results['jobs']} runs at once with {results['threads_per_run']} thread(s) each",
             "",
             "| model | pretraining steps | training s (mean) | validation MLM loss (mean) | held-out masked top-1 % "
             "(mean +- std) | " + " | ".join(f"{t} {TASKS[t][1]} (mean +- std, min-max; {runs})" for t in tasks) + " |",
             "|---|---|---|---|---|" + "---|" * len(tasks)]
    for model in MODELS:
        cells = []
        for task in tasks:
            stats = tasks[task]["models"][model]
            cells.append(f"{stats['mean']:.1f} +- {stats['std']:.1f} ({stats['min']:.1f}-{stats['max']:.1f})")
        seconds = statistics.mean(r["train_seconds"] for r in pre[model])
        loss = statistics.mean(r["curve"][-1][2] for r in pre[model])
        lines.append(f"| {model} | {pre[model][0]['steps']} | {seconds:.0f} | {loss:.3f} | "
                     f"{mlm[model]['mean']:.1f} +- {mlm[model]['std']:.1f} | " + " | ".join(cells) + " |")
    lines += ["", "| task | informative | rule |", "|---|---|---|"]
    lines += [f"| {task} | {'yes' if info['informative'] else 'no'} | {info['rule']} |" for task, info in tasks.items()]
    ablated = [(task, name, stats) for task, info in tasks.items() for name, stats in info["ablations"].items()]
    if ablated:
        lines += ["", "Item 5 ablation (the same checkpoints fine-tuned as the other variant):", "",
                  "| task | run | checkpoint | fine-tuned as | score (mean +- std, min-max) | checkpoint as itself |",
                  "|---|---|---|---|---|---|"]
        for task, name, stats in ablated:
            checkpoint, variant = ABLATIONS[name]
            own = tasks[task]["models"][checkpoint]
            lines.append(f"| {task} | {name} | {checkpoint} | {variant} | {stats['mean']:.1f} +- {stats['std']:.1f} "
                         f"({stats['min']:.1f}-{stats['max']:.1f}) | {own['mean']:.1f} +- {own['std']:.1f} |")
    lines += ["", "| target | value | met |", "|---|---|---|"]
    lines += [f"| {c['target']} | {'-' if c['value'] is None else c['value']} | {verdict_text(c)} |"
              for c in results["targets"]]
    if results.get("fidelity"):
        fidelity = results["fidelity"]
        lines += ["", f"Fidelity (narrow seed 1's export through the official NarrowBERT code, "
                      f"{fidelity['targets']} held-out targets): MLM loss {fidelity['official_loss']:.6f} official vs "
                      f"{fidelity['ours_loss']:.6f} ours, largest logit difference {fidelity['max_logit_diff']:.2e}."]
    return "\n".join(lines) + "\n"


def plots(results: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pre, tasks = results["pretraining"], results["tasks"]
    written = []
    cores = f"one of {results['jobs']} runs at once, {results['threads_per_run']} thread(s) each"
    for axis, column, label in (("steps", 0, "pretraining step"), ("seconds", 1, f"training seconds ({cores})")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for index, model in enumerate(MODELS):
            for run_index, record in enumerate(pre[model]):
                curve = record["curve"]
                ax.plot([p[column] for p in curve], [p[2] for p in curve], marker="o", markersize=3,
                        color=f"C{index}", alpha=1.0 if run_index == 0 else 0.5,
                        label=model if run_index == 0 else None)
        ax.set_xlabel(label)
        ax.set_ylabel("validation MLM loss")
        ax.set_title(f"MLM validation loss against {axis} (every pretraining seed)")
        ax.grid(alpha=0.3)
        ax.legend()
        path = out.parent / f"quality_loss_{axis}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 4))
    for ax, (task, info) in zip(axes, tasks.items(), strict=True):
        stats = [info["models"][m] for m in MODELS]
        ax.bar(MODELS, [s["mean"] for s in stats], yerr=[s["std"] for s in stats], capsize=4)
        note = "" if info["informative"] else " - not informative"
        ax.set_title(f"{task} ({TASKS[task][1]}){note}", fontsize=10)
        ax.set_ylim(max(0, min(s["mean"] for s in stats) - 15), 100)
        ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    path = out.parent / "quality_downstream.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(path)
    return written


def fidelity(pretrained: dict, work: Path, official_dir: Path) -> dict:
    """Export a narrow checkpoint to Hugging Face format and run it through the official NarrowBERT code on
    held-out text (benchmarks/vs_official.py --fidelity)."""
    export, out = work / "fidelity" / "hf", work / "fidelity" / "fidelity.json"
    shutil.rmtree(export, ignore_errors=True)  # a rerun exports again: the checkpoint may be a new one
    run(["tools/convert_checkpoint_to_hf.py", "--checkpoint", pretrained["save_dir"], "--output", str(export)],
        work / "logs" / "fidelity_export.log")
    run(["benchmarks/vs_official.py", "--official-dir", str(official_dir), "--fidelity", str(export),
         "--fidelity-data", pretrained["save_dir"], "--json", str(out)], work / "logs" / "fidelity.log")
    return json.loads(out.read_text())


def collect(pretraining: dict, downstream: dict, files: dict) -> tuple[dict, dict, float]:
    """(mlm_top1 per model, per-task informative flag, rule and per-model summaries, unigram_top1)."""
    mlm = {model: summary([r["mlm_top1"] for r in runs]) for model, runs in pretraining.items()}
    unigram = statistics.mean(r["unigram_top1"] for runs in pretraining.values() for r in runs)
    tasks = {}
    for task in TASKS:
        models = {model: summary(downstream[model][task]) for model in MODELS}
        baseline = majority_baseline(files[task]["valid"]) if TASKS[task][2] == "sentence" else None
        informative, rule = task_informative(task, models["bert"], baseline)
        ablations = {name: summary(downstream[name][task]) for name in ABLATIONS if task in downstream.get(name, {})}
        tasks[task] = {"informative": informative, "rule": rule, "majority_baseline": baseline, "models": models,
                       "ablations": ablations}
    return mlm, tasks, round(unigram, 2)


def run_all(pretrain_seeds: int, seeds: tuple[int, ...], steps: tuple[int, int], work: Path,
            corpus: tuple[Path, Path], files: dict, runner: Runner) -> tuple[dict, dict]:
    """Every pretraining and fine-tuning run, as many at once as `runner` allows: ({model: [pretraining result
    per seed]}, {model: {task: [score per (pretraining seed, fine-tuning seed)]}}). narrow_time of a seed
    starts when that seed's bert and narrow have finished (its step count comes from their step times); a
    checkpoint's fine-tunings start when it is ready."""
    pretrain_steps, finetune_steps = steps
    with ThreadPoolExecutor(max_workers=64) as pool:
        started = {(model, seed): pool.submit(pretrain, model, seed, pretrain_steps, work, *corpus, runner)
                   for seed in range(1, pretrain_seeds + 1) for model in VARIANTS}

        def equal_wall_clock(seed: int) -> dict:
            bert, narrow = started["bert", seed].result(), started["narrow", seed].result()
            time_steps = max(pretrain_steps, round(bert["train_seconds"] * pretrain_steps / narrow["train_seconds"]))
            return pretrain("narrow_time", seed, time_steps, work, *corpus, runner)

        for seed in range(1, pretrain_seeds + 1):
            started["narrow_time", seed] = pool.submit(equal_wall_clock, seed)

        def tune(model: str, seed: int, task: str, finetune_seed: int, variant: str | None = None) -> float:
            return finetune(started[model, seed].result(), task, files[task], finetune_seed, finetune_steps, work,
                            runner, variant=variant)

        runs = {model: (model, None) for model in MODELS} | ABLATIONS  # name -> (checkpoint, fine-tuned as)
        scores = {(name, task): [pool.submit(tune, checkpoint, seed, task, finetune_seed, variant)
                                 for seed in range(1, pretrain_seeds + 1) for finetune_seed in seeds]
                  for name, (checkpoint, variant) in runs.items() for task in TASKS}
        try:
            downstream: dict[str, dict[str, list[float]]] = {}
            for (model, task), futures in scores.items():
                downstream.setdefault(model, {})[task] = [future.result() for future in futures]
                log(f"fine-tuned {model} on {task}: " + ", ".join(f"{s:.1f}" for s in downstream[model][task]))
        except BaseException:
            pool.shutdown(cancel_futures=True)  # the stages already running finish; nothing new starts
            raise
    pretraining = {model: [started[model, seed].result() for seed in range(1, pretrain_seeds + 1)] for model in MODELS}
    return pretraining, downstream


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", required=True, type=Path, help="write every figure here (and .md, .png beside)")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply every run's steps and the downstream data (default 1: ~2 h on 2 cores)")
    parser.add_argument("--seeds", type=int, default=3, help="fine-tuning seeds per task and checkpoint (default 3)")
    parser.add_argument("--pretrain-seeds", type=int, default=2, help="pretraining seeds per model (default 2)")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "quality",
                        help="corpus, shards, checkpoints, logs and finished runs' results (default runs/quality)")
    parser.add_argument("--jobs", type=int, default=max(1, os.cpu_count() or 1),
                        help="runs at once, each with cores // jobs threads (default: one per core)")
    parser.add_argument("--fresh", action="store_true", help="discard the work directory's earlier results")
    parser.add_argument("--official-dir", type=Path, default=None,
                        help="a clone of lihaoxin2020/narrowbert: also measure fidelity (vs_official.py --fidelity)")
    args = parser.parse_args(argv)
    if args.scale <= 0:
        parser.error("--scale must be positive")
    if args.seeds < 1 or args.pretrain_seeds < 1 or args.jobs < 1:
        parser.error("--seeds, --pretrain-seeds and --jobs must be >= 1")
    seeds = tuple(range(1, args.seeds + 1))
    work = args.work_dir.resolve()
    if args.fresh:
        shutil.rmtree(work, ignore_errors=True)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    steps = max(20, round(PRETRAIN_STEPS * args.scale))
    ft_steps = max(10, round(FINETUNE_STEPS * args.scale))
    sizes = (max(200, round(FINETUNE_EXAMPLES[0] * args.scale)), max(100, round(FINETUNE_EXAMPLES[1] * args.scale)))

    tokenizer, data, sentences = prepare_data(work)
    files = write_tasks(sentences, work, sizes)
    runner = Runner(args.jobs)
    pretraining, downstream = run_all(args.pretrain_seeds, seeds, (steps, ft_steps), work, (tokenizer, data),
                                      files, runner)

    mlm, tasks, unigram = collect(pretraining, downstream, files)
    results = {"command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
               "date": time.strftime("%Y-%m-%d"), "scale": args.scale, "cores": os.cpu_count(),
               "model": MODEL, "pretrain_batch": PRETRAIN_BATCH, "seq_len": 128, "finetune_steps": ft_steps,
               "finetune_lr": FINETUNE_LR, "task_examples": sizes, "seeds": seeds,
               "pretrain_seeds": args.pretrain_seeds, "jobs": runner.jobs, "threads_per_run": runner.threads,
               "pretraining": pretraining, "downstream": downstream,
               "mlm_top1": mlm, "unigram_top1": unigram, "tasks": tasks}
    if args.official_dir is not None:
        results["fidelity"] = fidelity(pretraining["narrow"][0], work, args.official_dir)
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
