#!/usr/bin/env python
"""Our NarrowBERT against the official implementation (lihaoxin2020/narrowbert), same batch, one process.

The official code is Hugging Face 4.28 code; it runs in its own virtual environment (transformers==4.28.1,
numpy<2, safetensors<0.5, tokenizers 0.13; torch and our package come from this environment's site-packages),
which this script builds on first use (--venv, default ~/.cache/megatron_narrow/official-venv) and reuses
after. The clone is yours (`git clone https://github.com/lihaoxin2020/narrowbert DIR`); nothing of it is
copied into this repository: the worker only puts DIR on sys.path.

Both models: 12 layers of which 2 full-length, hidden 256, 4 heads, intermediate 1024, vocabulary 30522,
dropout 0.1; batch 4 x 512 random ids with 77 MLM targets a row (the official model takes labels -100
elsewhere; ours takes target positions, 80 slots of which 77 valid). Each round visits the measures in
turn, A and B interleaved (their order alternating); a turn keeps the faster of --repeats back-to-back calls;
times are medians over rounds; ratios are official / ours (higher = ours faster). Beside each fp32 ratio, the
ratio of the two sides' matmul and attention FLOPs (torch's FlopCounterMode): what the arithmetic alone allows.

  train_vs_official_fp32      forward, backward, AdamW step, zero_grad; fp32 parameters on both sides
  train_vs_official_bf16      the official model as Hugging Face's Trainer runs it with --bf16 (fp32
                              parameters under torch.autocast(bfloat16), fp32 AdamW) against ours as
                              DeepSpeed's bf16 mode runs it (bf16 parameters, fp32 master weights in AdamW)
  fb_vs_official_bf16_params  forward + backward alone, bf16 parameters on both sides
  fb_vs_official_fp32         forward + backward alone, fp32 (reported)
  cls_vs_official             [CLS] classification forward under inference_mode, fp32

With --fidelity EXPORT --fidelity-data RUN it measures no speed: a narrow export (EXPORT, made from the training
run RUN by tools/convert_checkpoint_to_hf.py) runs in the official code against RUN in ours, on RUN's held-out
text: MLM loss and logits (benchmarks/official_fidelity.py).

The bf16 measures need a CPU with AMX or AVX512-BF16 (or a GPU): elsewhere torch emulates bf16 matrix products
(1 GFLOP/s against 160 in fp32 on an AVX2 EPYC), which would time the emulation, not the models. There they
are skipped with the reason unless --force-bf16.

  python benchmarks/vs_official.py --official-dir DIR --json OUT.json [--rounds 5] [--repeats 2] [--venv DIR]
  python benchmarks/vs_official.py --official-dir DIR --json OUT.json --fidelity EXPORT --fidelity-data RUN
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_VENV = Path.home() / ".cache" / "megatron_narrow" / "official-venv"
OFFICIAL_PINS = ("transformers==4.28.1", "numpy<2", "safetensors<0.5", "tokenizers==0.13.3")
OFFICIAL_MODELING = Path("narrowbert") / "modeling_narrowbert.py"
TARGETS = {"fb_vs_official_bf16_params": 1.25, "train_vs_official_bf16": 1.25, "train_vs_official_fp32": 1.2,
           "cls_vs_official": 2.0}
PAIRS = {  # measure -> (official's timed call, ours)
    "train_vs_official_fp32": ("official_train_fp32", "ours_train_fp32"),
    "train_vs_official_bf16": ("official_train_autocast", "ours_train_bf16"),
    "fb_vs_official_bf16_params": ("official_fb_bf16", "ours_fb_bf16"),
    "fb_vs_official_fp32": ("official_fb_fp32", "ours_fb_fp32"),
    "cls_vs_official": ("official_cls", "ours_cls"),
}
BF16_MEASURES = ("train_vs_official_bf16", "fb_vs_official_bf16_params")


# ---------------------------------------------------------------------------------------------- the parent


def official_commit(official_dir: Path) -> str:
    result = subprocess.run(["git", "-C", str(official_dir), "rev-parse", "HEAD"], capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else "unknown (not a git clone)"


def venv_ready(python: Path) -> bool:
    check = "import transformers, sys; sys.exit(transformers.__version__ != '4.28.1')"
    return python.exists() and subprocess.run([str(python), "-c", check], capture_output=True).returncode == 0


def ensure_venv(venv: Path) -> Path:
    """The venv's python, the venv built first if it is missing or lacks transformers 4.28.1."""
    python = venv / "bin" / "python"
    if venv_ready(python):
        return python
    print(f"building the official code's environment in {venv} ({', '.join(OFFICIAL_PINS)}) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *OFFICIAL_PINS], check=True)
    if not venv_ready(python):
        raise SystemExit(f"error: {venv}: transformers 4.28.1 does not import there after installing; "
                         "remove the folder and rerun")
    return python


def parent(args: argparse.Namespace, argv: list[str]) -> int:
    official_dir = Path(args.official_dir).resolve()
    if not (official_dir / OFFICIAL_MODELING).is_file():
        print(f"error: --official-dir {official_dir}: no {OFFICIAL_MODELING} there; clone it with "
              "`git clone https://github.com/lihaoxin2020/narrowbert DIR`", file=sys.stderr)
        return 2
    python = ensure_venv(Path(args.venv))
    if args.fidelity:
        return fidelity(args, python, official_dir)
    with tempfile.TemporaryDirectory() as tmp:
        raw_path = Path(tmp) / "raw.json"
        worker = [str(python), str(Path(__file__).resolve()), *argv, "--worker-output", str(raw_path)]
        code = subprocess.run(worker, env={**os.environ, "PYTHONPATH": ""}).returncode
        if code != 0:
            return code
        raw = json.loads(raw_path.read_text())
    results = summarise(raw, official_commit(official_dir))
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)
    return 0


