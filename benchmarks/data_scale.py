#!/usr/bin/env python
"""The data path at corpus scale: how long a rank takes to start, and how much memory it holds, on 1M, 5M
and 20M short documents, with the sample index cache cold and warm.

Synthetic corpora in our shard format (random token ids, no tokenizing): 1-3 sentences a document, 4-40
tokens each (median ~22 tokens a document), 2M documents a shard. Per size, each measure runs in a fresh
process doing what a training rank does (training.data.build_datasets: open the shards, split, build or
open the index of the train and valid splits, seq 128, packing none) and then reads samples:

- cold start: no cache (first start; the token-id pass over the shards, the index build and the cache
  write included);
- warm start: the cache written by the cold start (what every later start and every other rank pays);
- peak RSS of the warm start over the process's RSS after its imports (VmHWM after resetting it through
  /proc/self/clear_refs; memory-mapped files count only for the pages touched); Linux only;
- build_us_per_document: the index build alone (in memory, no cache) per document, fastest of three;
- samples_per_s: masked samples read in random order after the warm start.

Keys (targets): warm_start_s_20m (<= 2 s), warm_start_rss_mb_20m (<= 300 MB), build_us_per_document
(<= 1 us, at 20M), build cost per document flat from 1M to 20M (within 1.5x: build_flatness).

  python benchmarks/data_scale.py --json OUT.json [--sizes 1 5 20] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megatron_narrow.data.shards import FORMAT_NAME, FORMAT_VERSION, encode_shard, sha256_file  # noqa: E402

VOCAB = 30522
SPECIAL = {"pad": 0, "unk": 100, "cls": 101, "sep": 102, "mask": 103}
PER_SHARD = 2_000_000

# What one rank runs, in a fresh interpreter; prints one JSON line.
RANK = r"""
import json, sys, time
import numpy as np
from megatron_narrow.config import DataConfig, ModelConfig, TrainConfig
from megatron_narrow.training.data import build_datasets
data_dir, mode, reads = sys.argv[1], sys.argv[2], int(sys.argv[3])
def status(key):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key + ":"))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets the peak (VmHWM) to the current RSS: the peak below is the data's
base = status("VmRSS")
start = time.perf_counter()
config = DataConfig(data_paths=[data_dir], seq_len=128, max_predictions=20, split="99,1,0")
data = build_datasets(config, ModelConfig(vocab_size=30522, max_position_embeddings=128), TrainConfig(), 10**6)
data.train[0]
started = time.perf_counter() - start
peak = status("VmHWM")
order = np.random.default_rng(0).integers(0, len(data.train), reads)
t = time.perf_counter()
for i in order:
    data.train[int(i)]
rate = reads / (time.perf_counter() - t)
print(json.dumps({"start_s": started, "rss_mb": (peak - base) / 1024, "samples_per_s": rate,
                  "samples": len(data.train)}))
"""

BUILD = r"""
import json, sys, time
from megatron_narrow.config import DataConfig
from megatron_narrow.data.samples import BertSampleDataset, split_documents
from megatron_narrow.data.shards import IndexedDocuments
documents = IndexedDocuments(sys.argv[1], check_token_ids=False)
train, _, _ = split_documents(len(documents), "99,1,0")
times = []
for _ in range(3):  # the first also faults the shards' pages in; the build itself is the fastest of three
    start = time.perf_counter()
    BertSampleDataset(documents, train, DataConfig(seq_len=128, max_predictions=20))
    times.append(time.perf_counter() - start)
print(json.dumps({"build_s": min(times)}))
"""


def write_corpus(root: Path, documents: int, seed: int = 0) -> Path:
    """Shards of random short documents and their manifest, as tools/preprocess_data.py would write them."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shards, total_tokens = [], 0
    for index, first in enumerate(range(0, documents, PER_SHARD)):
        count = min(PER_SHARD, documents - first)
        sentences = rng.integers(1, 4, count)
        lengths = rng.integers(4, 41, int(sentences.sum())).astype(np.int32)
        doc_sent_offsets = np.concatenate([[0], np.cumsum(sentences)]).astype(np.int32)
        doc_tokens = np.add.reduceat(lengths, doc_sent_offsets[:-1]).astype(np.int64)
        token_offsets = np.concatenate([[0], np.cumsum(doc_tokens)]).astype(np.int32)
        tokens = rng.integers(1000, VOCAB, int(token_offsets[-1]), dtype=np.int32)
        name = f"shard_{index:05d}.arrow"
        (root / name).write_bytes(encode_shard(tokens, token_offsets, lengths, doc_sent_offsets))
        shards.append({"file": name, "documents": count, "tokens": int(tokens.size),
                       "bytes": (root / name).stat().st_size, "sha256": sha256_file(root / name)})
        total_tokens += int(tokens.size)
    manifest = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
                "tokenizer": {"file": "synthetic", "identity": "synthetic", "vocab_size": VOCAB,
                              "special_ids": SPECIAL},
                "shards": shards, "totals": {"documents": documents, "tokens": total_tokens, "shards": len(shards)}}
    (root / "index.json").write_text(json.dumps(manifest, indent=1))
    return root


def run(script: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, cwd=REPO,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 5, 20], help="millions of documents")
    parser.add_argument("--reads", type=int, default=2000)
    parser.add_argument("--keep", type=Path, help="keep the corpora here (and reuse them)")
    args = parser.parse_args(argv)
    root = args.keep or Path(tempfile.mkdtemp(prefix="data_scale_"))
    results: dict = {}
    print("| documents | cold start s | warm start s | warm RSS MB | build us/doc | samples/s |")
    print("|---|---|---|---|---|---|")
    try:
        for millions in args.sizes:
            data = root / f"corpus_{millions}m"
            if not (data / "index.json").is_file():
                write_corpus(data, millions * 1_000_000)
            shutil.rmtree(data / "index_cache", ignore_errors=True)
            cold = run(RANK, str(data), "cold", "10")
            warm = run(RANK, str(data), "warm", str(args.reads))
            build = run(BUILD, str(data))
            per_doc = build["build_s"] / (millions * 1e6) * 1e6
            key = f"{millions}m"
            results.update({f"cold_start_s_{key}": cold["start_s"], f"warm_start_s_{key}": warm["start_s"],
                            f"warm_start_rss_mb_{key}": warm["rss_mb"], f"build_us_per_document_{key}": per_doc,
                            f"samples_per_s_{key}": warm["samples_per_s"]})
            print(f"| {millions}M | {cold['start_s']:.2f} | {warm['start_s']:.2f} | {warm['rss_mb']:.0f} | "
                  f"{per_doc:.2f} | {warm['samples_per_s']:,.0f} |", flush=True)
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    sizes = [f"{m}m" for m in args.sizes]
    results["build_us_per_document"] = results[f"build_us_per_document_{sizes[-1]}"]
    per_doc = [results[f"build_us_per_document_{s}"] for s in sizes]
    results["build_flatness"] = max(per_doc) / min(per_doc)
    print(f"\nbuild_us_per_document {results['build_us_per_document']:.2f} (<= 1), flatness "
          f"{results['build_flatness']:.2f} (<= 1.5)" + (
              f", warm_start_s_20m {results['warm_start_s_20m']:.2f} (<= 2), warm_start_rss_mb_20m "
              f"{results['warm_start_rss_mb_20m']:.0f} (<= 300)" if "warm_start_s_20m" in results else ""))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
