"""Configuration dataclasses, grouped by concern. Nearly a leaf: it imports only megatron_narrow.variants
(itself a leaf), so that a variant name is checked against the one list of variants.

Every field has a docstring; `__post_init__` derives defaults and raises ValueError naming the field
and its value, before any compute or process-group work happens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from megatron_narrow.variants import drops_tokens, variant_spec


@dataclass(kw_only=True, slots=True)
class SeqLenPhase:
    """One entry of data.seq_len_schedule: the steps up to `until_step` train on shorter sequences."""

    until_step: int
    """The last step (1-based, as logged) of this phase."""

    seq_len: int
    """Tokens per sample in this phase."""

    max_predictions: int | None = None
    """MLM target slots per sample; None scales data.max_predictions by seq_len / data.seq_len (rounded up)."""

    micro_batch_size: int | None = None
    """Samples per rank per forward/backward; None is train.micro_batch_size."""


@dataclass(kw_only=True, slots=True)
class DataConfig:
    """Where the preprocessed data lives and how BERT samples are cut and masked from it."""

    data_paths: list[str] = field(default_factory=list)
    """Preprocessed dataset directories (each holds an index.json manifest)."""

    data_weights: list[float] | None = None
    """Blending weights, one per data path; None means proportional to each dataset's sample count."""

    split: str = "949,50,1"
    """Train/valid/test proportions, split by documents (Megatron's convention)."""

    seq_len: int = 512
    """Tokens per sample, [CLS] and [SEP]s included; shorter samples are padded (static shapes)."""

    max_predictions: int = 80
    """Fixed number of MLM target slots per sample (M); a validity mask covers unused slots."""

    mask_prob: float = 0.15
    """Fraction of a sample's real (non-special) tokens that become MLM targets, rounded half up."""

    mask_token_prob: float = 0.8
    """Of the targets, the fraction replaced by [MASK]."""

    random_token_prob: float = 0.1
    """Of the targets, the fraction replaced by a random non-special token; the rest stay unchanged."""

    whole_word_masking: bool = False
    """Pick targets by whole words (all pieces of a word together), as in BERT's WWM checkpoints."""

    pair_task: Literal["none", "nsp", "sop"] = "none"
    """Second pretraining task: none (MLM only, as both papers), next-sentence or sentence-order."""

    packing: Literal["none", "concat", "segments"] = "none"
    """How samples fill a row of seq_len. none: one document piece per row, padded (Google BERT, Megatron).
    concat: several samples end to end, [SEP] between them, full attention (RoBERTa FULL-SENTENCES, Hugging
    Face run_mlm). segments: several `[CLS] A [SEP]` samples end to end, each attending only to itself with
    positions restarting: the same maths as running them one by one, without the padding."""

    max_segments: int | None = None
    """packing=segments/concat: at most this many samples per row (None: as many as fit)."""

    seed: int = 1234
    """Seed of shuffling and masking: sample i of epoch e is a pure function of (seed, e, i)."""

    index_cache_dir: str | None = None
    """Where sample indices are cached as .npy files, built once and memory-mapped by every rank (None: an
    index_cache folder inside each data path; set it when the data directories are read-only)."""

    index_cache_shared: bool = True
    """Whether every node sees index_cache_dir (a shared filesystem): rank 0 builds the index and the others
    wait. false: the first rank of each node builds its own copy (the same bytes)."""

    seq_len_schedule: list[SeqLenPhase] = field(default_factory=list)
    """Shorter sequences first, as BERT's recipe (90% of the steps at 128, the rest at 512): a list of phases
    `{until_step: N, seq_len: L, max_predictions: M, micro_batch_size: B}` (M and B optional). Step s runs in
    the first phase with until_step >= s, after the last one at data.seq_len / data.max_predictions /
    train.micro_batch_size. The global batch stays train.global_batch_size; sample i of the run is sample i
    of its phase's dataset, so a resume lands in the right phase at the right sample."""

    def __post_init__(self) -> None:
        if self.seq_len < 8:
            raise ValueError(f"data.seq_len must be at least 8, got {self.seq_len}")
        if not 0 < self.max_predictions <= self.seq_len:
            raise ValueError(
                f"data.max_predictions must be in [1, seq_len={self.seq_len}], got {self.max_predictions}"
            )
        if not 0.0 < self.mask_prob < 1.0:
            raise ValueError(f"data.mask_prob must be in (0, 1), got {self.mask_prob}")
        if self.mask_token_prob < 0 or self.random_token_prob < 0 or self.mask_token_prob + self.random_token_prob > 1:
            raise ValueError(
                "data.mask_token_prob and data.random_token_prob must be >= 0 and sum to <= 1, "
                f"got {self.mask_token_prob} and {self.random_token_prob}"
            )
        if self.pair_task not in ("none", "nsp", "sop"):
            raise ValueError(f"data.pair_task must be none, nsp or sop, got {self.pair_task!r}")
        self._check_packing()
        if self.data_weights is not None and len(self.data_weights) != len(self.data_paths):
            raise ValueError(
                f"data.data_weights has {len(self.data_weights)} entries but data.data_paths has {len(self.data_paths)}"
            )
        if self.data_weights is not None and (any(w < 0 for w in self.data_weights) or sum(self.data_weights) <= 0):
            raise ValueError(f"data.data_weights must be non-negative with a positive sum, got {self.data_weights}")
        split_fractions(self.split)
        self.seq_len_schedule = [_seq_len_phase(raw, index, self) for index, raw in enumerate(self.seq_len_schedule)]
        ends = [phase.until_step for phase in self.seq_len_schedule]
        if ends != sorted(set(ends)):
            raise ValueError(f"data.seq_len_schedule: until_step must increase from phase to phase, got {ends}")

    def phases(self) -> list[DataConfig]:
        """The data config of every phase of data.seq_len_schedule, then the final one (this config without
        the schedule): each cuts and masks samples of its own length."""
        from dataclasses import replace

        final = replace(self, seq_len_schedule=[])
        return [replace(final, seq_len=phase.seq_len, max_predictions=phase.max_predictions)
                for phase in self.seq_len_schedule] + [final]

    @property
    def pair_head(self) -> bool:
        """Whether the model has a pair classifier on the pooled [CLS] (NSP or SOP)."""
        return self.pair_task != "none"

    @property
    def special_slots(self) -> int:
        """[CLS]/[SEP] slots of one unpacked sample: [CLS] A [SEP], plus B's [SEP] with a pair task."""
        return 3 if self.pair_head else 2

    @property
    def num_queries(self) -> int:
        """Rows the encoder computes outputs for per sample: the MLM targets, plus [CLS] for the pair head."""
        return self.max_predictions + int(self.pair_head)

    def _check_packing(self) -> None:
        if self.packing not in ("none", "concat", "segments"):
            raise ValueError(f"data.packing must be none, concat or segments, got {self.packing!r}")
        if self.max_segments is not None and self.max_segments < 1:
            raise ValueError(f"data.max_segments must be >= 1 (or null for no bound), got {self.max_segments}")
        if self.packing == "none":
            return
        if self.pair_task != "none":
            raise ValueError(f"data.packing={self.packing} with data.pair_task={self.pair_task}: a packed row has no "
                             "single sentence pair; set data.pair_task=none (both papers train MLM only)")


