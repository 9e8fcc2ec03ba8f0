#!/usr/bin/env python
"""What a preprocessed dataset looks like to pretraining, before a cluster run: documents, tokens, the
document-length distribution, and the share of each row that would be real text under every data.packing
mode at a sequence length (the rest is padding, computed but wasted).

  python tools/data_stats.py data/corpus --seq-len 512 [--packing none concat segments] [--split 949,50,1]

The fractions are exact for one epoch of the train split (from the sample index, no sample is built);
[CLS]/[SEP] count as real, as training's `real_token_fraction` does.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_narrow.cli import run_cli  # noqa: E402
from megatron_narrow.config import DataConfig  # noqa: E402
from megatron_narrow.data.packing import max_packed_targets  # noqa: E402
from megatron_narrow.data.samples import BertSampleDataset, split_documents  # noqa: E402
from megatron_narrow.data.shards import IndexedDocuments  # noqa: E402

MODES = ("none", "concat", "segments")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data_dir", help="a directory written by tools/preprocess_data.py")
    parser.add_argument("--seq-len", type=int, default=512, help="data.seq_len of the run (default 512)")
    parser.add_argument("--packing", nargs="+", choices=MODES, default=list(MODES), help="modes to compare")
    parser.add_argument("--split", default="949,50,1", help="data.split of the run (the train split is counted)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    return run_cli(lambda: report(args), argv)


def report(args: argparse.Namespace) -> int:
    documents = IndexedDocuments(args.data_dir)
    lengths = documents.document_lengths()
    print(f"{args.data_dir}: {len(documents):,} documents, {int(lengths.sum()):,} tokens")
    quantiles = (10, 25, 50, 75, 90, 99)
    values = np.percentile(lengths, quantiles) if lengths.size else np.zeros(len(quantiles))
    print("document tokens: " + ", ".join(f"p{q} {v:,.0f}" for q, v in zip(quantiles, values, strict=True))
          + f", max {int(lengths.max()) if lengths.size else 0:,}")
    short = float((lengths + 2 <= args.seq_len // 2).mean()) if lengths.size else 0.0
    print(f"{short:.0%} of documents fill less than half a row of {args.seq_len}")
    train, _, _ = split_documents(len(documents), args.split)
    print(f"\ntrain split, seq_len {args.seq_len}:\n{'packing':<10} {'rows':>12} {'real tokens':>12}")
    for packing in args.packing:
        targets = max_packed_targets(args.seq_len, 0.15) if packing == "segments" else args.seq_len // 4
        config = DataConfig(seq_len=args.seq_len, max_predictions=targets, packing=packing)
        dataset = BertSampleDataset(documents, train, config)
        print(f"{packing:<10} {len(dataset):>12,} {dataset.real_token_fraction():>12.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
