#!/usr/bin/env python
"""Train a sentencepiece tokenizer (unigram or BPE) with BERT's special tokens from text or JSONL.

Example:
  python tools/train_tokenizer.py --input corpus.jsonl --model-prefix tok/spm --vocab-size 32000

Writes PREFIX.model and PREFIX.vocab with [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4. Use it with
`tools/preprocess_data.py --tokenizer-type sentencepiece --tokenizer-model PREFIX.model`.

Errors are one `error:` line: exit 2 for a refused argument (a missing input, a directory as input, a
--vocab-size larger than the text allows: the line says the largest), exit 1 for bad data (no valid
text, a corrupt .gz). --debug shows the traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_narrow.cli import run_cli  # noqa: E402
from megatron_narrow.data.raw_input import check_input_files  # noqa: E402
from megatron_narrow.data.train_tokenizer import train_sentencepiece  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return run_cli(lambda: train(parse_args(argv)), argv)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, metavar="FILE", help="text or JSONL files (.gz ok)")
    parser.add_argument("--model-prefix", required=True, help="output path prefix (writes PREFIX.model/.vocab)")
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--model-type", choices=["unigram", "bpe"], default="unigram")
    parser.add_argument("--json-keys", nargs="+", default=["text"], help="JSONL keys to read (default: text)")
    parser.add_argument("--text-mode", choices=["line", "block"], default="line")
    parser.add_argument("--input-sentence-size", type=int, default=2_000_000,
                        help="sample at most this many lines for training (default 2M)")
    parser.add_argument("--character-coverage", type=float, default=0.9995)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return parser.parse_args(argv)


def train(args: argparse.Namespace) -> int:
    check_input_files(args.input)
    model = train_sentencepiece(
        args.input, args.model_prefix, vocab_size=args.vocab_size, model_type=args.model_type,
        json_keys=args.json_keys, text_mode=args.text_mode, input_sentence_size=args.input_sentence_size,
        character_coverage=args.character_coverage,
    )
    print(f"wrote {model}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
