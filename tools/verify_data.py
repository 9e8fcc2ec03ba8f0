#!/usr/bin/env python
"""Check preprocessed datasets against their manifests: shard count, sizes, sha256 checksums, token ids.

  python tools/verify_data.py data/corpus [data/other ...]

Checks every directory given, even after a bad one: prints `OK DIR: ...` for each good one and one
`error:` line for each bad one (naming the directory and the bad file: a damaged index.json, a missing,
truncated or corrupt shard, a token id outside the vocabulary, a dataset of 0 documents), then exits 1
if any failed, 0 otherwise. --debug shows the traceback of each failure.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_narrow.cli import EXIT_DATA_ERROR, debug_requested, report_error, run_cli  # noqa: E402
from megatron_narrow.data.shards import IndexedDocuments  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data_dirs", nargs="+", help="directories written by tools/preprocess_data.py")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    debug = args.debug or debug_requested(argv)
    return run_cli(lambda: verify_all(args.data_dirs, debug=debug), argv)


def verify_all(data_dirs: list[str], *, debug: bool) -> int:
    """Verify each directory; one bad dataset must not hide the state of the others."""
    failed = [data_dir for data_dir in data_dirs if not verify_one(data_dir, debug=debug)]
    return EXIT_DATA_ERROR if failed else 0


def verify_one(data_dir: str, *, debug: bool) -> bool:
    """Open the dataset with every check on; print one OK line, or one error line naming the bad file."""
    try:
        documents = IndexedDocuments(data_dir, verify_checksums=True)
    except (ValueError, OSError) as error:  # DataError, and e.g. a shard we may not read
        report_error(error, debug=debug)
        return False
    totals = documents.manifest["totals"]
    print(f"OK {data_dir}: {totals['shards']} shards, {totals['documents']:,} documents, "
          f"{totals['tokens']:,} tokens, checksums and token ids match")
    return True


if __name__ == "__main__":
    sys.exit(main())
