"""A training checkpoint (any ZeRO stage, any TP x PP layout) -> a Hugging Face masked-LM directory.

    convert_checkpoint("runs/pretrain", "hf/my-bert")      # the save_dir's latest checkpoint
    convert_checkpoint("runs/pretrain/checkpoints/step_0001000", "hf/my-bert")

Steps, each with the tool that owns it:

1. Consolidate data parallelism with DeepSpeed's own code, once per tensor-parallel rank. ZeRO-0 keeps the
   whole (TP-local) module in `mp_rank_XX_model_states.pt`; ZeRO-1/2/3 keep the fp32 master weights
   partitioned over the data-parallel ranks in `*_mp_rank_XX_optim_states.pt`, which
   `deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint` reassembles (for ZeRO-3 the
   module file holds no weights at all). That function reads every model/optim file of a directory,
   so each TP rank's files are shown to it through a directory of symlinks of their own.
   A pipeline checkpoint keeps each item's module weights in `layer_XX-model_YY-model_states.pt` (item
   XX, TP rank YY), written whole by data-parallel rank 0; `model.pipeline.model_key` names each tensor.
   These are the weights in the training precision: with bf16/fp16 the fp32 masters stay in the ZeRO-1
   optimizer files, which this tool does not read for pipelines.
2. Merge the TP shards along the dimension each parameter declares (`tensor_parallel_dim`), then refit
   the vocabulary rows: training padded them to a multiple of 128 x TP, a TP=1 model to 128.
3. Load the result into a TP=1 `BertForPreTraining` built from the checkpoint's run_config.json and
   export it with `export_to_hf` (token_drop's importance vector stays behind: the trained model is plain
   BERT; narrow ships its modelling code), then write a transformers tokenizer and a model card.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megatron_narrow.config import ModelConfig
from megatron_narrow.file_safety import check_checkpoint_directory, load_checkpoint_file
from megatron_narrow.formats.checkpoint_files import (
    COMPLETE_NAME,
    CONFIG_NAME,
    checkpoint_root,
    incomplete_reason,
    latest_tag,
    pipeline_state_dict,
)
from megatron_narrow.formats.hf_bert import NO_HF_COUNTERPART, VOCAB_ROWS
from megatron_narrow.model import BertForPreTraining
from megatron_narrow.parallel import merge_tensor_parallel, refit_vocab_rows, tensor_parallel_dims
from megatron_narrow.variants import variant_spec

TOKENIZER_CLASS = "PreTrainedTokenizerFast"  # resolves in transformers 4.x and 5.x alike
_MP_RANK = re.compile(r"mp_rank_(\d+)_model_states\.pt$")


class CheckpointError(ValueError):
    """The directory is not a complete megatron_narrow checkpoint, or one this tool cannot convert."""


@dataclass
class CheckpointInfo:
    """What a checkpoint directory says about itself."""

    path: Path
    """The step_NNNNNNN directory."""
    run_config: dict
    """run_config.json: our RunConfig as a dict (model, data, parallel, train)."""
    zero_stage: int
    tensor_parallel: int
    pipeline_parallel: int = 1
    step: int | None = None
    consumed_samples: int | None = None
    ds_config: dict = field(default_factory=dict)
    trust: bool = False
    """Load its files without the pickle check (file_safety.py): --trust-checkpoint."""

    @property
    def model_config(self) -> ModelConfig:
        return ModelConfig(**self.run_config["model"])

    @property
    def pair_head(self) -> bool:
        return (self.run_config.get("data") or {}).get("pair_task", "none") != "none"


def resolve_checkpoint(path: str | Path) -> Path:
    """The step directory that `path` names: a step_ directory itself, or a save_dir (or its checkpoints/
    folder) whose `latest` marker names one."""
    path = Path(path)
    if (path / CONFIG_NAME).is_file():
        if (path / COMPLETE_NAME).is_file() and (why := incomplete_reason(path)) is not None:
            raise CheckpointError(f"{path} is damaged: {why}; convert an older step_ directory beside it")
        return path
    for save_dir in (path, path.parent) if path.name == "checkpoints" else (path,):
        tag = latest_tag(save_dir)
        if tag is not None:
            return checkpoint_root(save_dir) / tag
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    raise CheckpointError(f"{path} is neither a checkpoint directory (no {CONFIG_NAME}) nor a save_dir whose "
                          "checkpoints/latest names a complete checkpoint")


def _model_state_files(step_dir: Path) -> dict[int, list[Path]]:
    """TP rank -> its *_model_states.pt files (one for ZeRO-0/1/2, one per data-parallel rank for ZeRO-3)."""
    files: dict[int, list[Path]] = {}
    for file in sorted(step_dir.glob("*model_states.pt")):
        match = _MP_RANK.search(file.name)
        if match:
            files.setdefault(int(match.group(1)), []).append(file)
    return files


def read_checkpoint_info(path: str | Path, trust: bool = False) -> CheckpointInfo:
    """Resolve `path` (see resolve_checkpoint) and read its run config, layout and training progress. Every
    checkpoint file of it is checked first (file_safety.py), since DeepSpeed's readers unpickle them as they
    are; `trust` skips that."""
    step_dir = resolve_checkpoint(path)
    check_checkpoint_directory(step_dir, trust=trust)
    run_config = json.loads((step_dir / CONFIG_NAME).read_text())
    if "model" not in run_config:
        raise CheckpointError(f"{step_dir / CONFIG_NAME} has no model section")
    parallel = run_config.get("parallel") or {}
    files = _model_state_files(step_dir)
    if not files:
        raise CheckpointError(f"{step_dir} holds no DeepSpeed *model_states.pt files")
    tp, pp = int(parallel.get("tensor_parallel", 1)), int(parallel.get("pipeline_parallel", 1))
    if sorted(files) != list(range(tp * pp)):  # a pipeline's model-parallel ranks are its stages x TP ranks
        raise CheckpointError(f"{step_dir}: run_config.json says tensor_parallel={tp} x pipeline_parallel={pp} but "
                              f"the model-parallel ranks on disk are {sorted(files)}")
    first = load_checkpoint_file(files[0][0], trust=trust, mmap=True)
    ds_config = first.get("ds_config") or {}
    zero_stage = int((ds_config.get("zero_optimization") or {}).get("stage", 0))
    if first.get("mp_world_size", tp * pp) != tp * pp:
        raise CheckpointError(f"{files[0][0]}: DeepSpeed saved mp_world_size={first['mp_world_size']}, "
                              f"run_config.json tensor_parallel={tp} x pipeline_parallel={pp}")
    ours = first.get("megatron_narrow") or first  # the loop's client state (older checkpoints: top level)
    step = ours.get("step", first.get("global_steps"))
    return CheckpointInfo(path=step_dir, run_config=run_config, zero_stage=zero_stage, tensor_parallel=tp,
                          pipeline_parallel=pp, step=step, consumed_samples=ours.get("consumed_samples"),
                          ds_config=ds_config, trust=trust)


def _has_master_weights(step_dir: Path, mp_rank: int) -> bool:
    return bool(glob.glob(str(step_dir / f"*mp_rank_{mp_rank:02d}_optim_states.pt")))


def tensor_parallel_shard(info: CheckpointInfo, mp_rank: int) -> dict[str, torch.Tensor]:
    """One TP rank's full state dict (data parallelism consolidated), fp32, with DeepSpeed's utilities."""
    step_dir = info.path
    if info.pipeline_parallel > 1:
        return _pipeline_tensor_parallel_shard(info, mp_rank)
    if info.zero_stage == 0:
        files = _model_state_files(step_dir)[mp_rank]
        module = load_checkpoint_file(files[0], trust=info.trust)["module"]
        return {k: v.float() if v.is_floating_point() else v for k, v in module.items()}
    if not _has_master_weights(step_dir, mp_rank):
        raise CheckpointError(f"{step_dir}: ZeRO-{info.zero_stage} checkpoint without optimizer states for "
                              f"model-parallel rank {mp_rank} (the weights are partitioned there)")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with tempfile.TemporaryDirectory(prefix="mp_rank_") as tmp:  # this TP rank's files only
        view = Path(tmp) / step_dir.name
        view.mkdir()
        for pattern in (f"*mp_rank_{mp_rank:02d}_model_states.pt", f"*mp_rank_{mp_rank:02d}_optim_states.pt"):
            for file in step_dir.glob(pattern):
                os.symlink(file.resolve(), view / file.name)
        try:
            state = get_fp32_state_dict_from_zero_checkpoint(tmp, tag=step_dir.name)
        except (ValueError, KeyError, RuntimeError, FileNotFoundError, AssertionError) as error:
            found = sorted(p.name for p in view.glob("*optim_states.pt"))
            said = (str(error).splitlines() or [type(error).__name__])[0].replace(tmp, str(step_dir.parent))
            raise CheckpointError(f"{step_dir}: the ZeRO-{info.zero_stage} optimizer shards of model-parallel rank "
                                  f"{mp_rank} are incomplete or damaged (found {found}; DeepSpeed: {said}); "
                                  "copy the missing *_optim_states.pt files or convert an older checkpoint"
                                  ) from None
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def _pipeline_tensor_parallel_shard(info: CheckpointInfo, tp_rank: int) -> dict[str, torch.Tensor]:
    """One TP rank's state dict from a pipeline checkpoint's per-item files, under BertForPreTraining's names."""
    state = {key: value.float() if value.is_floating_point() else value
             for key, value in pipeline_state_dict(info.path, info.model_config, tp_rank, info.trust).items()}
    if not state:
        raise CheckpointError(f"{info.path}: pipeline checkpoint without layer_*-model_{tp_rank:02d}-model_states.pt "
                              f"files for tensor-parallel rank {tp_rank}")
    return state


