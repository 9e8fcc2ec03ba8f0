#!/usr/bin/env python
"""What the checkpoint safety check (megatron_narrow/file_safety.py) costs against loading the checkpoint.

A BERT-base checkpoint in DeepSpeed's layout: mp_rank_00_model_states.pt (fp32 module state, our client state
with numpy RNG states) and zero_pp_rank_0_mp_rank_00_optim_states.pt (fp32 master weights and AdamW's two
moments after one step). Each round times the check of both files (the pickle's globals, read from its
opcodes) and their load (torch.load, weights_only=True with the allowlist), interleaved; medians.

  python benchmarks/checkpoint_check.py --json OUT.json [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_narrow.config import ModelConfig  # noqa: E402
from megatron_narrow.file_safety import check_checkpoint_directory, load_checkpoint_file  # noqa: E402
from megatron_narrow.model import BertForPreTraining  # noqa: E402


def write_checkpoint(directory: Path) -> int:
    """BERT-base model and optimizer states as DeepSpeed lays them out; returns their bytes."""
    model = BertForPreTraining(ModelConfig(vocab_size=30522, hidden_size=768, num_layers=12, num_heads=12,
                                           max_position_embeddings=512))
    optimizer = torch.optim.AdamW(model.parameters())
    for parameter in model.parameters():
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()
    client = {"step": 1, "consumed_samples": 256, "rng": {"python": random.getstate(),
                                                          "numpy": np.random.get_state(),
                                                          "torch": torch.get_rng_state()}}
    torch.save({"module": model.state_dict(), "megatron_narrow": client}, directory / "mp_rank_00_model_states.pt")
    torch.save({"optimizer_state_dict": optimizer.state_dict(),
                "fp32_flat_groups": [torch.cat([p.detach().flatten() for p in model.parameters()])]},
               directory / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    return sum(f.stat().st_size for f in directory.iterdir())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", required=True)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        size = write_checkpoint(directory)
        files = sorted(directory.glob("*.pt"))
        checks, loads = [], []
        for r in range(args.rounds):
            for measure in (("check", "load") if r % 2 == 0 else ("load", "check")):
                start = time.perf_counter()
                if measure == "check":
                    check_checkpoint_directory(directory)
                else:
                    for file in files:
                        load_checkpoint_file(file, trust=True)  # the load alone, as DeepSpeed does it
                (checks if measure == "check" else loads).append(time.perf_counter() - start)
    check, load = statistics.median(checks), statistics.median(loads)
    results = {"checkpoint_bytes": size, "check_s": check, "load_s": load, "check_vs_load": check / load,
               "rounds": args.rounds}
    print(f"BERT-base checkpoint, {size / 2**30:.2f} GiB in 2 files: check {check * 1e3:.1f} ms, load "
          f"{load * 1e3:.0f} ms, check / load = {100 * check / load:.2f}% (target <= 5%)")
    Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
