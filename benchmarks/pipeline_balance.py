#!/usr/bin/env python
"""Per-stage forward+backward time of a two-stage NarrowBERT pipeline, split by layer count ("uniform") and
by estimated FLOPs ("cost"), in one process.

A pipeline runs at the pace of its slowest stage, so what matters is max/min stage time (1.0 = no stage
waits). Each stage is timed as DeepSpeed's pipeline engine runs it, with the real pipeline items
(model/pipeline.py) on one process: the first stage embeds the batch and runs its layers, then
backpropagates a fixed gradient of its outputs; the last stage takes the first stage's outputs (as
leaves that require grad, as received), runs its layers, the tied decoder and the MLM head, and
backpropagates the loss into its parameters and its inputs. Gradients are cleared between calls.
Communication and the pipeline bubble are not in these times: they are the compute the partition
balances.

Each round visits every (mode, stage) in a rotating order and keeps the fastest of `--repeats` calls
(another process's burst only adds time); reported times are medians over rounds. The FLOP estimate the
cost mode balances is printed beside each measured time.

Key (target): narrow_stage_imbalance_costaware (<= 1.2).

The default shape is NarrowBERT-base's (12 layers, 2 full-length, hidden 768, seq 512, 80 target slots,
vocabulary 30522), where a narrow layer costs 0.28 of a full one and the MLM head 0.48, at micro-batch 1
so that a CPU finishes in a minute.

  python benchmarks/pipeline_balance.py --json OUT.json [--rounds 7] [--batch 1] [--layers 12 --hidden 768
      --heads 12 --seq 512 --vocab 30522 --full-length-layers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported (model.pipeline imports it)

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from throughput import add_shape_arguments, core_count, make_batch  # noqa: E402  (this directory, first on sys.path)

from megatron_narrow.config import ModelConfig  # noqa: E402
from megatron_narrow.model.costs import pipeline_layer_costs  # noqa: E402
from megatron_narrow.model.partition import imbalance as partition_imbalance  # noqa: E402
from megatron_narrow.model.pipeline import (  # noqa: E402
    EmbeddingPipe,
    EncoderLayerPipe,
    PretrainingHeadPipe,
    PretrainingPipeLoss,
    TiedDecoderPipe,
    hand_over_decoder,
    pipeline_inputs,
    pipeline_labels,
    stage_boundaries,
)
from megatron_narrow.parallel import ProcessGroups  # noqa: E402

TARGET = ("narrow_stage_imbalance_costaware", "<=", 1.2)
MODES = ("uniform", "cost")


def build_items(config: ModelConfig) -> tuple[list[Callable], list[torch.nn.Module]]:
    """The pipeline's items in order, as callables on the stage tuple (the tied decoder through its forward_fn)."""
    groups = ProcessGroups.single()
    decoder = TiedDecoderPipe(config, groups=groups)
    items: list[Callable] = [EmbeddingPipe(config, groups=groups)]
    items += [EncoderLayerPipe(config, i, groups=groups) for i in range(config.num_layers)]
    items += [lambda inputs: hand_over_decoder(decoder, inputs), PretrainingHeadPipe(config, groups=groups)]
    modules = [m for m in items if isinstance(m, torch.nn.Module)] + [decoder]
    for module in modules:
        module.train()
    return items, modules


def run_items(items: list[Callable], inputs):
    for item in items:
        inputs = item(inputs)
    return inputs


def make_stages(items, modules, parts: list[int], batch: dict, loss: PretrainingPipeLoss) -> list[Callable]:
    """[first stage step, last stage step] for a two-stage cut `parts`."""
    inputs = pipeline_inputs(batch, pair_head=False)
    labels = pipeline_labels(batch, batch["target_valid"].sum().float())
    first, last = items[parts[0]:parts[1]], items[parts[1]:parts[2]]
    with torch.no_grad():
        boundary = run_items(first, inputs)
    received = tuple(t.detach().requires_grad_(t.is_floating_point()) for t in boundary)
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(t.shape, generator=g) * 1e-3 for t in boundary if t.is_floating_point()]

    def clear() -> None:
        for module in modules:
            for p in module.parameters():
                p.grad = None
        for t in received:
            t.grad = None

    def first_stage() -> None:
        outputs = run_items(first, inputs)
        torch.autograd.backward([t for t in outputs if t.is_floating_point()], grads)

    def last_stage() -> None:
        loss(run_items(last, received), labels).backward()
        loss.take()  # drop the records

    return [(clear, first_stage), (clear, last_stage)]


