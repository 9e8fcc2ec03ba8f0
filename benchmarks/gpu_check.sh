#!/usr/bin/env bash
# The device check, prepared to run in one call on a lent GPU machine (H100/H200; under 10 minutes):
#   1. install the carried wheels (.whl/, made by benchmarks/gpu_wheels.sh: deepspeed and the needs the image
#      lacks) into /tmp/site, without the network;
#   2. pytest -m gpu (tests/test_gpu.py): every attention backend against math on CUDA in fp32 and bf16, a bf16
#      ZeRO-1 run, CUDA RNG states round-tripping through a resume, NCCL on one rank;
#   3. benchmarks/throughput.py --precision bf16 --device cuda at BERT-base shape (12 layers, hidden 768, 12 heads)
#      at seq 128 and 512: tokens/s and MFU of bert, narrow, token_drop and Hugging Face's BERT, and the ratios;
#   4. benchmarks/vs_official.py against the official NarrowBERT code, when its clone ($OFFICIAL_DIR) and venv
#      ($OFFICIAL_VENV) are there (the device has no network: both must be carried).
# Everything it prints goes to $OUT/gpu_check.log too; each benchmark writes $OUT/*.json (OUT default
# runs/gpu_check). A failing step does not stop the later ones; the exit code is the number of failed steps.
#
#   bash benchmarks/gpu_check.sh             # on the GPU machine
#   bash benchmarks/gpu_check.sh --dry-run   # anywhere: the same steps on the CPU at tiny shapes (the suite runs it)
set -uo pipefail
py="${PYTHON:-python3}"  # the GPU image has python3 only
cd "$(dirname "$0")/.."
dry_run=0
case "${1:-}" in
  --dry-run) dry_run=1 ;;
  "") ;;
  *) echo "usage: bash benchmarks/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
esac
out="${OUT:-runs/gpu_check}"
mkdir -p "$out"
exec > >(tee -a "$out/gpu_check.log") 2>&1
failed=0
step() { echo; echo "== $1 ($(date +%T))"; }
check() { "$@" || { echo "FAILED: $*"; failed=$((failed + 1)); }; }

if (( dry_run )); then
  device=cpu
  shape=(--layers 4 --hidden 64 --heads 2 --vocab 1000 --max-predictions 10 --valid-targets 8 --rounds 1 --repeats 1)
  runs=("64 1")
else
  device=cuda
  shape=(--layers 12 --hidden 768 --heads 12 --vocab 30522 --rounds 5 --repeats 2)
  runs=("128 64 --max-predictions 20 --valid-targets 19" "512 16")  # seq, batch (8k tokens a step), targets
  step "carried wheels"
  if compgen -G ".whl/*.whl" > /dev/null; then
    check "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  if ! "$py" -c "import deepspeed"; then
    echo "deepspeed is not installed: run bash benchmarks/gpu_wheels.sh on a machine with pip, carry .whl"
    exit 1
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi

step "gpu tests"
if (( dry_run )); then  # no CUDA here: collected, every one skipped
  check "$py" -m pytest -q -m gpu -n 0 -p no:cacheprovider tests/test_gpu.py
else
  DS_ACCELERATOR=cuda check "$py" -m pytest -q -m gpu -n 0 -p no:cacheprovider tests/test_gpu.py
fi

for run in "${runs[@]}"; do
  read -r seq batch extra <<< "$run"
  step "throughput, bf16, seq $seq, batch $batch"
  # shellcheck disable=SC2086  # $extra holds optional arguments
  check "$py" benchmarks/throughput.py --json "$out/throughput_bf16_seq$seq.json" --precision bf16 \
    --device "$device" --seq "$seq" --batch "$batch" "${shape[@]}" $extra
done

step "vs_official"
official_dir="${OFFICIAL_DIR:-/tmp/narrowbert}"
official_venv="${OFFICIAL_VENV:-$HOME/.cache/megatron_narrow/official-venv}"
if (( dry_run )) || [[ ! -d "$official_dir" || ! -x "$official_venv/bin/python" ]]; then
  echo "skipped: needs the official clone ($official_dir) and its venv ($official_venv)"
else
  check "$py" benchmarks/vs_official.py --official-dir "$official_dir" --venv "$official_venv" \
    --json "$out/vs_official.json"
fi

step "done: $failed failed step(s); results in $out"
exit "$failed"
