#!/usr/bin/env python
"""Join the N outputs of a multi-node preprocessing run into one dataset, identical byte for byte (shards and
index.json) to what a single machine would have written from all the inputs.

  # on each of N nodes (examples/preprocess_slurm.sbatch runs this as a SLURM job array):
  python tools/preprocess_data.py --input data/*.jsonl.gz --output-dir out/parts/$I --partition $I/$N ...
  # then, once:
  python tools/merge_datasets.py --output-dir out/corpus out/parts/*

Shards are hard-linked into the output where the filesystem allows (no copy), else copied; the manifest is
written last. Merging a finished merge again does nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_narrow.cli import run_cli  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("parts", nargs="+", help="the partition output directories (any order)")
    parser.add_argument("--output-dir", required=True, help="where the merged dataset goes")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    return run_cli(lambda: merge(args.parts, args.output_dir), argv)


def merge(parts: list[str], output_dir: str) -> int:
    from megatron_narrow.data.merge import merge_partitions

    manifest = merge_partitions(parts, output_dir)
    totals = manifest["totals"]
    print(f"{output_dir}: {totals['shards']} shards, {totals['documents']:,} documents, {totals['tokens']:,} tokens "
          f"from {len(parts)} parts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
