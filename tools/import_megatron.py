#!/usr/bin/env python
"""Import a Megatron-LM indexed dataset (PREFIX.bin + PREFIX.idx) as our shards and index.json, untokenized.

For corpora already tokenized by Megatron-LM's tools/preprocess_data.py (or any builder of its MMIDIDX
format): documents come from its document index, sentence lengths from its sequences (sentences with
--split-sentences, whole documents otherwise), token ids as they are. Give the tokenizer that made the ids:
it is recorded in the manifest, as preprocessing records it, so training refuses a different one, and an id
outside its vocabulary is refused here. Check the result with tools/verify_data.py.

  python tools/import_megatron.py --input corpus_text_sentence --output-dir data/corpus \\
      --tokenizer-type wordpiece --tokenizer-model vocab.txt

Errors are one `error:` line naming the file: exit 1 for a .idx we do not read (not MMIDIDX, another
version, a float dtype, multimodal), a .bin that does not match it, or ids outside the vocabulary; nothing is
written before every check has passed, and index.json is written last. --debug shows the traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_narrow.cli import run_cli  # noqa: E402
from megatron_narrow.data.megatron_import import import_megatron  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, metavar="PREFIX", help="PREFIX of PREFIX.bin and PREFIX.idx")
    parser.add_argument("--output-dir", required=True, help="directory for index.json and shard_*.arrow")
    parser.add_argument("--tokenizer-type", required=True, choices=["sentencepiece", "wordpiece"])
    parser.add_argument("--tokenizer-model", required=True,
                        help="the tokenizer that made the ids: sentencepiece .model, or vocab.txt / tokenizer.json")
    parser.add_argument("--shard-size-mb", type=float, default=256.0, help="token bytes per shard (default 256)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)

    def run() -> None:
        manifest = import_megatron(args.input, args.output_dir, args.tokenizer_type, args.tokenizer_model,
                                   shard_size_bytes=max(4, int(args.shard_size_mb * 2**20)))
        totals = manifest["totals"]
        print(f"imported {args.input}: {totals['documents']:,} documents, {totals['tokens']:,} tokens, "
              f"{totals['shards']} shards -> {args.output_dir} (empty documents skipped: "
              f"{manifest['rejected']['empty']})")

    return run_cli(run, argv)


if __name__ == "__main__":
    sys.exit(main())
