#!/usr/bin/env bash
# Generic multi-node launch without a scheduler: run this script once on every host.
#   COORDINATOR=10.0.0.1:1234 NUM_PROCESSES=2 PROCESS_ID=0 bash launch/multi_node.sh configs/mtl.py /shared/workdir
#   COORDINATOR=10.0.0.1:1234 NUM_PROCESSES=2 PROCESS_ID=1 bash launch/multi_node.sh configs/mtl.py /shared/workdir
# COORDINATOR: host:port of process 0, reachable from every host (any free port).
# NUM_PROCESSES: number of hosts; PROCESS_ID: 0..NUM_PROCESSES-1, unique per host.
# Each process reads a disjoint share of every global batch; config.global_batch_size is the
# total over all hosts and must divide evenly by the total number of GPUs.
set -euo pipefail
CONFIG=${1:?config file}
WORKDIR=${2:?shared work directory}
shift 2
: "${COORDINATOR:?set COORDINATOR=host:port of process 0}"
: "${NUM_PROCESSES:?set NUM_PROCESSES}"
: "${PROCESS_ID:?set PROCESS_ID}"
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
exec python -m affectjax.main --config="$CONFIG" --workdir="$WORKDIR" \
  --config.distributed.initialize=yes \
  --config.distributed.coordinator_address="$COORDINATOR" \
  --config.distributed.num_processes="$NUM_PROCESSES" \
  --config.distributed.process_id="$PROCESS_ID" "$@"