def _seq_len_phase(raw: SeqLenPhase | dict, index: int, data: DataConfig) -> SeqLenPhase:
    """An entry of data.seq_len_schedule as a SeqLenPhase with max_predictions filled in, or one line naming it."""
    where = f"data.seq_len_schedule[{index}]"
    if isinstance(raw, dict):
        fields = SeqLenPhase.__dataclass_fields__
        unknown = sorted(set(raw) - set(fields))
        missing = sorted(key for key in ("until_step", "seq_len") if key not in raw)
        problems = ([f"unknown key(s) {', '.join(unknown)}"] if unknown else []) + (
            [f"no {' or '.join(missing)}"] if missing else [])
        if problems:
            raise ValueError(f"{where} has {' and '.join(problems)}: a phase is "
                             "{until_step: N, seq_len: L, max_predictions: M, micro_batch_size: B}")
        raw = SeqLenPhase(**{key: _coerce(fields[key], value, f"{where}.{key}") for key, value in raw.items()})
    elif not isinstance(raw, SeqLenPhase):
        raise ValueError(f"{where} must be a mapping like {{until_step: 900, seq_len: 128}}, got {raw!r}")
    if raw.max_predictions is None:
        raw.max_predictions = -(-data.max_predictions * raw.seq_len // data.seq_len)
    for name in ("until_step", "micro_batch_size"):
        value = getattr(raw, name)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{where}.{name} must be an integer >= 1, got {value!r}")
    if not isinstance(raw.seq_len, int) or raw.seq_len < 8:
        raise ValueError(f"{where}.seq_len must be an integer >= 8, got {raw.seq_len!r}")
    if not 0 < raw.max_predictions <= raw.seq_len:
        raise ValueError(f"{where}.max_predictions must be in [1, seq_len={raw.seq_len}], got {raw.max_predictions}")
    return raw


def split_fractions(split: str) -> tuple[float, float, float]:
    """Parse "949,50,1" into normalised (train, valid, test) fractions; raises on a malformed string."""
    try:
        parts = [float(p) for p in split.replace("/", ",").split(",")]
    except ValueError:
        raise ValueError(f"data.split must be comma-separated numbers like '949,50,1', got {split!r}") from None
    parts += [0.0] * (3 - len(parts))
    if len(parts) != 3 or any(p < 0 for p in parts) or sum(parts) <= 0:
        raise ValueError(f"data.split must be up to three non-negative numbers with a positive sum, got {split!r}")
    total = sum(parts)
    return parts[0] / total, parts[1] / total, parts[2] / total




@dataclass(kw_only=True, slots=True)
class ModelConfig:
    """A post-LayerNorm BERT encoder with Hugging Face's maths, and which sparse variant runs it."""

    vocab_size: int = 30522
    """Real vocabulary size; the embedding is padded to a multiple of 128 x TP (stripped on export)."""

    hidden_size: int = 768
    """Width of the residual stream."""

    num_layers: int = 12
    """Transformer layers."""

    num_heads: int = 12
    """Attention heads; split across tensor-parallel ranks."""

    intermediate_size: int | None = None
    """FFN width; None derives 4 x hidden_size."""

    max_position_embeddings: int = 512
    """Learned position table size: the longest sequence the model accepts."""

    type_vocab_size: int = 2
    """Token type (segment) ids."""

    hidden_dropout: float = 0.1
    """Dropout on embeddings and on each sublayer's output."""

    attention_dropout: float = 0.1
    """Dropout on attention probabilities."""

    layer_norm_eps: float = 1e-12
    """LayerNorm epsilon (BERT's 1e-12)."""

    initializer_range: float = 0.02
    """Std of the normal initialisation of weights and embeddings."""

    variant: str = "bert"
    """bert: every layer on every position. narrow: NarrowBERT sparse queries. token_drop: Hou et al."""

    full_length_layers: int = 2
    """narrow: layers run on all positions before the narrow layers (whose K/V read their output)."""

    token_drop_keep_ratio: float = 0.5
    """token_drop: fraction of seq_len that the middle layers keep, in (0, 1]."""

    token_drop_keep_tokens: int | None = None
    """token_drop: keep exactly this many tokens instead (k); overrides the ratio."""

    importance_beta: float = 0.995
    """token_drop: EMA factor of the per-token-id importance (running MLM loss)."""

    importance_init: float = 10.0
    """token_drop: initial importance of every token id."""

    token_drop_force_keep: str = "special"
    """token_drop: which tokens the middle layers always keep. special: tokens whose input id is special
    ([MASK], [CLS], [SEP], [UNK]), the official implementation's rule, so the 10% random / 10% unchanged
    MLM targets compete on importance; targets: every MLM target as well (this project's rule before
    2026-11-30). Ties in importance keep the earliest positions under either rule."""

    init_seed: int = 1234
    """Seed of the master-weight initialisation (identical weights for any TP size)."""

    attention_backend: str = "sdpa"
    """Attention kernel (model/attention_backends.py): sdpa (torch picks the fastest it can), math (the
    readable reference) or varlen (each packed segment alone, as variable-length sequences: FlashAttention-2's
    varlen kernel when flash_attn is installed, torch's jagged NestedTensors otherwise). Not part of the
    weights: a run may resume or export with another."""

    compile: bool = False
    """Compile the model with torch.compile (DeepSpeed's engine.compile; inductor on the CPU and on CUDA), which
    fuses the elementwise work between the matrix products. Costs a compile when training starts (tens of
    seconds on a CPU, again at a new sequence length) and computes what eager does (fp32 to ~1e-6). Not part of
    the weights: a run may resume with it on or off. Not with parallel.pipeline_parallel > 1."""

    def __post_init__(self) -> None:
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size
        spec = variant_spec(self.variant)  # one line naming the variants for an unknown one
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                     "max_position_embeddings", "type_vocab_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"model.hidden_size={self.hidden_size} is not divisible by model.num_heads={self.num_heads}"
            )
        if not 0 <= self.full_length_layers <= self.num_layers:
            raise ValueError(
                f"model.full_length_layers={self.full_length_layers} is out of range [0, num_layers={self.num_layers}]"
            )
        if self.num_layers < spec.min_layers:
            raise ValueError(f"model.variant={self.variant} needs num_layers >= {spec.min_layers}, "
                             f"got {self.num_layers}")
        if not 0 < self.token_drop_keep_ratio <= 1:
            raise ValueError(f"model.token_drop_keep_ratio must be in (0, 1], got {self.token_drop_keep_ratio}")
        if self.token_drop_keep_tokens is not None and self.token_drop_keep_tokens < 1:
            raise ValueError(f"model.token_drop_keep_tokens must be >= 1, got {self.token_drop_keep_tokens}")
        if self.token_drop_force_keep not in ("special", "targets"):
            raise ValueError(f"model.token_drop_force_keep must be special or targets, got "
                             f"{self.token_drop_force_keep!r}")
        if not 0 < self.importance_beta < 1:
            raise ValueError(f"model.importance_beta must be in (0, 1), got {self.importance_beta}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def kept_tokens(self, seq_len: int) -> int:
        """token_drop: k, the number of tokens the middle layers keep for sequences of `seq_len`."""
        if self.token_drop_keep_tokens is not None:
            return min(self.token_drop_keep_tokens, seq_len)
        return max(1, round(self.token_drop_keep_ratio * seq_len))

    def validate(self, *, tensor_parallel: int = 1, seq_len: int | None = None,
                 max_predictions: int | None = None) -> None:
        """Refuse combinations that depend on the run: TP size, sequence length, targets per sequence."""
        if self.num_heads % tensor_parallel:
            raise ValueError(
                f"model.num_heads={self.num_heads} is not divisible by parallel.tensor_parallel={tensor_parallel}"
            )
        if self.intermediate_size % tensor_parallel:
            raise ValueError(
                f"model.intermediate_size={self.intermediate_size} is not divisible by "
                f"parallel.tensor_parallel={tensor_parallel}"
            )
        if seq_len is not None and seq_len > self.max_position_embeddings:
            raise ValueError(
                f"data.seq_len={seq_len} exceeds model.max_position_embeddings={self.max_position_embeddings}"
            )
        if seq_len is not None and max_predictions is not None and max_predictions > seq_len:
            raise ValueError(f"data.max_predictions={max_predictions} is more targets than seq_len={seq_len} positions")
        keep = self.token_drop_keep_tokens
        if drops_tokens(self) and seq_len is not None and keep is not None and keep > seq_len:
            raise ValueError(f"model.token_drop_keep_tokens={keep} exceeds seq_len={seq_len}")


@dataclass(kw_only=True, slots=True)
class ParallelConfig:
    """The TP x PP x DP layout. Plain arithmetic, checked without building any process group."""

    tensor_parallel: int = 1
    """Ranks that split each layer's heads, FFN columns and vocabulary (Megatron tensor parallelism)."""

    pipeline_parallel: int = 1
    """Pipeline stages (DeepSpeed PipelineModule)."""

    data_parallel: int | None = None
    """Model replicas; None derives it as world_size / (tensor_parallel * pipeline_parallel)."""

    pipeline_partition: str = "cost"
    """How layers are split into pipeline stages: "uniform" (equal layer counts) or "cost" (balance the
    estimated FLOPs: a narrow layer costs a fraction of a full one, so equal counts leave stages idle)."""

    def __post_init__(self) -> None:
        for name in ("tensor_parallel", "pipeline_parallel"):
            if getattr(self, name) < 1:
                raise ValueError(f"parallel.{name} must be >= 1, got {getattr(self, name)}")
        if self.pipeline_partition not in ("uniform", "cost"):
            raise ValueError(f"parallel.pipeline_partition must be uniform or cost, got {self.pipeline_partition!r}")
        if self.data_parallel is not None and self.data_parallel < 1:
            raise ValueError(f"parallel.data_parallel must be >= 1, got {self.data_parallel}")

    def resolve(self, world_size: int) -> ParallelConfig:
        """The layout with data_parallel filled in; raises unless tp * pp * dp == world_size."""
        model_parallel = self.tensor_parallel * self.pipeline_parallel
        if world_size % model_parallel:
            raise ValueError(
                f"world size {world_size} is not divisible by tensor_parallel={self.tensor_parallel} x "
                f"pipeline_parallel={self.pipeline_parallel}"
            )
        dp = world_size // model_parallel
        if self.data_parallel is not None and self.data_parallel != dp:
            raise ValueError(
                f"tensor_parallel={self.tensor_parallel} x pipeline_parallel={self.pipeline_parallel} x "
                f"data_parallel={self.data_parallel} = {model_parallel * self.data_parallel}, "
                f"but the world size is {world_size}"
            )
        return ParallelConfig(tensor_parallel=self.tensor_parallel, pipeline_parallel=self.pipeline_parallel,
                              data_parallel=dp, pipeline_partition=self.pipeline_partition)


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    """The optimisation loop, checkpoints and logging."""

    micro_batch_size: int = 8
    """Samples per rank per forward/backward."""

    global_batch_size: int | None = None
    """Samples per optimizer step over all data-parallel ranks; None = micro_batch_size x data_parallel."""

    train_steps: int = 1000
    """Optimizer steps to train for."""

    lr: float = 1e-4
    """Peak learning rate."""

    min_lr: float = 0.0
    """Learning rate at the end of the decay."""

    warmup_steps: int = 0
    """Linear warmup: step s (1-based) of the first warmup_steps trains at lr x s / warmup_steps."""

    lr_decay: Literal["linear", "cosine", "constant"] = "linear"
    """Decay from lr to min_lr over the steps after warmup."""

    optimizer: Literal["adamw", "lamb"] = "adamw"
    """adamw (torch's, fused where the device has a kernel) or lamb (large-batch BERT: DeepSpeed's FusedLamb
    on CUDA, training/lamb.py elsewhere; per-tensor trust ratios, so ZeRO stage 0 only). Both read
    adam_beta1/adam_beta2/adam_eps and weight_decay."""

    weight_decay: float = 0.01
    """Decoupled weight decay; never applied to biases and LayerNorm weights."""

    adam_beta1: float = 0.9
    """First-moment decay of AdamW and LAMB."""

    adam_beta2: float = 0.999
    """Second-moment decay of AdamW and LAMB."""

    adam_eps: float = 1e-6
    """Added to the root of the second moment (BERT's 1e-6)."""

    activation_checkpointing: Literal["none", "full", "selective"] = "none"
    """Recompute activations in backward instead of keeping them (model/recompute.py): full (each layer
    keeps its inputs only), selective (only the attention core: scores, softmax, dropout) or none."""

    clip_grad: float = 1.0
    """Gradient-norm clipping (0 disables)."""

    precision: Literal["auto", "fp32", "bf16", "fp16"] = "fp32"
    """Our switch over the DeepSpeed config's bf16/fp16 sections. auto: bf16 on CUDA devices with bf16 tensor
    cores and on CPUs with AMX or AVX512-BF16, fp32 elsewhere (training/precision.py); the run's first line
    says which and why."""

    nonfinite_loss: Literal["skip", "stop"] = "stop"
    """A non-finite loss: skip the step and count it (fp16 loss scaling does this itself), or stop."""

    eval_interval: int = 0
    """Evaluate on the valid split every N steps (0: never)."""

    eval_steps: int = 10
    """Micro-batches per evaluation."""

    save_dir: str = "runs/pretrain"
    """Checkpoints, metrics.jsonl and tensorboard events; a run resumes from here when it holds a checkpoint."""

    save_interval: int = 0
    """Checkpoint every N steps (0: only at the end and on SIGTERM)."""

    keep_last: int = 2
    """Checkpoints to keep; older ones are deleted (never one newer than the checkpoint being saved)."""

    trust_checkpoint: bool = False
    """Load checkpoint files without checking what their pickles call (megatron_narrow/file_safety.py): only for
    a checkpoint you trust that names a global outside the allowlist, which a refusal names."""

    restart: bool = False
    """Start fresh even though train.save_dir holds checkpoints: they are moved aside to
    checkpoints.before_restart_N, never deleted. Pass it once on the command line, not in a YAML that a
    requeued job reuses. Without it, a save_dir whose checkpoints are all unusable is refused."""

    log_interval: int = 1
    """Log every N steps (console, metrics.jsonl, tensorboard)."""

    seed: int = 1234
    """Seed of dropout (data order and masking are seeded by data.seed)."""

    init_from_hf: str | None = None
    """A Hugging Face BERT directory to start from (continued pretraining)."""

    tokenizer_type: Literal["sentencepiece", "wordpiece"] | None = None
    """The model's tokenizer; with tokenizer_model it is checked against the data and exported."""

    tokenizer_model: str | None = None
    """Path of the model's tokenizer file."""

    num_workers: int = 1
    """DataLoader worker processes per rank."""

    wandb_project: str | None = None
    """Also log to this Weights & Biases project (optional: pip install wandb): the records of metrics.jsonl
    and the run config, as run SAVE_DIR's folder name (WANDB_ENTITY, WANDB_MODE=offline etc. apply). A resumed
    run continues the same W&B run (its id is kept in SAVE_DIR/wandb_run_id)."""

    batch_size_rampup: list[int] | None = None
    """Megatron's --rampup-batch-size: [start, increment, samples]. The global batch starts at `start` and
    grows by `increment` evenly over the first `samples` consumed samples, up to train.global_batch_size
    (the micro batch stays; accumulation steps grow). null: no ramp-up."""

    def __post_init__(self) -> None:
        for name in ("micro_batch_size", "train_steps", "log_interval", "keep_last", "eval_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.global_batch_size is not None and self.global_batch_size < 1:
            raise ValueError(f"train.global_batch_size must be >= 1, got {self.global_batch_size}")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"train.lr must be > 0 and 0 <= train.min_lr <= lr, got lr={self.lr} min_lr={self.min_lr}")
        if self.lr_decay not in ("linear", "cosine", "constant"):
            raise ValueError(f"train.lr_decay must be linear, cosine or constant, got {self.lr_decay!r}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"train.precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")
        if self.activation_checkpointing not in ("none", "full", "selective"):
            raise ValueError(f"train.activation_checkpointing must be none, full or selective, got "
                             f"{self.activation_checkpointing!r}")
        if self.optimizer not in ("adamw", "lamb"):
            raise ValueError(f"train.optimizer must be adamw or lamb, got {self.optimizer!r}")
        if self.nonfinite_loss not in ("skip", "stop"):
            raise ValueError(f"train.nonfinite_loss must be skip or stop, got {self.nonfinite_loss!r}")
        ramp = self.batch_size_rampup
        if ramp is not None and (not isinstance(ramp, list) or len(ramp) != 3
                                 or not all(isinstance(v, int) and v >= 1 for v in ramp)):
            raise ValueError(f"train.batch_size_rampup must be three integers >= 1, [start, increment, samples] "
                             f"(e.g. [32, 32, 1000000]), got {ramp!r}")

    def gradient_accumulation(self, data_parallel: int) -> int:
        """Micro-batches per step; raises unless global = micro x accumulation x data_parallel."""
        step = self.micro_batch_size * data_parallel
        global_batch = self.global_batch_size or step
        if global_batch % step:
            raise ValueError(
                f"train.global_batch_size={global_batch} is not a multiple of train.micro_batch_size="
                f"{self.micro_batch_size} x data_parallel={data_parallel}"
            )
        return global_batch // step


@dataclass(kw_only=True, slots=True)
class RunConfig:
    """Everything a run needs; YAML sections model/data/parallel/train, overridable as section.key=value."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> RunConfig:
        return cls(**build_sections(raw, {"model": ModelConfig, "data": DataConfig, "parallel": ParallelConfig,
                                          "train": TrainConfig}))


def build_sections(raw: dict, sections: dict[str, type]) -> dict:
    """{section: dataclass instance} from a YAML dict, naming unknown sections and keys."""
    unknown = sorted(set(raw) - set(sections))
    if unknown:
        raise ValueError(f"unknown config section(s) {unknown}; expected {sorted(sections)}")
    built = {}
    for name, kind in sections.items():
        values = raw.get(name) or {}
        fields = kind.__dataclass_fields__
        bad = sorted(set(values) - set(fields))
        if bad:
            raise ValueError(f"unknown key(s) {', '.join(f'{name}.{k}' for k in bad)}")
        built[name] = kind(**{k: _coerce(fields[k], v, f"{name}.{k}") for k, v in values.items()})
    return built


def _coerce(spec, value, where: str):
    """YAML reads 1e-4 as a string (it wants 1.0e-4): convert strings for numeric fields, naming the key."""
    default = spec.default
    if isinstance(value, str) and isinstance(default, (int, float)) and not isinstance(default, bool):
        try:
            return float(value) if isinstance(default, float) else int(value)
        except ValueError:
            raise ValueError(f"{where} must be a number, got {value!r}") from None
    return value


def load_run_config(path: str | None, overrides: list[str]) -> RunConfig:
    """Read a YAML config (or start from defaults) and apply `section.key=value` overrides (YAML values)."""
    return RunConfig.from_dict(read_yaml_with_overrides(path, overrides))


def read_yaml_with_overrides(path: str | None, overrides: list[str]) -> dict:
    """The YAML file as a dict (empty without one) with `section.key=value` overrides applied."""
    import yaml

    raw: dict = {}
    if path:
        if not Path(path).is_file():
            raise ValueError(f"config {path} does not exist (--config takes a YAML file; see examples/configs/)")
        try:
            with open(path, encoding="utf-8") as f:
                raw = yaml.safe_load(f) or {}
        except yaml.YAMLError as error:
            raise ValueError(f"{path} is not valid YAML ({' '.join(str(error).split())}); fix the file") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: a run config is a mapping of sections (model, data, parallel, train), "
                             f"got a {type(raw).__name__}")
    for override in overrides:
        key, sep, value = override.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot or not name:
            raise ValueError(f"override {override!r} must look like section.key=value (e.g. train.lr=1e-4)")
        raw.setdefault(section, {})
        if raw[section] is None:
            raw[section] = {}
        try:
            raw[section][name] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ValueError(f"override {override!r}: {value!r} is not a YAML value; quote it") from None
    return raw
