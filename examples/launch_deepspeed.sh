#!/usr/bin/env bash
# Multi-node GPU pretraining with the deepspeed launcher: launch_deepspeed.sh CONFIG.yaml [section.key=value ...]
#   HOSTFILE=examples/hostfile.example DS_CONFIG=ds_configs/zero1.json bash examples/launch_deepspeed.sh CONFIG.yaml
# Without a HOSTFILE it uses every GPU of this node; MASTER_PORT replaces DeepSpeed's default 29500. Extra arguments
# override the YAML config.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:?usage: launch_deepspeed.sh CONFIG.yaml [section.key=value ...]}; shift
LAUNCH=(deepspeed)
[ -n "${HOSTFILE:-}" ] && LAUNCH+=(--hostfile "$HOSTFILE")
[ -n "${MASTER_PORT:-}" ] && LAUNCH+=(--master_port "$MASTER_PORT")
exec "${LAUNCH[@]}" megatron_narrow/pretrain.py --config "$CONFIG" --deepspeed_config "${DS_CONFIG:-ds_configs/zero1.json}" "$@"
