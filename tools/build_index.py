#!/usr/bin/env python
"""Build the sample index caches of a run ahead of time, in one process, so that no rank of the cluster job
waits for them (each rank then memory-maps the same .npy files).

  python tools/build_index.py --config examples/configs/narrowbert_base.yaml [section.key=value ...]

Builds (or checks) the train and valid indices of every data path in `data.data_paths`, with the run's
seq_len, packing, pair task and seed, in `data.index_cache_dir` (default: DATA_PATH/index_cache), and runs
the token-id check once. A later run with the same data settings starts from them.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_narrow.cli import run_cli  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the run's YAML config")
    parser.add_argument("overrides", nargs="*", help="section.key=value, as for pretraining")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    return run_cli(lambda: build(args.config, args.overrides), argv)


def build(config_path: str, overrides: list[str]) -> int:
    from megatron_narrow.config import load_run_config
    from megatron_narrow.training.data import build_datasets, check_data_paths
    from megatron_narrow.training.setup import check_packed_targets

    run = load_run_config(config_path, overrides)
    check_packed_targets(run.data)
    check_data_paths(run.data)
    started = time.perf_counter()
    data = build_datasets(run.data, run.model, run.train, total_samples=1)
    sets = [("train", data.train), ("valid", data.valid)]
    for name, dataset in sets:
        parts = getattr(dataset, "datasets", [dataset]) if dataset is not None else []
        for part in parts:
            print(f"{name}: {len(part):,} samples ({part.config.packing} packing, seq_len {part.config.seq_len}) "
                  f"-> {part.cache_entry}")
    print(f"done in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
