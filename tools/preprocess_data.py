#!/usr/bin/env python
"""Tokenize raw corpora into sharded Arrow files + index.json.

Inputs, by name (--input-format overrides): JSONL (.jsonl/.json/.ndjson) or plain text, either optionally
compressed (.gz, .zst, .xz, .bz2); Parquet (.parquet, e.g. FineWeb or Wikipedia from the Hub: the
--json-keys columns are read a row group at a time); a directory written by datasets' save_to_disk, or an
.arrow file of such a dataset. The same documents give the same shards in every form.

Examples:
  python tools/preprocess_data.py --input corpus.jsonl.gz --output-dir data/corpus \\
      --tokenizer-type wordpiece --tokenizer-model vocab.txt --workers 8 --split-sentences
  python tools/preprocess_data.py --input fineweb/data/CC-MAIN-2024-10/*.parquet --output-dir data/fineweb \\
      --tokenizer-type wordpiece --tokenizer-model vocab.txt --workers 16

The output is byte-identical for any --workers. Killed and rerun with the same arguments, it skips the
shards it finished (its workers die with it). Bad records (invalid JSON or UTF-8, missing or non-string
keys, empty or oversized documents) are counted by kind in the summary and the manifest, and written to
--reject-file if given; a run that keeps no document at all writes no manifest and exits 1.

Errors are one `error:` line naming the file and the fix: exit 2 for a refused argument or file (a
missing or corrupt tokenizer, a directory as --input, an --output-dir in use by another run), exit 1
for bad data (a corrupt .gz/.zst/.xz/.bz2 stream or Parquet file, a missing column, no valid documents).
--debug shows the traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_narrow.cli import run_cli  # noqa: E402
from megatron_narrow.data.preprocess import PreprocessConfig, preprocess  # noqa: E402


def parse_args(argv: list[str] | None = None) -> PreprocessConfig:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, metavar="FILE",
                        help="input files (or datasets directories), read in the order given; see above for the "
                             "formats")
    parser.add_argument("--output-dir", required=True, help="directory for index.json and shard_*.arrow")
    parser.add_argument("--tokenizer-type", required=True, choices=["sentencepiece", "wordpiece"])
    parser.add_argument("--tokenizer-model", required=True,
                        help="sentencepiece .model, or WordPiece vocab.txt / tokenizer.json")
    parser.add_argument("--workers", type=int, default=1, help="tokenizing processes (default 1)")
    parser.add_argument("--json-keys", nargs="+", default=["text"],
                        help="JSONL keys (Parquet/arrow columns) that form each document, joined as paragraphs "
                             "(default: text)")
    parser.add_argument("--input-format", choices=["auto", "jsonl", "text", "parquet", "arrow"], default="auto",
                        help="override detection by file extension")
    parser.add_argument("--text-mode", choices=["line", "block"], default="line",
                        help="plain text: one document per line, or per blank-line-separated block")
    parser.add_argument("--split-sentences", action="store_true",
                        help="split paragraphs into sentences (blingfire; no download needed)")
    parser.add_argument("--max-document-bytes", type=int, default=10_000_000,
                        help="reject documents larger than this many UTF-8 bytes (default 10 MB)")
    parser.add_argument("--shard-size-mb", type=float, default=256.0,
                        help="raw input MiB per output shard (default 256)")
    parser.add_argument("--work-chunk-mb", type=float, default=4.0,
                        help="raw input MiB per worker task (default 4); shards group whole tasks. It decides the "
                             "shard boundaries, so keep it fixed for a dataset (a rerun with another value redoes it)")
    parser.add_argument("--partition", default=None, metavar="I/N",
                        help="process only part I of N (0-based; whole input files, split by size): one node of a "
                             "multi-node run; join the N outputs with tools/merge_datasets.py")
    parser.add_argument("--reject-file", default=None, help="write rejected records here as JSONL")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an output directory that holds a different dataset")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    return PreprocessConfig(
        inputs=args.input, output_dir=args.output_dir, tokenizer_type=args.tokenizer_type,
        tokenizer_model=args.tokenizer_model, workers=args.workers, json_keys=args.json_keys,
        input_format=args.input_format, text_mode=args.text_mode, split_sentences=args.split_sentences,
        max_document_bytes=args.max_document_bytes, shard_size_bytes=max(1, int(args.shard_size_mb * 2**20)),
        work_chunk_bytes=max(1, int(args.work_chunk_mb * 2**20)), partition=parse_partition(args.partition),
        reject_file=args.reject_file, overwrite=args.overwrite, progress=not args.quiet,
    )


def parse_partition(text: str | None) -> tuple[int, int] | None:
    """"I/N" -> (I, N); a malformed value is a one-line error."""
    if text is None:
        return None
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise ValueError(f"--partition {text}: give I/N, e.g. 0/8 (part I of N, counted from 0)") from None
    return index, count


def main(argv: list[str] | None = None) -> int:
    def run() -> None:
        preprocess(parse_args(argv))

    return run_cli(run, argv)


if __name__ == "__main__":
    sys.exit(main())
