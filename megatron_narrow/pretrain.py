"""BERT / NarrowBERT / token-drop pretraining on DeepSpeed.

  deepspeed [--hostfile H] megatron_narrow/pretrain.py --config YAML --deepspeed_config JSON [section.key=value ...]
  mpirun -np N python megatron_narrow/pretrain.py ...        (ranks found through mpi4py)
  torchrun --nproc_per_node N megatron_narrow/pretrain.py ...

The YAML has sections model, data, parallel and train (see examples/configs/); each key can be
overridden on the command line, e.g. `train.lr=2e-4 model.variant=narrow`. The run resumes from
train.save_dir when it holds a checkpoint (the newest complete one) and writes metrics.jsonl and
tensorboard events there.

Exit codes: 0 finished; 75 stopped early by SIGTERM or Ctrl-C after saving a checkpoint (run the same
command again to resume); 2 a refused config or input (one `error:` line; --debug shows the traceback);
1 stopped on a non-finite loss.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_narrow.entry import exit_now, run_entry  # noqa: E402


def _pretrain(args: argparse.Namespace, stop) -> None:
    from megatron_narrow.cli import refusing
    from megatron_narrow.config import load_run_config
    from megatron_narrow.training.loop import pretrain

    with refusing():
        run = load_run_config(args.config, args.overrides)
    pretrain(run, args.deepspeed_config, stop)


def main(argv: list[str] | None = None) -> int:
    return run_entry(argv, _pretrain, description=__doc__, sections="model, data, parallel, train")


if __name__ == "__main__":
    exit_now(main())
