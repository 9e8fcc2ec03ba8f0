#!/usr/bin/env python
"""Write an English JSONL corpus from the Python standard library's docstrings (no network needed).

  python tools/make_offline_corpus.py --output data/raw/stdlib_docs.jsonl
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_narrow.data.offline_corpus import write_offline_corpus  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="JSONL file to write")
    parser.add_argument("--max-documents", type=int, default=None, help="keep only the first N documents")
    parser.add_argument("--repeat", type=int, default=1, help="write the corpus N times (for benchmarks)")
    args = parser.parse_args(argv)
    count = write_offline_corpus(args.output, max_documents=args.max_documents, repeat=args.repeat)
    print(f"wrote {count:,} documents to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
