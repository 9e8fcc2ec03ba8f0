"""Fine-tune a pretrained BERT / NarrowBERT for sequence classification (single texts or pairs) or BIO
token classification (NER), on DeepSpeed with data parallelism, then export it to Hugging Face.

  deepspeed megatron_narrow/finetune.py --config TASK.yaml --deepspeed_config ds_configs/zero0.json [key=value ...]
  torchrun --nproc_per_node N megatron_narrow/finetune.py ...     (also mpirun, or plain python for one process)

The YAML has sections task, model and train (see examples/configs/finetune_*.yaml). model.init_from is a
pretraining checkpoint (a save_dir or step_ directory) or a Hugging Face BERT / NarrowBERT directory. narrow
models run their narrow layers for [CLS] only (classification) or for the labeled words only (NER). The run
writes SAVE_DIR/metrics.jsonl, SAVE_DIR/eval_results.json and the exported model in SAVE_DIR/hf:
    pipeline("text-classification", model="SAVE_DIR/hf", trust_remote_code=True)   # narrow needs remote code
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_narrow.entry import exit_now, run_entry  # noqa: E402  (the same command line as pretraining)


def _finetune(args, stop) -> None:
    from megatron_narrow.cli import refusing
    from megatron_narrow.tasks.config import load_finetune_config
    from megatron_narrow.tasks.loop import finetune

    with refusing():
        run = load_finetune_config(args.config, args.overrides)
    finetune(run, args.deepspeed_config, stop)


def main(argv: list[str] | None = None) -> int:
    return run_entry(argv, _finetune, description=__doc__, sections="task, model, train")


if __name__ == "__main__":
    exit_now(main())
