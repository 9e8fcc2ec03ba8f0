#!/usr/bin/env python
"""What `model.compile` buys: our models eager against torch.compile (inductor), in one process, A/B interleaved.

The measures of benchmarks/throughput.py's training step (forward, backward, AdamW; `--precision bf16`:
bf16 parameters with fp32 master weights, as DeepSpeed's bf16 mode) and of its classification forward, for
each `--variants` model built twice from the same seed: once eager, once compiled with torch.compile
(inductor, the backend DeepSpeed's engine.compile uses on the CPU and on CUDA). The compile time (the first
call's, minus an eager call) is reported apart. Each round visits eager and compiled in alternating order and
keeps the faster of `--repeats` calls; times are medians over rounds; ratios are eager / compiled (higher =
compiled faster).

  python benchmarks/compile.py --json OUT.json [--precision fp32|bf16] [--variants narrow bert] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from throughput import (
    add_shape_arguments,
    core_count,
    make_batch,
    make_infer,
    make_train_step,
    model_config,
    optimizer_for,
    timed,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_narrow.model import BertForPreTraining, BertForSequenceClassification  # noqa: E402


def build_calls(args: argparse.Namespace, variant: str, compiled: bool, batch: dict) -> dict[str, Callable]:
    """The training step and the classification forward of one variant, eager or compiled."""
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    pretraining = BertForPreTraining(model_config(args, variant)).train().to(dtype)
    classifier = BertForSequenceClassification(model_config(args, variant), num_labels=2).eval().to(dtype)
    if compiled:
        pretraining.compile()
        classifier.compile()
    optimizer = optimizer_for(pretraining, args.precision)
    return {"train": make_train_step(variant, pretraining, optimizer, batch), "infer": make_infer(classifier, batch)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", required=True, help="write the results here")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--variants", nargs="+", default=["narrow", "bert"], choices=("bert", "narrow", "token_drop"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    add_shape_arguments(parser)
    parser.add_argument("--max-predictions", type=int, default=80)
    parser.add_argument("--valid-targets", type=int, default=77)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads or core_count())
    batch = make_batch(args.batch, args.seq, args.vocab, args.max_predictions, args.valid_targets, args.seed)

    calls: dict[str, Callable] = {}
    results: dict[str, float] = {}
    for variant in args.variants:
        for compiled in (False, True):
            mode = "compiled" if compiled else "eager"
            for measure, call in build_calls(args, variant, compiled, batch).items():
                first = timed(call)  # eager: warm-up; compiled: the compile, plus one call
                if compiled:
                    results[f"{variant}_{measure}_compile_s"] = first - timed(calls[f"{variant}_{measure}_eager"])
                    print(f"{variant} {measure}: compiled in {results[f'{variant}_{measure}_compile_s']:.1f} s",
                          flush=True)
                calls[f"{variant}_{measure}_{mode}"] = call
    samples: dict[str, list[float]] = {name: [] for name in calls}
    pairs = [(f"{v}_{m}_eager", f"{v}_{m}_compiled") for v in args.variants for m in ("train", "infer")]
    for r in range(args.rounds):
        for pair in pairs:
            for name in (pair if r % 2 == 0 else pair[::-1]):
                samples[name].append(min(timed(calls[name]) for _ in range(args.repeats)))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(
            f"{e.removesuffix('_eager')} {samples[e][-1]:.3f}/{samples[c][-1]:.3f}" for e, c in pairs), flush=True)

    print(f"\n{args.precision}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'measure':<28}{'eager s':>10}{'compiled s':>12}{'ratio':>8}")
    for eager, compiled in pairs:
        key = eager.removesuffix("_eager")
        results[f"{key}_eager_s"] = statistics.median(samples[eager])
        results[f"{key}_compiled_s"] = statistics.median(samples[compiled])
        results[f"{key}_eager_vs_compiled"] = results[f"{key}_eager_s"] / results[f"{key}_compiled_s"]
        print(f"{key:<28}{results[f'{key}_eager_s']:>10.3f}{results[f'{key}_compiled_s']:>12.3f}"
              f"{results[f'{key}_eager_vs_compiled']:>8.2f}")
    Path(args.json).write_text(json.dumps({**results, "precision": args.precision, "torch": torch.__version__,
                                           "rounds": args.rounds, "samples": samples}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
