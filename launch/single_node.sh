#!/usr/bin/env bash
# Single node, all local GPUs: one process drives every GPU of the machine (data parallel over
# a 1-D mesh of the local devices). Set what you need below, then:
#   bash launch/single_node.sh configs/mtl.py /path/to/workdir [--config.a.b=value ...]
set -euo pipefail
CONFIG=${1:?config file, e.g. configs/mtl.py}
WORKDIR=${2:?work directory}
shift 2
# Which GPUs to use (all by default); the global batch is split evenly across them.
# export CUDA_VISIBLE_DEVICES=0,1,2,3
# XLA flags worth setting on NVIDIA GPUs (see BUILD.md, "Performance").
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
# Let JAX take GPU memory as needed rather than 75% up front when sharing a machine:
# export XLA_PYTHON_CLIENT_PREALLOCATE=false
exec python -m affectjax.main --config="$CONFIG" --workdir="$WORKDIR" \
  --config.distributed.initialize=no "$@"
