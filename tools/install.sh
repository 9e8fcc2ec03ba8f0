#!/usr/bin/env bash
# Install everything megatron_narrow needs on a fresh Debian machine (run as root or with sudo).
# Idempotent: what is already installed is skipped. torch is pinned to the local CPU build here so that
# pip never pulls the multi-GB CUDA wheels; setup.py itself only asks for a range.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(libopenmpi-dev openmpi-bin slurm-wlm munge)  # slurm-wlm, munge: the SLURM preemption test
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

PIP="python -m pip install --quiet --disable-pip-version-check"
TORCH_PIN="${MEGATRON_NARROW_TORCH:-torch==2.13.0}"
python -c "import torch" 2>/dev/null || $PIP "$TORCH_PIN"
$PIP -e ".[test,hf,wandb]"

# DeepSpeed JIT-compiles its CPU shared-memory collective the first time a process group starts (~30 s on
# two cores, cached under ~/.cache/torch_extensions): build it here, once, rather than inside the first run.
DS_ACCELERATOR=cpu python -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()" >/dev/null
