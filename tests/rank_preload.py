"""Imported once by the fork server of tests/distributed.py, so that no rank forked from it pays for these again.

What a training or fine-tuning run would otherwise import or probe for itself: ~0.3 s of every run (tensorboard's
writer, which brings boto3 along; DeepSpeed's probe of its ops and its CPU shared-memory collective, loaded from the
cache tools/install.sh filled) and ~2 s of every fine-tuning rank (transformers, for the tokenizer and the export).
Only a speed-up: anything that fails here is left to the rank, which then does it as it would anyway.
"""

from __future__ import annotations

import contextlib
import io


def _preload() -> None:
    with contextlib.suppress(Exception), contextlib.redirect_stdout(io.StringIO()):
        import torch.utils.tensorboard  # noqa: F401
        from transformers import AutoTokenizer  # noqa: F401

        import megatron_narrow.convert.export  # noqa: F401
        import megatron_narrow.finetune  # noqa: F401
        import megatron_narrow.pretrain  # noqa: F401

    with contextlib.suppress(Exception), contextlib.redirect_stdout(io.StringIO()):
        import deepspeed.ops
        from deepspeed.accelerator import get_accelerator
        from deepspeed.comm.torch import build_shm_op

        deepspeed.ops.__compatible_ops__  # noqa: B018  (computed on first access)
        if get_accelerator().device_name() == "cpu":
            build_shm_op()


_preload()
