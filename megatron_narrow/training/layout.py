"""The layout a checkpoint was saved with, and resuming on another one.

Every tag records its layout in layout.json: data x tensor x pipeline parallel sizes and the ZeRO stage.
A resume on the same layout loads the tag as it is (bit-exact). On another layout the tag goes through
DeepSpeed's universal checkpoint: `ds_to_universal` rewrites it once, per parameter and whole (ZeRO
partitions gathered, tensor-parallel slices merged by the patterns below, vocabulary padding stripped),
into TAG_universal beside it (a pipeline's stage parameters renamed to the model's, the MLM bias re-padded),
and DeepSpeed's `load_universal` slices it for the new layout. What that path cannot do is refused in one
line that says what can be done.
"""

from __future__ import annotations

import json
import re
from argparse import Namespace
from pathlib import Path

from megatron_narrow.file_safety import check_checkpoint_directory, load_checkpoint_file
from megatron_narrow.formats.checkpoint_files import LAYOUT_NAME, UNIVERSAL_SUFFIX


def current_layout(data_parallel: int, tensor_parallel: int, pipeline_parallel: int, zero_stage: int) -> dict:
    return {"data_parallel": data_parallel, "tensor_parallel": tensor_parallel,
            "pipeline_parallel": pipeline_parallel, "zero_stage": zero_stage}


def describe(layout: dict) -> str:
    return (f"DP={layout['data_parallel']} TP={layout['tensor_parallel']} PP={layout['pipeline_parallel']} "
            f"ZeRO-{layout['zero_stage']}")


