#!/usr/bin/env bash
# The GPU check on the reference GPU machine (../shared/docs/gpu.md): no network there, so the
# six packages it lacks come from .whl/ (copied from ../shared/gpu-wheels/, travelling with the
# checkout); then benchmarks/accelerator.py, about 8 minutes on one H100/H200.
#   bash benchmarks/accelerator.sh [--out DIR] [accelerator.py flags]
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
  .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD"
# Overlap the gradient all-reduce with the backward pass (BUILD.md, performance notes).
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
# JAX would take 75% of the GPU's memory up front; the PyTorch references run in the same process.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.5}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
out="${OUT:-${OUT_DIR:-results}}"
case " $* " in *" --out "*) python3 benchmarks/accelerator.py "$@" ;;
  *) python3 benchmarks/accelerator.py --out "$out" "$@" ;; esac
