#!/usr/bin/env python
"""Check a preprocessed dataset against its manifest: shard count, sizes and sha256 checksums.

Exits 0 when every shard matches; otherwise prints one line naming the bad shard and exits 1.
  python tools/verify_data.py data/corpus [data/other ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_narrow.data.shards import DataError, IndexedDocuments  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data_dirs", nargs="+", help="directories written by tools/preprocess_data.py")
    args = parser.parse_args(argv)
    for data_dir in args.data_dirs:
        try:
            documents = IndexedDocuments(data_dir, verify_checksums=True)
        except DataError as error:
            print(f"FAILED: {error}", file=sys.stderr)
            return 1
        totals = documents.manifest["totals"]
        print(f"OK {data_dir}: {totals['shards']} shards, {totals['documents']:,} documents, "
              f"{totals['tokens']:,} tokens, checksums match")
    return 0


if __name__ == "__main__":
    sys.exit(main())
