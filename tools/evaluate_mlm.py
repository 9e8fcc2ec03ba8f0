#!/usr/bin/env python
"""Did pretraining learn? Top-1 accuracy on held-out masked tokens (the run's validation split, masked as in
training) for the trained model, an untrained one of the same shape and the unigram baseline (always the
most frequent token), plus fill-mask guesses before and after training on a few held-out sentences.

  python tools/evaluate_mlm.py runs/quickstart/pretrain
  python tools/evaluate_mlm.py runs/pretrain/checkpoints/step_0010000 --samples 1024 --json report.json

Exit code 0 when the trained model beats the unigram baseline, 3 when it does not (a run that has not left
the unigram plateau yet), 2 for a bad argument.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

EXIT_NOT_LEARNED = 3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a pretraining train.save_dir (its newest checkpoint) or a step directory")
    parser.add_argument("--samples", type=int, default=128, help="held-out samples to score (default 128)")
    parser.add_argument("--examples", type=int, default=3, help="fill-mask examples to show (default 3)")
    parser.add_argument("--json", default=None, help="also write the report here")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="load the checkpoint's files without checking what their pickles call (only for a "
                             "checkpoint you trust that was refused for naming an unexpected global)")
    args = parser.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from megatron_narrow.mlm_report import mlm_report

    try:
        report = mlm_report(args.checkpoint, samples=args.samples, examples=args.examples,
                            trust=args.trust_checkpoint)
    except ValueError as error:  # a missing checkpoint, data or tokenizer (CheckpointError included)
        print(f"error: {error}", file=sys.stderr)
        return 2
    print("\n".join(report.lines()))
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(report), indent=2) + "\n")
    return 0 if report.trained_accuracy > report.unigram_accuracy else EXIT_NOT_LEARNED


if __name__ == "__main__":
    sys.exit(main())
