"""Fine-tune a pretrained BERT / NarrowBERT for sequence classification (single texts or pairs) or BIO
token classification (NER), on DeepSpeed with data parallelism, then export it to Hugging Face.

  deepspeed megatron_narrow/finetune.py --config TASK.yaml --deepspeed_config ds_configs/zero0.json [key=value ...]
  torchrun --nproc_per_node N megatron_narrow/finetune.py ...     (also mpirun, or plain python for one process)

The YAML has sections task, model and train (see examples/configs/finetune_*.yaml). model.init_from is a
pretraining checkpoint (a save_dir or step_ directory) or a Hugging Face BERT / NarrowBERT directory. narrow
models run their narrow layers for [CLS] only (classification) or for the labeled words only (NER). The run
writes SAVE_DIR/metrics.jsonl, SAVE_DIR/eval_results.json and the exported model in SAVE_DIR/hf:
    pipeline("text-classification", model="SAVE_DIR/hf", trust_remote_code=True)   # narrow needs remote code

The run checkpoints every train.save_interval steps and at the end, keeps its best evaluation in SAVE_DIR/best,
and resumes from SAVE_DIR when run again. Exit codes: 0 finished; 75 stopped by SIGTERM or Ctrl-C after saving a
checkpoint (run the same command again to resume); 2 a refused config or input; 1 stopped on a non-finite loss.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[:0] = [] if __package__ else [str(Path(__file__).resolve().parents[1])]  # as a script: this checkout

from megatron_narrow.entry import exit_now, script_main  # noqa: E402

main = script_main("finetune", __doc__)

if __name__ == "__main__":
    exit_now(main())
