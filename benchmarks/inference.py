#!/usr/bin/env python
"""Inference throughput of fine-tuned-model shapes, narrow against bert, in one process.

(a) Sequence classification (BertForSequenceClassification): narrow runs its narrow layers for [CLS] only,
    attending through the weights (no K/V projection of every position, see
    BertSelfAttention.attend_through_weights); bert runs every layer on every position.
(b) Token classification (BertForTokenClassification) with 15% of the positions labeled (77 of 512, at
    random): narrow computes its narrow layers for those rows; bert computes all rows and keeps those.

Batch B x 512 of random ids ([CLS] ... [SEP]), fp32, torch.inference_mode, 12 layers (2 full-length for
narrow), hidden 256, 4 heads, vocabulary 30522. Each round visits the four models in a rotating order and
keeps the fastest of `--repeats` calls; reported times are medians over rounds, throughput in sequences/s
and ratios of medians (higher = faster). FLOPs are counted with torch.utils.flop_counter (matmuls and
attention) for the ideal ratio each measured one can be read against.

Keys: narrow_cls_vs_bert (target >= 3.3), narrow_ner_vs_bert (reported).

  python benchmarks/inference.py --json OUT.json [--rounds 9] [--repeats 2] [--batch 4] [--layers 12 --hidden 256
      --heads 4 --seq 512 --vocab 30522 --labeled 77]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from throughput import add_shape_arguments, core_count, count_flops, make_batch, timed

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_narrow.config import ModelConfig  # noqa: E402
from megatron_narrow.model import BertForSequenceClassification, BertForTokenClassification  # noqa: E402

TARGETS = {"narrow_cls_vs_bert": (">=", 3.3)}
MODELS = ("cls_bert", "cls_narrow", "ner_bert", "ner_narrow")


def build(args: argparse.Namespace, name: str) -> torch.nn.Module:
    task, variant = name.split("_")
    config = ModelConfig(variant=variant, vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers,
                         num_heads=args.heads, full_length_layers=2, max_position_embeddings=args.seq)
    kind = BertForSequenceClassification if task == "cls" else BertForTokenClassification
    return kind(config, num_labels=3 if task == "cls" else 9).eval()


def make_call(name: str, model: torch.nn.Module, batch: dict, positions: torch.Tensor) -> Callable[[], float]:
    args = (batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])

    def call() -> float:
        with torch.inference_mode():
            out = model(*args) if name.startswith("cls") else model(*args, positions)
        return out.sum().item()

    return call


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", required=True, help="write the results here")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--repeats", type=int, default=2, help="calls per model in a round; the fastest is kept")
    add_shape_arguments(parser)
    parser.add_argument("--labeled", type=int, default=77, help="NER: labeled positions per sequence (15%% of 512)")
    args = parser.parse_args(argv)

    threads = args.threads or core_count()
    torch.set_num_threads(threads)
    batch = make_batch(args.batch, args.seq, args.vocab, args.labeled, args.labeled, args.seed)
    positions = batch["target_positions"]  # sorted distinct random positions, 15% of each sequence
    models = {name: build(args, name) for name in MODELS}
    calls = {name: make_call(name, models[name], batch, positions) for name in MODELS}
    print(f"threads {threads}, batch {args.batch} x seq {args.seq}, {args.layers} layers, hidden {args.hidden}, "
          f"{args.heads} heads, NER labels at {args.labeled} positions", flush=True)
    for name in MODELS:  # warm-up
        calls[name]()
    samples: dict[str, list[float]] = {name: [] for name in MODELS}
    for r in range(args.rounds):
        order = MODELS[r % len(MODELS):] + MODELS[:r % len(MODELS)]
        for name in order:
            samples[name].append(min(timed(calls[name]) for _ in range(args.repeats)))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {samples[n][-1]:.3f}" for n in MODELS), flush=True)

    seconds = {name: statistics.median(ts) for name, ts in samples.items()}
    flops = {name: count_flops(calls[name]) for name in MODELS}
    results: dict = {
        "narrow_cls_vs_bert": seconds["cls_bert"] / seconds["cls_narrow"],
        "narrow_ner_vs_bert": seconds["ner_bert"] / seconds["ner_narrow"],
        "narrow_cls_vs_bert_flops_ratio": flops["cls_bert"] / flops["cls_narrow"],
        "narrow_ner_vs_bert_flops_ratio": flops["ner_bert"] / flops["ner_narrow"],
        "sequences_per_s": {name: args.batch / s for name, s in seconds.items()},
        "forward_s": seconds,
        "gflop": {name: f / 1e9 for name, f in flops.items()},
        "best_of_rounds": {"narrow_cls_vs_bert": min(samples["cls_bert"]) / min(samples["cls_narrow"]),
                           "narrow_ner_vs_bert": min(samples["ner_bert"]) / min(samples["ner_narrow"])},
        "samples": samples,
        "config": {"batch": args.batch, "seq": args.seq, "layers": args.layers, "hidden": args.hidden,
                   "heads": args.heads, "vocab": args.vocab, "labeled": args.labeled, "rounds": args.rounds,
                   "threads": threads, "torch": torch.__version__},
    }
    results["targets"] = {key: f"{op} {value}" for key, (op, value) in TARGETS.items()}
    results["met"] = {key: results[key] >= value for key, (op, value) in TARGETS.items()}

    print()
    print("| task | bert seq/s | narrow seq/s | narrow / bert | FLOP ideal | target |")
    print("|---|---|---|---|---|---|")
    for task, key in (("cls", "narrow_cls_vs_bert"), ("ner", "narrow_ner_vs_bert")):
        target = results["targets"].get(key, "report")
        print(f"| {task} | {results['sequences_per_s'][f'{task}_bert']:.2f} | "
              f"{results['sequences_per_s'][f'{task}_narrow']:.2f} | {results[key]:.2f} | "
              f"{results[f'{key}_flops_ratio']:.2f} | {target} |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