def fidelity(args: argparse.Namespace, python: Path, official_dir: Path) -> int:
    """--fidelity: our half here, the official half in its venv, then the comparison."""
    from official_fidelity import compare, prepare

    if not args.fidelity_data:
        print("error: --fidelity needs --fidelity-data RUN, the training run the export was made from",
              file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        ours, official = Path(tmp) / "ours.pt", Path(tmp) / "official.pt"
        prepare(args.fidelity_data, args.fidelity_samples, ours)
        worker = [str(python), str(Path(__file__).resolve()), "--official-dir", str(official_dir), "--json", args.json,
                  "--fidelity", args.fidelity, "--fidelity-worker", str(ours), str(official)]
        code = subprocess.run(worker, env={**os.environ, "PYTHONPATH": ""}).returncode
        if code != 0:
            return code
        results = {**compare(ours, official), "export": str(args.fidelity), "run": str(args.fidelity_data),
                   "official_commit": official_commit(official_dir)}
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print(f"{results['targets']} held-out targets: MLM loss official {results['official_loss']:.6f}, ours "
          f"{results['ours_loss']:.6f} (difference {results['loss_diff']:.1e}); largest logit difference "
          f"{results['max_logit_diff']:.2e}; official commit {results['official_commit']}")
    return 0


def summarise(raw: dict, commit: str) -> dict:
    times = {name: sorted(ts)[len(ts) // 2] for name, ts in raw["samples"].items()}
    results: dict = {"official_commit": commit}
    for measure, (official, ours) in PAIRS.items():
        if official in times and ours in times:
            results[measure] = times[official] / times[ours]
            results[f"{measure}_s"] = {"official": times[official], "ours": times[ours]}
            if official in raw["flops"] and ours in raw["flops"]:  # the ratio the arithmetic alone allows
                results[f"{measure}_flops_ratio"] = raw["flops"][official] / raw["flops"][ours]
    results["skipped"] = raw["skipped"]
    results["targets"] = {k: f">= {v}" for k, v in TARGETS.items()}
    results["met"] = {k: results[k] >= v for k, v in TARGETS.items() if k in results}
    results["config"] = raw["config"]
    results["samples"] = raw["samples"]
    return results


def print_table(results: dict) -> None:
    print()
    print(f"{'measure':<28}{'official s':>12}{'ours s':>10}{'ratio':>8}{'FLOP ideal':>12}{'target':>9}  met")
    for measure in PAIRS:
        if measure not in results:
            print(f"{measure:<28}{'skipped: ' + results['skipped'].get(measure, ''):>30}")
            continue
        s = results[f"{measure}_s"]
        target = TARGETS.get(measure)
        met = "-" if target is None else ("yes" if results["met"][measure] else "NO")
        ideal = results.get(f"{measure}_flops_ratio")
        print(f"{measure:<28}{s['official']:>12.3f}{s['ours']:>10.3f}{results[measure]:>8.3f}"
              f"{f'{ideal:.3f}' if ideal else '-':>12}{'>= ' + str(target) if target else '-':>9}  {met}")
    print(f"official commit {results['official_commit']}")


# ---------------------------------------------------------------------------------------------- the worker


def worker(args: argparse.Namespace) -> int:
    """Runs inside the official venv: builds both models, times them interleaved, writes raw samples."""
    sys.path[:0] = [str(Path(args.official_dir).resolve()), str(REPO), str(REPO / "benchmarks")]
    import torch
    from narrowbert import NarrowBertConfig, NarrowBertForMaskedLM, NarrowBertForSequenceClassification
    from throughput import MasterWeightAdamW, adamw, core_count, count_flops, make_batch, model_config, timed

    from megatron_narrow.model import BertForPreTraining, BertForSequenceClassification
    from megatron_narrow.training.precision import fast_bf16

    threads = args.threads or core_count()
    torch.set_num_threads(threads)
    batch = make_batch(args.batch, args.seq, args.vocab, args.max_predictions, args.valid_targets, args.seed)
    fast, why = fast_bf16(torch.device("cpu"))
    with_bf16 = fast or args.force_bf16
    skipped = {} if with_bf16 else {m: why for m in BF16_MEASURES}

    official_config = NarrowBertConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers, full_length_layers=2,
        num_attention_heads=args.heads, intermediate_size=4 * args.hidden, max_position_embeddings=args.seq,
        hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, num_labels=2)

    def official_mlm(dtype=torch.float32):
        torch.manual_seed(args.seed)
        return NarrowBertForMaskedLM(official_config).train().to(dtype)

    def ours_mlm(dtype=torch.float32):
        return BertForPreTraining(model_config(args, "narrow")).train().to(dtype)

    def official_loss(model) -> torch.Tensor:
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     token_type_ids=batch["token_type_ids"], labels=batch["labels"]).loss

    def ours_loss(model) -> torch.Tensor:
        return model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                     batch["target_positions"], batch["target_ids"], batch["target_valid"]).loss

    def forward_backward(model, loss_of, autocast: bool = False) -> Callable[[], float]:
        def call() -> float:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = loss_of(model)
            loss.backward()
            model.zero_grad(set_to_none=True)
            return loss.item()
        return call

    def train_step(model, loss_of, optimizer, autocast: bool = False) -> Callable[[], float]:
        def call() -> float:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = loss_of(model)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.item()
        return call

    def classify(model) -> Callable[[], float]:
        def call() -> float:
            with torch.inference_mode():
                out = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
            return float((out.logits if hasattr(out, "logits") else out).sum())
        return call

    calls: dict[str, Callable[[], float]] = {}
    official_fp32, ours_fp32 = official_mlm(), ours_mlm()
    calls["official_train_fp32"] = train_step(official_fp32, official_loss, adamw(official_fp32))
    calls["ours_train_fp32"] = train_step(ours_fp32, ours_loss, adamw(ours_fp32))
    calls["official_fb_fp32"] = forward_backward(official_fp32, official_loss)
    calls["ours_fb_fp32"] = forward_backward(ours_fp32, ours_loss)
    if with_bf16:
        official_autocast, ours_bf16 = official_mlm(), ours_mlm(torch.bfloat16)
        calls["official_train_autocast"] = train_step(official_autocast, official_loss, adamw(official_autocast),
                                                      autocast=True)
        calls["ours_train_bf16"] = train_step(ours_bf16, ours_loss, MasterWeightAdamW(ours_bf16))
        official_bf16, ours_bf16_fb = official_mlm(torch.bfloat16), ours_mlm(torch.bfloat16)
        calls["official_fb_bf16"] = forward_backward(official_bf16, official_loss)
        calls["ours_fb_bf16"] = forward_backward(ours_bf16_fb, ours_loss)
    torch.manual_seed(args.seed)
    calls["official_cls"] = classify(NarrowBertForSequenceClassification(official_config).eval())
    calls["ours_cls"] = classify(BertForSequenceClassification(model_config(args, "narrow"), num_labels=2).eval())

    print(f"torch {torch.__version__}, threads {threads}, batch {args.batch} x {args.seq}, {args.layers} layers "
          f"(2 full), hidden {args.hidden}, {args.heads} heads; bf16: {why}"
          + ("" if fast else (" (forced)" if args.force_bf16 else " -> bf16 measures skipped")), flush=True)
    start = time.perf_counter()
    for call in calls.values():  # warm-up: allocator, first-call kernel setup, optimizer states
        call()
    print(f"warm-up {time.perf_counter() - start:.1f} s", flush=True)
    pairs = [pair for pair in PAIRS.values() if pair[0] in calls]
    flops = {name: count_flops(calls[name]) for pair in pairs for name in pair if "fp32" in name or "cls" in name}
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for r in range(args.rounds):
        for official, ours in pairs:
            for name in ((official, ours) if r % 2 == 0 else (ours, official)):
                samples[name].append(min(timed(calls[name]) for _ in range(args.repeats)))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(
            f"{o.removeprefix('official_')} {samples[o][-1]:.3f}/{samples[u][-1]:.3f}" for o, u in pairs), flush=True)
    config = {"batch": args.batch, "seq": args.seq, "layers": args.layers, "full_length_layers": 2,
              "hidden": args.hidden, "heads": args.heads, "vocab": args.vocab, "valid_targets": args.valid_targets,
              "rounds": args.rounds, "repeats": args.repeats, "threads": threads, "torch": torch.__version__,
              "bf16_hardware": why}
    Path(args.worker_output).write_text(json.dumps({"samples": samples, "skipped": skipped, "config": config,
                                                       "flops": flops}))
    return 0


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(REPO / "benchmarks"))
    from throughput import add_shape_arguments

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official-dir", required=True, help="a clone of lihaoxin2020/narrowbert")
    parser.add_argument("--json", required=True, help="write the results here")
    parser.add_argument("--venv", default=str(DEFAULT_VENV), help=f"the official code's venv (default {DEFAULT_VENV})")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--repeats", type=int, default=2, help="back-to-back calls a turn; the turn keeps the fastest")
    add_shape_arguments(parser)  # --batch --layers --hidden --heads --seq --vocab --seed --threads
    parser.add_argument("--max-predictions", type=int, default=80)
    parser.add_argument("--valid-targets", type=int, default=77)
    parser.add_argument("--force-bf16", action="store_true",
                        help="time the bf16 measures even where bf16 matrix products are emulated")
    parser.add_argument("--fidelity", default=None, metavar="EXPORT",
                        help="compare a narrow Hugging Face export in the official code with ours (no timing)")
    parser.add_argument("--fidelity-data", default=None, metavar="RUN",
                        help="with --fidelity: the training run (save_dir or step directory) the export was made from")
    parser.add_argument("--fidelity-samples", type=int, default=256, help="held-out samples (default 256)")
    parser.add_argument("--worker-output", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--fidelity-worker", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.fidelity_worker:
        sys.path[:0] = [str(Path(args.official_dir).resolve()), str(REPO)]
        from official_fidelity import official_outputs

        official_outputs(args.fidelity, Path(args.fidelity_worker[0]), Path(args.fidelity_worker[1]))
        return 0
    return worker(args) if args.worker_output else parent(args, argv)


if __name__ == "__main__":
    sys.exit(main())
