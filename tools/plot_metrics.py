#!/usr/bin/env python
"""Plot training and validation loss against steps for one or more runs, overlaid (e.g. to compare variants).

  python tools/plot_metrics.py runs/quickstart/pretrain                      # writes runs/quickstart/pretrain/loss.png
  python tools/plot_metrics.py runs/bert runs/narrow --output compare.png    # two runs, one figure
  python tools/plot_metrics.py runs/bert runs/narrow --labels BERT NarrowBERT --output compare.png

Each RUN_DIR is a train.save_dir holding metrics.jsonl (pretraining or fine-tuning).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="train.save_dir of each run")
    parser.add_argument("--output", default=None, help="the figure (default: RUN_DIR/loss.png for one run, "
                                                      "loss.png for several)")
    parser.add_argument("--labels", nargs="+", default=None, help="one legend name per run (default: folder names)")
    parser.add_argument("--title", default="MLM loss")
    args = parser.parse_args(argv)
    from megatron_narrow.training.metrics_plot import plot_loss_curves, read_loss_curves

    if args.labels is not None and len(args.labels) != len(args.runs):
        print(f"error: {len(args.labels)} --labels for {len(args.runs)} runs", file=sys.stderr)
        return 2
    labels = args.labels or [None] * len(args.runs)
    try:
        curves = [read_loss_curves(run, label) for run, label in zip(args.runs, labels, strict=True)]
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    output = args.output or (Path(args.runs[0]) / "loss.png" if len(args.runs) == 1 else Path("loss.png"))
    print(f"wrote {plot_loss_curves(curves, output, title=args.title)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
