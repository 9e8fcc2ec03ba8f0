#!/usr/bin/env bash
# bert_base on GPUs with the deepspeed launcher; HOSTFILE and DS_CONFIG as in launch_deepspeed.sh.
#   HOSTFILE=examples/hostfile.example bash examples/pretrain_bert.sh [section.key=value ...]
exec bash "$(dirname "$0")/launch_deepspeed.sh" examples/configs/bert_base.yaml "$@"