def load_merged_model(info: CheckpointInfo) -> BertForPreTraining:
    """A TP=1 BertForPreTraining holding the checkpoint's weights (all TP ranks merged)."""
    config = info.model_config
    model = BertForPreTraining(config, pair_head=info.pair_head).eval()
    shards = [tensor_parallel_shard(info, rank) for rank in range(info.tensor_parallel)]
    merged = merge_tensor_parallel(shards, tensor_parallel_dims(model))
    target = model.state_dict()
    for key in VOCAB_ROWS:
        if key in merged:
            merged[key] = refit_vocab_rows(merged[key], config.vocab_size, target[key].shape[0])
    unexpected = sorted(set(merged) - set(target))
    missing = sorted(set(target) - set(merged) - set(NO_HF_COUNTERPART))
    if unexpected or missing:
        raise CheckpointError(f"{info.path}: the weights do not fit the model of run_config.json: "
                              f"unexpected {unexpected[:5]}, missing {missing[:5]}")
    for key, value in merged.items():
        if value.shape != target[key].shape:
            raise CheckpointError(f"{info.path}: {key} merges to {tuple(value.shape)}, the model of run_config.json "
                                  f"has {tuple(target[key].shape)}")
    model.load_state_dict(merged, strict=False)
    return model


# --- tokenizer -------------------------------------------------------------------------------------------


