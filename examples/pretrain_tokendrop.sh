#!/usr/bin/env bash
# tokendrop_base on GPUs with the deepspeed launcher; HOSTFILE and DS_CONFIG as in launch_deepspeed.sh.
#   HOSTFILE=examples/hostfile.example bash examples/pretrain_tokendrop.sh [section.key=value ...]
exec bash "$(dirname "$0")/launch_deepspeed.sh" examples/configs/tokendrop_base.yaml "$@"