def timed(clear: Callable[[], None], step: Callable[[], None]) -> float:
    clear()
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", required=True, help="write the results here")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default 7)")
    parser.add_argument("--repeats", type=int, default=2, help="calls per stage in a round; the fastest is kept")
    add_shape_arguments(parser, batch=1, hidden=768, heads=12)  # micro-batch 1: BERT-base widths on a CPU
    parser.add_argument("--full-length-layers", type=int, default=2)
    parser.add_argument("--max-predictions", type=int, default=80, help="MLM target slots per sequence")
    parser.add_argument("--valid-targets", type=int, default=77)
    args = parser.parse_args(argv)

    threads = args.threads or core_count()
    torch.set_num_threads(threads)
    config = ModelConfig(variant="narrow", vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers,
                         num_heads=args.heads, intermediate_size=4 * args.hidden,
                         full_length_layers=args.full_length_layers, max_position_embeddings=args.seq)
    batch = make_batch(args.batch, args.seq, args.vocab, args.max_predictions, args.valid_targets, args.seed)
    items, modules = build_items(config)
    loss = PretrainingPipeLoss(ProcessGroups.single().tensor)
    parts = {mode: stage_boundaries(config, 2, mode, seq_len=args.seq, num_queries=args.max_predictions)
             for mode in MODES}
    stages = {mode: make_stages(items, modules, parts[mode], batch, loss) for mode in MODES}
    costs = pipeline_layer_costs(config, args.seq, args.max_predictions)
    # item cuts -> layer cuts (item i + 1 is layer i; the head's cost is counted with the last layer)
    flop_imbalance = {mode: partition_imbalance(costs, [0, parts[mode][1] - 1, args.layers]) for mode in MODES}

    print(f"threads {threads}, narrow, micro-batch {args.batch} x seq {args.seq}, {args.layers} layers "
          f"({args.full_length_layers} full-length), hidden {args.hidden}, vocab {args.vocab}", flush=True)
    for mode in MODES:
        print(f"  {mode:7s} cut: items {parts[mode]} (stage 0 runs layers 0-{parts[mode][1] - 2})", flush=True)
    keys = [(mode, s) for mode in MODES for s in range(2)]
    for mode, s in keys:  # warm-up
        timed(*stages[mode][s])
    samples: dict[tuple[str, int], list[float]] = {key: [] for key in keys}
    for r in range(args.rounds):
        order = keys[r % len(keys):] + keys[:r % len(keys)]
        for key in order:
            samples[key].append(min(timed(*stages[key[0]][key[1]]) for _ in range(args.repeats)))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{m}/{s} {samples[(m, s)][-1]:.3f}" for m, s in keys),
              flush=True)

    stage_s = {mode: [statistics.median(samples[(mode, s)]) for s in range(2)] for mode in MODES}
    imbalance = {mode: max(stage_s[mode]) / min(stage_s[mode]) for mode in MODES}
    results = {
        "narrow_stage_imbalance_costaware": imbalance["cost"],
        "narrow_stage_imbalance_uniform": imbalance["uniform"],
        "bottleneck_speedup_cost_vs_uniform": max(stage_s["uniform"]) / max(stage_s["cost"]),
        "stage_fwd_bwd_s": stage_s,
        "flop_imbalance": flop_imbalance,
        "parts": parts,
        "samples": {f"{m}/{s}": v for (m, s), v in samples.items()},
        "config": {"batch": args.batch, "seq": args.seq, "layers": args.layers, "hidden": args.hidden,
                   "heads": args.heads, "vocab": args.vocab, "full_length_layers": args.full_length_layers,
                   "max_predictions": args.max_predictions, "rounds": args.rounds, "threads": threads,
                   "torch": torch.__version__},
    }
    key, op, value = TARGET
    results["targets"] = {key: f"{op} {value}"}
    results["met"] = {key: results[key] <= value}

    print()
    print("| partition | stage 0 fwd+bwd s | stage 1 fwd+bwd s | max/min (time) | max/min (FLOP estimate) |")
    print("|---|---|---|---|---|")
    for mode in MODES:
        print(f"| {mode} (items {parts[mode]}) | {stage_s[mode][0]:.3f} | {stage_s[mode][1]:.3f} | "
              f"{imbalance[mode]:.2f} | {results['flop_imbalance'][mode]:.2f} |")
    print(f"\nbottleneck stage, uniform / cost: {results['bottleneck_speedup_cost_vs_uniform']:.2f}x")
    print(f"{key} = {results[key]:.3f} (target {op} {value}): {'met' if results['met'][key] else 'MISSED'}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