def tokenizer_source(info: CheckpointInfo) -> tuple[str, Path] | None:
    """(type, file) of the run's tokenizer: the copy saved in the checkpoint, else the original path."""
    train = info.run_config.get("train") or {}
    original = train.get("tokenizer_model")
    if not original:
        return None
    kind = train.get("tokenizer_type") or "sentencepiece"
    original = Path(original)
    copy = info.path / original.name
    if copy.is_file():
        # vocab.txt: the original's tokenizer_config.json (do_lower_case) sits beside it, not beside the copy
        if original.is_file() and original.read_bytes() == copy.read_bytes():
            return kind, original
        return kind, copy
    if original.is_file():
        return kind, original
    raise CheckpointError(f"the run's tokenizer {original} is neither in {info.path} nor at its original path")


def _bert_post_processor(cls_id: int, sep_id: int):
    from tokenizers import processors

    return processors.TemplateProcessing(single="[CLS]:0 $A:0 [SEP]:0", pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
                                         special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])


def sentencepiece_to_tokenizers(model_file: str | Path):
    """A `tokenizers.Tokenizer` equivalent to a sentencepiece .model (transformers' SpmConverter: unigram or
    BPE, the model's normalizer, metaspace), with BERT's [CLS] A [SEP] template and the control symbols
    ([CLS], [SEP], [MASK], [PAD]) as special tokens."""
    from types import SimpleNamespace

    from transformers.convert_slow_tokenizer import SpmConverter

    converter = SpmConverter(SimpleNamespace(vocab_file=str(model_file), add_prefix_space=True, legacy=True))
    tokenizer = converter.converted()
    pieces = {p.piece: i for i, p in enumerate(converter.proto.pieces)}
    tokenizer.post_processor = _bert_post_processor(pieces["[CLS]"], pieces["[SEP]"])
    return tokenizer