def saved_layout(tag_dir: Path) -> dict | None:
    """The layout a tag was saved with (None: a tag from before layouts were recorded)."""
    try:
        return json.loads((tag_dir / LAYOUT_NAME).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def universal_checkpoint_info(vocab_size: int, padded_vocab_size: int, parameter_names: list[str]) -> dict:
    """What ds_to_universal needs to merge our tensor-parallel slices (client state key
    `universal_checkpoint_info`; each name may match one pattern only): column-parallel weights and biases
    are split along dim 0, its default; row-parallel weights along dim 1; LayerNorms, row-parallel biases,
    position and token-type embeddings, the MLM transform and the importance vector are replicated; the word
    embeddings are vocabulary rows padded to a multiple of 128 x TP. (The MLM bias is padded the same way but
    DeepSpeed's vocabulary handling takes 2-D tensors only: it merges as a column-parallel tensor, and
    repad_vocabulary_vectors re-pads it for the resuming run.)"""
    from deepspeed.checkpoint import constants as ds

    def used(patterns: list[str]) -> list[str]:  # ds_to_universal refuses a pattern that matches nothing
        return [p for p in patterns if any(re.match(p, name) for name in parameter_names)]

    return {
        ds.UNIVERSAL_CHECKPOINT_VERSION_KEY: ds.UNIVERSAL_CHECKPOINT_VERSION_VALUE,
        ds.TP_REPLICATED_PARAMETER_PATTERNS: used([
            r".*LayerNorm\.(weight|bias)$", r".*output\.dense\.bias$",
            r".*position_embeddings\.weight$", r".*token_type_embeddings\.weight$", r".*transform\.dense\.",
            r".*pooler\.dense\.", r".*seq_relationship\."]),
        ds.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS: used([r".*output\.dense\.weight$"]),  # both sublayers' outputs
        ds.VOCABULARY_PARAMETER_PATTERNS: used([r".*word_embeddings\.weight$"]),
        ds.ORIGINAL_VOCAB_SIZE: vocab_size,
        ds.PADDED_VOCAB_SIZE: padded_vocab_size,
    }


def layout_change_refusal(saved: dict, current: dict, tag: str) -> str | None:
    """Why this layout change cannot go through a universal checkpoint, or None when it can."""
    change = f"{tag} was saved with {describe(saved)}; this run is {describe(current)}"
    if saved["pipeline_parallel"] != current["pipeline_parallel"] and current["pipeline_parallel"] > 1:
        return (f"{change}: of the changes of pipeline stages, only one to parallel.pipeline_parallel=1 is supported "
                f"so far; resume with parallel.pipeline_parallel={saved['pipeline_parallel']}"
                f"{' (or 1)' if saved['pipeline_parallel'] > 1 else ''}, or convert to "
                "Hugging Face (tools/convert_checkpoint_to_hf.py) and start with train.init_from_hf")
    if needs_conversion(saved, current) and 0 in (saved["zero_stage"], current["zero_stage"]):
        return (f"{change}: DeepSpeed converts ZeRO optimizer files into a universal checkpoint and loads it into a "
                "ZeRO optimizer, so both runs need ZeRO stage >= 1 (ds_configs/zero1.json) for this change; a ZeRO-0 "
                "checkpoint resumes on any data-parallel size with the same tensor-parallel size and ZeRO-0")
    return None


def needs_conversion(saved: dict, current: dict) -> bool:
    """ZeRO-0 keeps whole (replicated) optimizer state: a data-parallel change loads as it is."""
    if saved == current:
        return False
    same_shards = (saved["tensor_parallel"], saved["pipeline_parallel"]) == (current["tensor_parallel"],
                                                                             current["pipeline_parallel"])
    return not (same_shards and saved["zero_stage"] == current["zero_stage"] == 0)


def convert_to_universal(tag_dir: Path, trust: bool = False) -> Path:
    """TAG_universal beside TAG (made once; a finished conversion leaves a marker). TAG's files are checked
    before DeepSpeed's converter unpickles them (file_safety.py)."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    output = tag_dir.with_name(tag_dir.name + UNIVERSAL_SUFFIX)
    marker = output / "converted.json"
    if marker.is_file():
        return output
    check_checkpoint_directory(tag_dir, trust=trust)
    ds_to_universal(Namespace(input_folder=str(tag_dir), output_folder=str(output), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=False))
    marker.write_text(json.dumps({"from": tag_dir.name}) + "\n")
    return output


VOCABULARY_VECTORS = r".*predictions\.bias$"
"""1-D parameters padded to the vocabulary's padded size (the MLM decoder bias)."""


def repad_vocabulary_vectors(universal_dir: Path, vocab_size: int, padded_vocab_size: int) -> list[str]:
    """Give the 1-D vocabulary vectors of a universal checkpoint (weights and optimizer moments) the resuming
    run's padding: the real vocab_size entries kept, zeros after them (the padded logits are -inf anyway).
    DeepSpeed strips and re-pads 2-D vocabulary tensors itself; our MLM bias is 1-D. Idempotent, so a
    conversion made for one layout serves another. Returns the parameters re-padded."""
    import torch

    from megatron_narrow.parallel import refit_vocab_rows

    repadded = []
    for folder in sorted((universal_dir / "zero").iterdir()):
        if not re.match(VOCABULARY_VECTORS, folder.name):
            continue
        for file in sorted(folder.glob("*.pt")):
            state = load_checkpoint_file(file)  # written by this run's own universal conversion
            if not isinstance(state, dict):  # step.pt: the optimizer's step count
                continue
            tensor = state["param"]
            if tensor.dim() == 1 and tensor.numel() != padded_vocab_size:
                torch.save({**state, "param": refit_vocab_rows(tensor, vocab_size, padded_vocab_size)}, file)
        repadded.append(folder.name)
    return repadded


def name_pipeline_parameters_as_the_model(universal_dir: Path, config) -> list[str]:
    """Rename the parameter folders of a universal checkpoint made from a pipeline checkpoint (`ITEM.KEY`, the
    tied embeddings `tied_modules.word_embeddings.KEY`) to BertForPreTraining's names, so that a run without
    a pipeline finds them. Idempotent. Returns the new names."""
    from megatron_narrow.model.pipeline import TIE_KEY, model_key

    tied = f"tied_modules.{TIE_KEY}."
    renamed = []
    for folder in sorted((universal_dir / "zero").iterdir()):
        item, _, key = folder.name.partition(".")
        if folder.name.startswith(tied):
            target = model_key(config, 0, folder.name.removeprefix(tied))
        elif item.isdigit() and folder.is_dir():
            target = model_key(config, int(item), key)
        else:
            continue
        folder.rename(folder.with_name(target))
        renamed.append(target)
    return renamed


def restore_buffers(module, tag_dir: Path, config, trust: bool = False) -> list[str]:
    """DeepSpeed's universal load restores parameters (and optimizer state) only, not the module's persistent
    buffers: copy them from the original checkpoint `tag_dir` (the token-drop importance vector; a pipeline
    checkpoint keeps them in its per-item files). Returns the names restored."""
    import torch

    from megatron_narrow.formats.checkpoint_files import pipeline_state_dict

    state = load_checkpoint_file(tag_dir / "mp_rank_00_model_states.pt", trust=trust)["module"]
    if state is None:  # a pipeline checkpoint
        state = pipeline_state_dict(tag_dir, config, tp_rank=0, trust=trust)
    restored = []
    for name, buffer in module.named_buffers():
        if name in state:
            with torch.no_grad():
                buffer.copy_(state[name].to(buffer.device, buffer.dtype))
            restored.append(name)
    return restored
