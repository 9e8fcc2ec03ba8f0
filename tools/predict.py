#!/usr/bin/env python
"""Batch prediction with a fine-tuned classifier exported by megatron_narrow/finetune.py (SAVE_DIR/hf), through
megatron_narrow's model code: a NarrowBERT classifier computes its narrow layers for [CLS] only, a NarrowBERT
tagger for each word's first sub-token only. Prints throughput.

  python tools/predict.py --model runs/finetune/hf --input test.jsonl --output predictions.jsonl
  python tools/predict.py --model runs/ner/hf --input test.conll --output tags.jsonl --batch-size 64

Inputs are task files (.csv/.tsv/.jsonl; token classification also CoNLL, one word per line, tags optional).
Each output line holds the input, its gold label(s) when the file has them, and the prediction(s).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="an exported classifier directory (SAVE_DIR/hf)")
    parser.add_argument("--input", required=True, help="a task file to predict")
    parser.add_argument("--output", required=True, help="JSONL of predictions")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-seq-len", type=int, default=None, help="default: the fine-tuning run's")
    parser.add_argument("--text-field", default=None, help="the text's column/key; default: the fine-tuning run's")
    parser.add_argument("--text-pair-field", default=None,
                        help="second text of a pair (MNLI-style); default: the fine-tuning run's")
    parser.add_argument("--tokens-field", default=None,
                        help="token classification, JSONL: the words' key; default: the fine-tuning run's")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    args = parser.parse_args(argv)

    import torch

    from megatron_narrow.tasks.config import TaskConfig
    from megatron_narrow.tasks.data import TaskDataError
    from megatron_narrow.tasks.kinds import task_kind
    from megatron_narrow.tasks.predict import load_classifier, predict_file

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        classifier = load_classifier(args.model, max_seq_len=args.max_seq_len)
        task = TaskConfig(text_field=args.text_field or classifier.text_field,
                          tokens_field=args.tokens_field or classifier.tokens_field,
                          text_pair_field=args.text_pair_field or classifier.text_pair_field)
        records, stats = predict_file(classifier, args.input, task, batch_size=args.batch_size)
    except (ValueError, TaskDataError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    variant = classifier.model.bert.config.variant
    what = task_kind(classifier.kind).description
    print(f"{stats.examples:,} examples ({what}, {variant}) in {stats.seconds:.2f} s: "
          f"{stats.sequences_per_s:,.1f} sequences/s, {stats.tokens_per_s:,.0f} tokens/s -> {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
