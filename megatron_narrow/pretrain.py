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

import sys
from pathlib import Path

sys.path[:0] = [] if __package__ else [str(Path(__file__).resolve().parents[1])]  # as a script: this checkout

from megatron_narrow.entry import exit_now, script_main  # noqa: E402

main = script_main("pretrain", __doc__)

if __name__ == "__main__":
    exit_now(main())
