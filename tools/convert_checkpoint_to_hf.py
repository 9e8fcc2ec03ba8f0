#!/usr/bin/env python
"""Convert a megatron_narrow training checkpoint into a directory that stock transformers loads.

  python tools/convert_checkpoint_to_hf.py --checkpoint runs/pretrain --output hf/my-model
  python tools/convert_checkpoint_to_hf.py --checkpoint runs/pretrain/checkpoints/step_0001000 --output hf/m

--checkpoint is a save_dir (its checkpoints/latest is converted) or one step_ directory. Any ZeRO stage
and tensor-parallel size is merged into one model. The output holds model.safetensors, config.json, the
tokenizer (tokenizer.json, tokenizer_config.json) and README.md; NarrowBERT also ships its modelling
code (load with trust_remote_code=True).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="save_dir (uses checkpoints/latest) or a step_ directory")
    parser.add_argument("--output", required=True, help="Hugging Face output directory (new or empty)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace what an existing, non-empty --output holds (it is emptied first)")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="load the checkpoint's files without checking what their pickles call; only for a "
                             "checkpoint you trust that was refused for naming an unexpected global")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported
    from megatron_narrow.cli import run_cli
    from megatron_narrow.convert.checkpoint import convert_checkpoint

    def convert() -> None:
        output = Path(args.output)
        if output.exists() and not output.is_dir():
            raise ValueError(f"--output {output} is a file: give a directory")
        if output.is_dir() and any(output.iterdir()):
            if not args.overwrite:
                raise ValueError(f"--output {output} is not empty: files of another model would stay beside this "
                                 "one; choose a new directory or pass --overwrite to replace its contents")
            shutil.rmtree(output)
        print(f"wrote {convert_checkpoint(args.checkpoint, output, trust=args.trust_checkpoint)}")

    return run_cli(convert, argv)


if __name__ == "__main__":
    sys.exit(main())
