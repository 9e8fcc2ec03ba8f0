#!/usr/bin/env bash
# Multi-node GPU pretraining of tokendrop_base with the deepspeed launcher.
#   HOSTFILE=examples/hostfile.example DS_CONFIG=ds_configs/zero1.json bash examples/pretrain_tokendrop.sh [section.key=value ...]
# Without a HOSTFILE it uses every GPU of this node. Extra arguments override the YAML config.
set -euo pipefail
cd "$(dirname "$0")/.."
HOSTFILE=${HOSTFILE:-}
DS_CONFIG=${DS_CONFIG:-ds_configs/zero1.json}
LAUNCH=(deepspeed)
[ -n "$HOSTFILE" ] && LAUNCH+=(--hostfile "$HOSTFILE")
exec "${LAUNCH[@]}" megatron_narrow/pretrain.py --config examples/configs/tokendrop_base.yaml --deepspeed_config "$DS_CONFIG" "$@"