def build_hf_tokenizer(kind: str, path: str | Path, *, model_max_length: int):
    """The run's tokenizer as a transformers PreTrainedTokenizerFast with BERT's special tokens.

    sentencepiece: converted to a tokenizers model (same ids and pieces); wordpiece vocab.txt or
    tokenizer.json: the very tokenizers pipeline training used."""
    from transformers import PreTrainedTokenizerFast

    from megatron_narrow.data.tokenizer import load_tokenizer

    ours = load_tokenizer(kind, path)  # validates the file and the special tokens
    if kind == "sentencepiece":
        backend = sentencepiece_to_tokenizers(path)
    else:
        backend = ours._tok  # the very tokenizers.Tokenizer that encoded the training data
        if backend.post_processor is None:
            backend.post_processor = _bert_post_processor(ours.special.cls, ours.special.sep)
    special = ours.special
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, model_max_length=model_max_length,
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],  # BERT's: pairs need the types
        unk_token=ours.id_to_token(special.unk), pad_token=ours.id_to_token(special.pad),
        cls_token=ours.id_to_token(special.cls), sep_token=ours.id_to_token(special.sep),
        mask_token=ours.id_to_token(special.mask))
    for name in ("unk", "pad", "cls", "sep", "mask"):
        got, want = getattr(tokenizer, f"{name}_token_id"), getattr(special, name)
        if got != want:
            raise CheckpointError(f"{path}: the converted tokenizer maps [{name.upper()}] to {got}, "
                                  f"training used {want}")
    return tokenizer


def save_tokenizer(info: CheckpointInfo, output_dir: Path) -> list[str]:
    """Write tokenizer.json + tokenizer_config.json (and a copy of the original file); returns the names."""
    source = tokenizer_source(info)
    if source is None:
        return []
    kind, path = source
    tokenizer = build_hf_tokenizer(kind, path, model_max_length=info.model_config.max_position_embeddings)
    saved = [Path(p).name for p in tokenizer.save_pretrained(output_dir)]
    config_file = output_dir / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["tokenizer_class"] = TOKENIZER_CLASS
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    shutil.copy2(path, output_dir / path.name)  # provenance; transformers loads tokenizer.json
    return sorted({*saved, path.name})


# --- model card ------------------------------------------------------------------------------------------


def _data_tokens(info: CheckpointInfo) -> tuple[list[str], int | None]:
    from megatron_narrow.data.shards import load_manifest

    paths = [str(p) for p in (info.run_config.get("data") or {}).get("data_paths") or []]
    total = 0
    for path in paths:
        try:
            total += int(load_manifest(path)["totals"]["tokens"])
        except Exception:  # the data may have moved since: the card then says less
            return paths, None
    return paths, total if paths else None


def model_card(info: CheckpointInfo, files: list[str], path: str = ".") -> str:
    config = info.model_config
    run, data = info.run_config, info.run_config.get("data") or {}
    variant = config.variant
    seq_len = data.get("seq_len")
    paths, corpus_tokens = _data_tokens(info)
    spec = variant_spec(variant)
    narrow = spec.hf_remote_code  # the remote-code model is NarrowBERT's: it says its two stacks
    kind = spec.title
    hf_class = f"{variant_spec(spec.trained_model).hf_class_prefix}ForMaskedLM" + (" (remote code)" if narrow else "")
    lines = [
        "---", "library_name: transformers", "pipeline_tag: fill-mask", f"tags: [megatron_narrow, {variant}]",
        "---", "",
        f"# {kind} masked language model", "",
        f"Converted by megatron_narrow's `tools/convert_checkpoint_to_hf.py` from `{info.path}` "
        f"(tensor_parallel={info.tensor_parallel}, pipeline_parallel={info.pipeline_parallel}, ZeRO stage "
        f"{info.zero_stage}). Class: `{hf_class}`.", "",
        "| | |", "|---|---|",
        f"| variant | {variant} |",
        f"| layers | {config.num_layers}"
        + (f" ({config.full_length_layers} full-length, {config.num_layers - config.full_length_layers} narrow)"
           if narrow else "") + " |",
        f"| hidden size | {config.hidden_size} |",
        f"| attention heads | {config.num_heads} |",
        f"| intermediate size | {config.intermediate_size} |",
        f"| vocabulary | {config.vocab_size} |",
        f"| max positions | {config.max_position_embeddings} |",
        f"| training steps | {info.step if info.step is not None else 'unknown'} |",
    ]
    if info.consumed_samples is not None:
        seen = f"{info.consumed_samples:,} sequences"
        if seq_len:
            seen += f" of {seq_len} tokens (<= {info.consumed_samples * seq_len:,} tokens, padding included)"
        lines.append(f"| data seen | {seen} |")
    if paths:
        corpus = ", ".join(f"`{p}`" for p in paths)
        lines.append(f"| corpus | {corpus}" + (f": {corpus_tokens:,} tokens" if corpus_tokens is not None else "")
                     + " |")
    train = run.get("train") or {}
    if train.get("tokenizer_model"):
        lines.append(f"| tokenizer | {train.get('tokenizer_type') or 'sentencepiece'} "
                     f"(`{Path(train['tokenizer_model']).name}`) |")
    remote = ", trust_remote_code=True" if narrow else ""
    lines += [
        "", "## Use", "", "```python",
        "from transformers import AutoModelForMaskedLM, AutoTokenizer, pipeline", "",
        f"PATH = {path!r}  # this directory",
        "tokenizer = AutoTokenizer.from_pretrained(PATH)",
        f"model = AutoModelForMaskedLM.from_pretrained(PATH{remote})",
        f"fill = pipeline(\"fill-mask\", model=PATH{remote})",
        "print(fill(f\"The capital of France is {tokenizer.mask_token}.\"))", "```", "",
    ]
    if narrow:
        lines += [
            "NarrowBERT runs its first layers on every position and the narrow layers only for query rows. "
            "Its modelling code is saved beside the weights (`modeling_narrow_bert.py`), hence "
            "`trust_remote_code=True`. Pass `query_positions` (batch, queries) to compute only those rows; "
            "without it every position is a query (what fill-mask uses).", "",
        ]
    if spec.trained_model != variant:
        lines += ["Token dropping changes the pretraining schedule only: the exported model is plain BERT and "
                  "the token-importance vector is not exported.", ""]
    lines += ["The pooler and the next-sentence/sentence-order head, when trained, are not part of a masked-LM "
              "model and are not exported.", "", "Files: " + ", ".join(f"`{f}`" for f in sorted(files)), ""]
    return "\n".join(lines)


# --- the whole conversion --------------------------------------------------------------------------------


def convert_checkpoint(checkpoint: str | Path, output_dir: str | Path, trust: bool = False) -> Path:
    """Convert a checkpoint (a save_dir: its latest; or a step_ directory) to `output_dir`, which stock
    transformers loads with AutoModelForMaskedLM (narrow: trust_remote_code=True) and AutoTokenizer.
    `trust`: load its files without the pickle check (--trust-checkpoint)."""
    from megatron_narrow.convert.export import export_to_hf

    info = read_checkpoint_info(checkpoint, trust=trust)
    model = load_merged_model(info)
    output_dir = Path(output_dir)
    export_to_hf(model, output_dir)
    if not save_tokenizer(info, output_dir):
        warnings.warn(f"{info.path}: the run named no train.tokenizer_model, so {output_dir} has no tokenizer "
                      "(fill-mask pipelines need one)", stacklevel=2)
    files = sorted(p.name for p in output_dir.iterdir() if p.is_file() and p.name != "README.md")
    (output_dir / "README.md").write_text(model_card(info, files, str(output_dir)), encoding="utf-8")
    return output_dir
